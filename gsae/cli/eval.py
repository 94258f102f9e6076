"""``gsae-eval``: the paper's metrics, tables and figures for gsae-train runs, side by side."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from .common import add_run_data_args, failed, run_data, stops


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gsae-eval",
        description="Evaluate gsae-train runs on held-out tokens: FVU, explained variance, "
        "cosine, L0 and never-fired latents per layer; ΔCE, CE loss recovered and KL with each "
        "reconstruction spliced into the forward; against --baseline (a per-layer run) MMCS and "
        "MMCO; feature distributions. Writes metrics.jsonl/.csv, the paper's Tables 1-2, "
        "figures and a self-contained report.html into --out.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="gsae-train output folders")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--baseline",
        default=None,
        metavar="RUN",
        help="a gsae-train --groups per-layer run of the same model: MMCS, MMCO and "
        "the star of the figures",
    )
    p.add_argument("--tokens", default="1M", help="held-out tokens (default: %(default)s)")
    add_run_data_args(p, "runs'")
    p.add_argument(
        "--model",
        default=None,
        help="evaluate with this model instead of the runs' (e.g. a local copy of it)",
    )
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="evaluate even when held-out text cannot be guaranteed (e.g. a --repeat "
        "run that went round its corpus)",
    )
    p.add_argument(
        "--no-downstream",
        action="store_true",
        help="skip the spliced forwards (ΔCE, CE recovered, KL): much faster",
    )
    p.add_argument(
        "--mmco-pairs",
        default="all",
        choices=["all", "same-group", "diagonal", "none"],
        help="layer pairs for MMCO: all (the paper's heatmaps), same-group, diagonal "
        "or none (default: %(default)s)",
    )
    p.add_argument(
        "--mmco-memory",
        default="4G",
        help="memory for MMCO counts per pass over the tokens; more pairs take more "
        "passes (default: %(default)s)",
    )
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from ..eval import prepare, run_plan
    from ..eval.report import write_report
    from ..outdir import claim
    from ..progress import progress_bar
    from ..units import parse_bytes, parse_count

    out = Path(args.out)
    existed, held = out.is_dir(), contextlib.ExitStack()
    try:
        inputs = [*args.runs, *([args.baseline] if args.baseline else [])]
        held.enter_context(
            claim(out, "gsae-eval", inputs=inputs, overwrite=None)
        )  # until the outputs are in
        tokens = parse_count(args.tokens)
        plan = prepare(
            args.runs,
            baseline=args.baseline,
            tokens=tokens,
            **run_data(args),
            model=args.model,
            allow_overlap=args.allow_overlap,
            downstream=not args.no_downstream,
            pairs=args.mmco_pairs,
            mmco_memory=parse_bytes(args.mmco_memory, "--mmco-memory"),
        )
        print(
            f"{plan.model_name}: {len(plan.runs)} runs ({', '.join(r.name for r in plan.runs)})"
            f"{'; baseline ' + plan.baseline.name if plan.baseline else ''}"
        )
        for note in plan.notes:
            print(f"  {note}")
        start = time.perf_counter()
        with progress_bar(tokens, "eval") as bar:
            result = run_plan(plan, progress=bar.update)
        written = write_report(result, plan, out)  # all at once, or nothing
    except stops() as err:
        return failed("gsae-eval", err, out, existed)
    finally:
        held.close()
    seconds = time.perf_counter() - start
    print((Path(args.out) / "table1.md").read_text())
    for note in result.notes[len(plan.notes) :]:
        print(f"note: {note}")
    passes = f" in {result.passes} passes" if result.passes > 1 else ""
    print(
        f"{result.tokens:,} tokens{passes}, {seconds:.1f} s ({result.tokens / seconds:,.0f} "
        f"tokens/s); wrote {len(written)} files to {args.out} (open report.html)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
