"""``gsae-groups``: group the layers of a model by the mean angular distance of their residual
streams (complete linkage), print AMAD and the compute saving for every G, and write groups.json
with a heatmap and an AMAD plot."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from .. import grouping as gp
from .. import plots
from ..hf.models import ModelLoadError, context_length, load_model
from ..hf.texts import DatasetLoadError, open_texts
from ..outdir import claim, write_marker
from ..sae import SaeSettings
from ..units import parse_count
from .common import add_data_args, data_defaults


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gsae-groups",
        description="Group the layers of a model by the mean angular distance of their residual "
        "streams (complete linkage), print AMAD and the compute saving for every G, and write "
        "groups.json with a heatmap and an AMAD plot.",
    )
    add_data_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--tokens", default="10M", help="tokens to average over (default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: groups-<model>)")
    p.add_argument(
        "--threshold",
        type=float,
        default=gp.DEFAULT_THRESHOLD,
        help="G_hat = smallest G with AMAD(G) below this (default: %(default)s)",
    )
    p.add_argument(
        "--include-last",
        action="store_true",
        help="group the last layer too (by default it gets its own SAE)",
    )
    for field in ("expansion_factor", "k"):  # the SAE's own settings, read for its cost only
        p.add_argument(
            "--" + field.replace("_", "-"),
            type=int,
            default=getattr(SaeSettings, field),
            help="for the SAE cost estimate (default: %(default)s)",
        )
    p.add_argument(
        "--from-matrix",
        default=None,
        metavar="FILE",
        help="an L x L .npy or JSON matrix: group exactly its rows, no model needed",
    )
    return p


def format_table(g: gp.Grouping) -> str:
    dense = g.extra.get("savings_dense_sae", {})
    width = max(24, 3 * len(g.layers))
    rows = [
        f"{'G':>4}  {'groups (label per layer)':<{width}}  {'AMAD':>6}"
        f"  {'Δ% gsae':>8}  {'Δ% dense':>8}"
    ]
    for num, part in sorted(g.partitions.items()):
        mark = "*" if num == g.g_hat else " "
        labels = " ".join(f"{x:>2}" for x in part.labels)
        saving = f"{100 * g.savings[num]:8.1f}" if num in g.savings else f"{'-':>8}"
        paper = f"{100 * dense[str(num)]:8.1f}" if str(num) in dense else f"{'-':>8}"
        rows.append(f"{num:>3}{mark}  {labels:<{width}}  {part.amad:6.3f}  {saving}  {paper}")
    rows.append(
        f"* G_hat = {g.g_hat}: the smallest G with AMAD < {g.threshold}; layers "
        f"{g.layers}; {g.tokens:,} tokens"
    )
    if g.savings:
        rows.append(
            "Δ%: compute saved against one SAE per layer (Eq. 5), with gsae's sparse "
            "kernels and with a dense SAE step (the paper's Table 2 convention)"
        )
    return "\n".join(rows)


def write_outputs(g: gp.Grouping, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    g.save(out / "groups.json")
    name = Path(g.model).name if g.model else "distance matrix"
    title = f"{name} ({g.tokens:,} tokens)" if g.tokens else name
    plots.distance_heatmap(g.distances, g.layers, out / "distances.png", title)
    amads = {num: p.amad for num, p in g.partitions.items()}
    plots.amad_curve(amads, g.g_hat, g.threshold, out / "amad.png", title)
    write_marker(out, "gsae-groups")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    out, held, written = None, contextlib.ExitStack(), False
    try:
        gp.check_threshold(args.threshold)  # before the model loads
        if not args.from_matrix:
            data_defaults(args)
        out = Path(args.out or f"groups-{Path(str(args.model or 'matrix')).name}")
        held.enter_context(claim(out, "gsae-groups", replaced=False))  # checked before any work
        if args.from_matrix:  # no model: the file records none unless --model names one
            result = gp.group_layers(
                gp.read_matrix(args.from_matrix),
                model=args.model or "",
                threshold=args.threshold,
                extra={"source": str(args.from_matrix)},
            )
        else:
            tokens = parse_count(args.tokens)
            texts = open_texts(args.dataset, args.split, args.column)  # named before the model
            loaded = load_model(args.model, args.model_dtype, args.device)
            ctx = context_length(loaded, args.ctx_len)
            if ctx.capped:
                print(
                    f"context: {ctx.tokens} tokens (capped at the {ctx.tokens} positions "
                    f"{args.model} takes)"
                )
            result = gp.measure_model(
                loaded,
                texts,
                tokens=tokens,
                ctx_len=ctx.tokens,
                batch_size=args.batch_size,
                repeat=args.repeat,
                include_last=args.include_last,
                threshold=args.threshold,
                expansion_factor=args.expansion_factor,
                k=args.k,
            )
        written = True
        write_outputs(result, out)  # groups.json first, then the figures
    except (
        ModelLoadError,
        DatasetLoadError,
        ValueError,
        FileNotFoundError,
        FloatingPointError,
    ) as err:
        print(f"gsae-groups: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f"while writing to {out}" if written else "before anything was written"
        print(f"\ngsae-groups: interrupted {where}", file=sys.stderr)
        return 130
    except OSError as err:
        print(f"gsae-groups: error: cannot write the outputs: {err}", file=sys.stderr)
        return 1
    finally:
        held.close()  # the lock on --out
    print(format_table(result))
    print(f"wrote {out / 'groups.json'}, {out / 'distances.png'}, {out / 'amad.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
