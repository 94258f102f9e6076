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


TEMP_NAME = re.compile(r"\.(?P<of>.+)\.(?P<token>[0-9a-f]{8})\.(?P<tag>tmp|trash|old|swap)")


def temp_name(path: Path, tag: str = "tmp", token: str | None = None) -> Path:
    """A fresh hidden name beside ``path``: ``.NAME.<8 hex digits>.<tag>`` (tmp, trash, old or
    swap); ``token``: those 8 digits (default: random)."""
    return path.with_name(f".{path.name}.{token or secrets.token_hex(4)}.{tag}")


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

    Every name this touches besides ``path`` is made for this call (``.NAME.<token>.tmp`` for the
    new copy, ``.NAME.<token>.old`` for the old one on its way out) and recorded first in a
    journal, ``.NAME.<token>.swap``: :func:`recover_dir` finishes or undoes a swap cut off by a
    crash from the journal alone, so no folder a user made (``NAME.old``, ``NAME.bak``) is ever
    renamed or deleted. At every instant one complete copy exists. On any error the temporary
    directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    recover_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    tmp, old, journal = (temp_name(path, tag, token) for tag in ("tmp", "old", "swap"))
    _write_journal(journal, path, token, "writing")
    try:
        tmp.mkdir()  # mode: 0777 & ~umask
        yield tmp
        fsync_tree(tmp)
        _write_journal(journal, path, token, "swapping")  # from here on tmp is whole
        if path.exists() or path.is_symlink():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if not tmp.exists():  # swapped in (or never made): the old copy goes
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists() and not path.exists():
            os.replace(old, path)  # failed between the renames: the old copy comes back
        shutil.rmtree(tmp, ignore_errors=True)
        journal.unlink(missing_ok=True)
        fsync_dir(path.parent)


def _write_journal(journal: Path, path: Path, token: str, state: str) -> None:
    write_json(journal, {"gsae_swap": path.name, "token": token, "state": state})


def recover_dir(path: str | os.PathLike) -> None:
    """Finish an :func:`atomic_dir` swap cut off by a crash, or drop its unfinished copy; only
    the names its journal records are touched."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for journal in path.parent.iterdir():
        match = TEMP_NAME.fullmatch(journal.name)
        if not match or match["tag"] != "swap" or match["of"] != path.name:
            continue
        try:
            record = json.loads(journal.read_text())
        except (OSError, ValueError):
            continue  # not a journal this module wrote
        if record.get("gsae_swap") != path.name or record.get("token") != match["token"]:
            continue
        tmp, old = (temp_name(path, tag, match["token"]) for tag in ("tmp", "old"))
        if record.get("state") == "swapping" and tmp.is_dir():  # the new copy is whole
            if path.exists() and not old.exists():
                os.replace(path, old)
            if not path.exists():
                os.replace(tmp, path)
        if old.exists() and not path.exists():
            os.replace(old, path)  # the new copy was not whole: the old one stays
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        journal.unlink(missing_ok=True)


# ---- SAE and trainer files: JSON and safetensors, never pickle


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupted (not JSON: {err})") from None


def read_safetensors(path: Path, device) -> dict:
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path} is corrupted ({type(err).__name__}: {err})") from None


def tensors_to_json(obj, key: str, tensors: dict):
    """``obj`` as JSON, its tensors moved into ``tensors`` under their path; tuples and
    int-keyed dicts (an optimiser's state) are marked so that :func:`tensors_from_json` restores
    them."""
    import torch  # here: the light commands import this module without torch

    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) for k in obj):
            return {
                "__int_keys__": [
                    [k, tensors_to_json(v, f"{key}.{k}", tensors)] for k, v in obj.items()
                ]
            }
        return {
            str(k): tensors_to_json(v, f"{key}.{k}" if key else str(k), tensors)
            for k, v in obj.items()
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [tensors_to_json(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [tensors_to_json(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def tensors_from_json(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__int_keys__" in obj:
            return {int(k): tensors_from_json(v, tensors) for k, v in obj["__int_keys__"]}
        if "__tuple__" in obj:
            return tuple(tensors_from_json(v, tensors) for v in obj["__tuple__"])
        return {k: tensors_from_json(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tensors_from_json(v, tensors) for v in obj]
    return obj
