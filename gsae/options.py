"""Settings that a command line can set, declared once on their dataclass field.

A field made with :func:`option` carries its flag's help text (and, where it differs from the
field's name, the flag); ``gsae.cli.common.add_options`` builds the flags from the fields, so a
setting's default, type and choices are written once, on the field, and the help shows that
default. A field made without :func:`option` has no flag: a research setting that a config file
(``gsae-train --config``) or the Python API sets, as SAELens' and sparsify's config objects do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_SUFFIXES = ((10**9, "B"), (10**6, "M"), (10**3, "k"))


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    count: bool = False,
    negatable: bool = False,
    shown: str | None = None,
):
    """A dataclass field with a flag. ``count``: a token count read by
    :func:`gsae.units.parse_count` (``1M``); ``negatable``: a bool flag with a ``--no-`` form
    (for settings ``--resume`` may turn off); ``shown``: the default as the help says it, where
    the value itself says little (None: "auto")."""
    meta = dict(help=help, flag=flag, choices=choices, count=count, negatable=negatable)
    meta["shown"] = shown
    return dataclasses.field(default=default, metadata={"option": meta})


def options(cls) -> list[tuple[dataclasses.Field, dict]]:
    """The fields of ``cls`` that have a flag, with their :func:`option` metadata."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def flag_name(f: dataclasses.Field) -> str:
    """The flag of a field: its own, or ``--`` and the field's name with dashes."""
    return f.metadata["option"]["flag"] or "--" + f.name.replace("_", "-")


def count_text(n: int) -> str:
    """A token count as a flag would be written: 1000000000 is ``1B``, 20000 ``20k``."""
    for size, suffix in _SUFFIXES:
        if n >= size and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)
