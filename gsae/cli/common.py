"""Flags shared by the commands and their one way of failing: the one gsae.cli module that the
others import."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

# the run settings that say which model reads which text: flags of gsae-train and gsae-groups
DATA_SETTINGS = (
    "model",
    "dataset",
    "split",
    "column",
    "ctx_len",
    "repeat",
    "device",
    "model_dtype",
)


def add_options(p: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None) -> None:
    """A flag for each :func:`gsae.options.option` field of the dataclass ``cls`` (those named
    in ``only``), stored under the field's name with None as its default, so that the flags
    given are known; the field's default is the one the help shows."""
    from ..options import count_text, flag_name, options

    for f, meta in options(cls):
        if only is not None and f.name not in only:
            continue
        kwargs = dict(dest=f.name, default=None, help=meta["help"])
        if isinstance(f.default, bool):
            negatable = meta["negatable"]
            kwargs["action"] = argparse.BooleanOptionalAction if negatable else "store_true"
        else:
            kwargs["type"] = _flag_type(f, meta)
            kwargs["choices"] = meta["choices"]
            shown = meta["shown"] or (count_text(f.default) if meta["count"] else f.default)
            if shown is not None:
                kwargs["help"] += f" (default: {shown})"
        p.add_argument(flag_name(f), **kwargs)


def _flag_type(f, meta):
    """How a flag's text is read: the field's type (``int | None``: int), but counts (``1M``)
    and ``int | str`` (``--save-every 15m``) stay text, read with the run's settings."""
    from ..options import type_names

    kinds = type_names(f)
    if meta["count"] or "str" in kinds:
        return str
    return {"int": int, "float": float}[kinds[0]]


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--model, --dataset, --split, --column, --ctx-len, --repeat, --device, --model-dtype."""
    from ..train.settings import RunSettings  # torch: not for the light commands

    add_options(p, RunSettings, DATA_SETTINGS)


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    """--overwrite of a command that replaces its --out folder as a whole."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace an --out folder that {p.prog} did not write",
    )


def add_run_data_args(p: argparse.ArgumentParser, whose: str = "run's") -> None:
    """The data flags of a command that reads a finished run (gsae-eval, gsae-browse,
    gsae-autointerp): each defaults to the run's own setting. ``whose``: "run's" or "runs'"."""
    p.add_argument("--dataset", default=None, help=f"default: the {whose} own")
    p.add_argument("--split", default=None, help=f"default: the {whose} own")
    p.add_argument("--column", default=None, help=f"text column (default: the {whose} own)")
    p.add_argument("--ctx-len", type=int, default=None, help=f"default: the {whose} own")
    p.add_argument(
        "--batch-tokens", type=int, default=8192, help="tokens per forward (default: %(default)s)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument(
        "--model-dtype",
        default=None,
        choices=["bf16", "fp16", "fp32"],
        help="model forward dtype (default: bf16 on a GPU, fp32 on a CPU)",
    )


def run_data(args: argparse.Namespace) -> dict:
    """The flags of :func:`add_run_data_args` as the library's keyword arguments (``collect``,
    ``prepare``)."""
    from ..run import RunData

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(RunData)}


def data_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the data flags that were not given with the run settings' defaults."""
    from ..train.settings import RunSettings

    for key in DATA_SETTINGS:
        if getattr(args, key, None) is None:
            setattr(args, key, RunSettings.__dataclass_fields__[key].default)
    return args


# the streamed collection's sizes (CollectConfig's fields): flag, default, help
COLLECT_SIZES = (
    ("--window", 32, "tokens per example window (default: %(default)s, the paper's)"),
    ("--top", 20, "top-activating windows kept per latent and layer (default: %(default)s)"),
    ("--random", 10, "random activating windows kept per latent and layer (default: %(default)s)"),
    (
        "--pool",
        128,
        "random windows kept per layer, for non-activating examples (default: %(default)s)",
    ),
)


def add_collect_args(p: argparse.ArgumentParser, tokens: str = "1M") -> None:
    """The flags of the streamed collection (shared by gsae-browse and gsae-autointerp)."""
    p.add_argument("--tokens", default=tokens, help="tokens to stream (default: %(default)s)")
    add_run_data_args(p)
    for name, default, what in COLLECT_SIZES:
        p.add_argument(name, type=int, default=default, help=what)
    p.add_argument("--seed", type=int, default=0)


def collect_config(args: argparse.Namespace):
    """The :class:`~gsae.browse.collect.CollectConfig` of the collection flags, checked."""
    from ..browse.collect import CollectConfig

    cfg = CollectConfig(
        window=args.window,
        top=args.top,
        random=args.random,
        pool=args.pool,
        neighbours=getattr(args, "neighbours", 8),
        seed=args.seed,
    )
    return cfg.validate()


def stops() -> tuple[type[BaseException], ...]:
    """What ends a command with :func:`failed`: a bad input, a model or dataset that does not
    load, a Ctrl-C (a function: the load errors' module imports torch)."""
    from ..hf.models import ModelLoadError
    from ..hf.texts import DatasetLoadError

    return (ModelLoadError, DatasetLoadError, ValueError, FileNotFoundError, KeyboardInterrupt)


def failed(command: str, err: BaseException, out: Path, existed: bool) -> int:
    """Say in one line why ``command`` stopped before its outputs in ``out`` were whole (what
    ``out`` holds after a Ctrl-C); the exit code: 130 for a Ctrl-C, 2 for a bad input."""
    from ..outdir import kept_words

    if isinstance(err, KeyboardInterrupt):
        print(f"\n{command}: interrupted; {kept_words(out, existed)}", file=sys.stderr)
        return 130
    print(f"{command}: error: {err}", file=sys.stderr)
    return 2
