"""Crash-safe file writes: whatever is already on disk stays readable if a write is interrupted.

Every file and folder is created with the mode the process's umask allows (as ``open`` and
``mkdir`` do), not the private 0600/0700 of ``tempfile``: a run written to a shared cluster
folder is readable by whoever the user's umask lets read it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fsync_file(path)


TEMP_NAME = re.compile(r"\.(?P<of>.+)\.[0-9a-f]{8}\.(tmp|trash)")


def temp_name(path: Path, tag: str = "tmp") -> Path:
    """A fresh hidden name beside ``path``: ``.NAME.<8 hex digits>.<tag>`` (tmp or trash)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{tag}")


def temp_origin(name: str) -> str | None:
    """The name a :func:`temp_name` was made for, or None for any other name."""
    match = TEMP_NAME.fullmatch(name)
    return match["of"] if match else None


def is_temp_name(name: str, of: str) -> bool:
    """Whether ``name`` is a :func:`temp_name` made for a path called ``of``."""
    return temp_origin(name) == of


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.
    On any error (a full disk, Ctrl-C) the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # mode: 0666 & ~umask
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def umask() -> int:
    """The process's umask. Read from /proc where there is one: the portable way, setting it
    and back, would race with threads creating files meanwhile."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict, path: str | os.PathLike) -> None:
    """``safetensors.torch.save_file``, then the mode a file made with ``open`` would have (the
    library writes its files 0600 whatever the umask)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    os.chmod(path, 0o666 & ~umask())


def dumps_json(obj) -> str:
    """Strict JSON (no bare NaN/Infinity, which strict parsers reject): non-finite floats are
    written as null."""
    return json.dumps(finite(obj), indent=2, allow_nan=False) + "\n"


def finite(obj):
    """``obj`` with every non-finite float replaced by None (null in JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(dumps_json(obj))


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder so that an interruption never leaves a half-deleted one under its name:
    it is renamed aside first (one atomic step), then removed."""
    path = Path(path)
    if not path.exists():
        return
    trash = temp_name(path, "trash")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_temp_dirs(path: str | os.PathLike) -> None:
    """Delete the leftovers of interrupted :func:`atomic_dir` writes and :func:`remove_tree`
    calls for ``path``."""
    path = Path(path)
    if path.parent.exists():
        for p in path.parent.iterdir():
            if is_temp_name(p.name, path.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fsync_file(f)
    fsync_dir(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes ``path`` as a whole.

    The old ``path`` is moved aside to ``path.old`` before the new one is renamed in, so at every
    instant one complete copy exists; :func:`recover_dir` undoes a swap cut off between the two
    renames. On any error the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    recover_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    tmp.mkdir()  # mode: 0777 & ~umask
    try:
        yield tmp
        fsync_tree(tmp)
        old = path.with_name(path.name + ".old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(path: str | os.PathLike) -> None:
    """Finish or roll back an :func:`atomic_dir` swap that was interrupted, and delete the
    temporary folders of interrupted writes."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old)  # the new copy landed; only the clean-up was missed
        else:
            os.replace(old, path)  # cut off between the renames: the old copy is the good one
    remove_temp_dirs(path)


def check_replaceable(out: Path, marker: str, command: str, overwrite: bool) -> None:
    """Refuse an output folder ``out`` that ``command`` would replace as a whole when it is a
    gsae-train run, a file, or a non-empty folder without ``marker`` (the file ``command``
    writes there: one it wrote before), unless ``overwrite``."""
    if (out / "run.json").exists():
        raise ValueError(f"--out {out} holds a gsae-train run: it would be replaced; pick "
                         "another --out")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists() and not overwrite:
        raise ValueError(f"--out {out} is a non-empty folder that {command} did not write; pick "
                         "another --out or pass --overwrite to replace it")  # fmt: skip
