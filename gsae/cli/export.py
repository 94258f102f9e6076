"""``gsae-export``: a gsae-train run's SAEs in sparsify's or SAELens' format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_overwrite_arg, failed, stops


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gsae-export",
        description="Write every SAE of a gsae-train run in EleutherAI sparsify's format "
        "(SparseCoder.load_from_disk / load_many, delphi) or SAELens' (SAE.load_from_disk): one "
        "folder per model layer, named by hookpoint, each layer's activation scale folded into "
        "the weights so that the exported SAEs take and return the model's own activations.",
    )
    p.add_argument("run", metavar="RUN", help="a gsae-train output folder")
    p.add_argument("--format", required=True, choices=["sparsify", "saelens"])
    p.add_argument("--out", required=True, help="output folder (replaced as a whole)")
    p.add_argument(
        "--hookpoint-prefix",
        default=None,
        metavar="PREFIX",
        help="sparsify hookpoints are PREFIX.N (default: the model's layer list "
        "inside its base model, e.g. layers for GPT-NeoX and Llama, h for "
        "GPT-2)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="read the hookpoint names from this copy of the run's model (a local "
        "directory) instead of the run's own",
    )
    add_overwrite_arg(p)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from ..export import export_run

    existed = Path(args.out).is_dir()
    try:
        exported = export_run(
            args.run,
            args.format,
            args.out,
            prefix=args.hookpoint_prefix,
            model=args.model,
            overwrite=args.overwrite,
        )
    except stops() as err:
        return failed("gsae-export", err, Path(args.out), existed)
    for e in exported:
        print(f"  {e.name:<28} layer {e.layer:>3}  from {e.group} (scale {e.scale:.4g} folded in)")
    loader = (
        "sparsify.SparseCoder.load_many(OUT, local=True)"
        if args.format == "sparsify"
        else "sae_lens.SAE.load_from_disk(OUT/<hookpoint>)"
    )
    print(f"wrote {len(exported)} SAEs to {args.out} ({args.format}; load with {loader})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
