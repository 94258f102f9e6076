"""Settings that a command line can set, declared once on their dataclass field.

A field made with :func:`option` carries its flag's help text (the flag is the field's name with
dashes); ``gsae.cli.common.add_options`` builds the flags from the fields, so a
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
    choices: tuple[str, ...] | None = None,
    count: bool = False,
    negatable: bool = False,
    shown: str | None = None,
):
    """A dataclass field with a flag. ``count``: a token count read by
    :func:`gsae.units.parse_count` (``1M``); ``negatable``: a bool flag with a ``--no-`` form
    (for settings ``--resume`` may turn off); ``shown``: the default as the help says it, where
    the value itself says little (None: "auto")."""
    meta = dict(help=help, choices=choices, count=count, negatable=negatable, shown=shown)
    return dataclasses.field(default=default, metadata={"option": meta})


def options(cls) -> list[tuple[dataclasses.Field, dict]]:
    """The fields of ``cls`` that have a flag, with their :func:`option` metadata."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def counts(*classes) -> tuple[str, ...]:
    """The names of the token-count fields (``option(..., count=True)``) of ``classes``."""
    return tuple(f.name for cls in classes for f, meta in options(cls) if meta["count"])


def flag_name(f: dataclasses.Field) -> str:
    """The flag of a field: ``--`` and the field's name with dashes."""
    return "--" + f.name.replace("_", "-")


def type_names(f: dataclasses.Field) -> list[str]:
    """The names in a field's annotation: ``int | None`` is ``["int", "None"]`` (annotations
    are text here: ``from __future__ import annotations``)."""
    return [t.strip() for t in str(f.type).split("|")]


def count_text(n: int) -> str:
    """A token count as a flag would be written: 1000000000 is ``1B``, 20000 ``20k``."""
    for size, suffix in _SUFFIXES:
        if n >= size and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)
