"""``gsae-browse``: a static latent browser for a gsae-train run."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from .common import add_collect_args, add_overwrite_arg, collect_config, failed, run_data, stops


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gsae-browse",
        description="Stream text through a gsae-train run's model and SAEs and write a static, "
        "self-contained latent browser into --out (open index.html): per latent its top and "
        "random activating contexts, firing frequency and activation histogram, how it fires "
        "over the layers of its group, its nearest latents and, with --baseline, its best match "
        "among a per-layer run's latents.",
    )
    p.add_argument("run", metavar="RUN", help="a gsae-train output folder")
    p.add_argument("--out", required=True, help="output folder (replaced as a whole)")
    p.add_argument(
        "--baseline",
        default=None,
        metavar="RUN",
        help="a gsae-train --groups per-layer run of the same model",
    )
    add_collect_args(p)
    p.add_argument(
        "--neighbours",
        type=int,
        default=8,
        help="nearest latents by decoder cosine shown (default: %(default)s)",
    )
    p.add_argument(
        "--jaccard-memory",
        default="4G",
        help="memory for the co-occurrence counts behind --baseline's Jaccard match "
        "(default: %(default)s)",
    )
    add_overwrite_arg(p)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from ..browse.collect import collect
    from ..browse.site import write_site
    from ..hf.models import load_tokenizer
    from ..outdir import claim
    from ..progress import progress_bar
    from ..units import parse_bytes, parse_count

    out = Path(args.out)
    existed, held = out.is_dir(), contextlib.ExitStack()
    inputs = [args.run] + ([args.baseline] if args.baseline else [])
    try:
        held.enter_context(claim(out, "gsae-browse", inputs=inputs, overwrite=args.overwrite))
        tokens = parse_count(args.tokens)
        config = collect_config(args)
        memory = parse_bytes(args.jaccard_memory, "--jaccard-memory")
        start = time.perf_counter()
        with progress_bar(tokens, "collect") as bar:
            col = collect(
                args.run,
                tokens=tokens,
                **run_data(args),
                baseline=args.baseline,
                config=config,
                jaccard_memory=memory,
                progress=bar.update,
            )
        seconds = time.perf_counter() - start
        write_site(col, load_tokenizer(col.meta["model"]), out)  # and the collection, at once
    except stops() as err:
        return failed("gsae-browse", err, out, existed)
    finally:
        held.close()  # the lock on --out
    for note in col.meta["notes"]:
        print(f"note: {note}")
    latents = sum(v["m"] for v in col.meta["saes"].values())
    print(
        f"{col.meta['tokens']:,} tokens in {seconds:.1f} s; {latents:,} latents of "
        f"{len(col.saes)} SAEs; open {out / 'index.html'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
