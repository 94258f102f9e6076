"""Flags shared by the commands."""

from __future__ import annotations

import argparse

DEFAULT_MODEL = "pythia-160m"


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--model, --dataset, --split, --column, --ctx-len, --repeat, --device, --model-dtype."""
    from ..hf.models import DEFAULT_CTX_LEN  # torch: not for the light commands
    from ..hf.texts import DEFAULT_DATASET

    p.add_argument(
        "--model",
        default=None,
        help=f"local directory, hub id, pythia-<size> or 'demo' (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="hub dataset id (streamed), local .txt/.jsonl/.parquet[.gz], saved "
        f"datasets dir, or 'demo' (default: {DEFAULT_DATASET})",
    )
    p.add_argument("--split", default=None, help="(default: train)")
    p.add_argument("--column", default=None, help="text column of the dataset (default: text)")
    p.add_argument(
        "--ctx-len",
        type=int,
        default=None,
        help=f"tokens per sequence (default: {DEFAULT_CTX_LEN}, or the model's "
        "position limit if lower)",
    )
    p.add_argument(
        "--repeat",
        action="store_true",
        default=None,
        help="cycle over a finite dataset instead of stopping at its end",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument(
        "--model-dtype",
        default=None,
        choices=["bf16", "fp16", "fp32"],
        help="dtype of the model forward (default: bf16 on a GPU, fp32 on a CPU)",
    )


def add_run_data_args(p: argparse.ArgumentParser, whose: str = "run's") -> None:
    """The data flags of a command that reads a finished run (gsae-eval, gsae-browse,
    gsae-autointerp): each defaults to the run's own setting. ``whose``: "run's" or "runs'"."""
    p.add_argument("--dataset", default=None, help=f"default: the {whose} own")
    p.add_argument("--split", default=None, help=f"default: the {whose} own")
    p.add_argument("--column", default=None, help=f"text column (default: the {whose} own)")
    p.add_argument("--ctx-len", type=int, default=None, help=f"default: the {whose} own")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="tokens per forward (default: %(default)s)")  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--model-dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="model forward dtype (default: bf16 on a GPU, fp32 on a CPU)")  # fmt: skip


def data_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the data flags that were not given."""
    from ..hf.texts import DEFAULT_DATASET

    defaults = {
        "model": DEFAULT_MODEL,
        "dataset": DEFAULT_DATASET,
        "split": "train",
        "column": "text",
        "repeat": False,
        "device": "auto",
    }
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")
