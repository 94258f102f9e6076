"""The output folders of the commands: checked before any work, one writer at a time, and never
one command's folder taken by another.

- :func:`check_out` refuses, before any work, an ``--out`` that cannot be written (a file,
  ``/dev/null``, a fifo, no permission), that is or holds an input run, that holds another
  command's outputs, or (without ``--overwrite``) a non-empty folder the command did not write.
- Each output folder records the command that wrote it in :data:`MARKER` (with the settings a
  later run into it must keep, see :func:`check_settings`); :func:`owner` reads it, or infers
  it from the files of folders written before there was a marker.
- :func:`locked`: one writer per output folder. An ``fcntl.flock`` on ``.NAME.gsae-lock`` beside
  the folder, held for as long as the command writes: the kernel releases it when the process
  ends in any way (a crash or ``kill -9`` cannot leave it stuck; the file it leaves is taken
  over by the next writer). The file is removed when the command ends.
- The commands that replace their folder as a whole write it aside and swap it in
  (:func:`gsae.io.atomic_dir`): a crash or Ctrl-C leaves the earlier outputs, whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .io import write_json
from .run import CHECKPOINT, RUN_FILE, SUMMARY_FILE

MARKER = ".gsae-output.json"  # {"command": "gsae-eval", "settings": {...}}
LOCK_SUFFIX = ".gsae-lock"
REPLACED = ("gsae-export", "gsae-browse", "gsae-eval")  # the commands that swap in a new folder
SCAN_LIMIT = 20_000  # entries looked at when searching a folder for gsae outputs

# what a folder written before MARKER existed holds, per command (the first match wins)
LEGACY = (
    ("gsae-train", (RUN_FILE,)),
    ("gsae-train", (CHECKPOINT, SUMMARY_FILE)),
    ("gsae-export", ("gsae_export.json",)),
    ("gsae-browse", ("index.html", "collection")),
    ("gsae-autointerp", ("cache.jsonl",)),
    ("gsae-eval", ("report.html", "metrics.jsonl")),
    ("gsae-groups", ("groups.json", "distances.png")),
)


class OutDirError(ValueError):
    """An output folder that cannot be used as asked; the message says why."""


def owner(folder: str | os.PathLike) -> str | None:
    """The gsae command whose outputs ``folder`` holds, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / RUN_FILE).exists():
        return "gsae-train"  # a run's own files come first, whatever else is there
    marker = read_marker(folder)
    if marker is not None:
        return marker.get("command")
    for command, names in LEGACY:
        if all((folder / n).exists() for n in names):
            return command
    return None


def read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(folder: str | os.PathLike, command: str, settings: dict | None = None) -> None:
    write_json(Path(folder) / MARKER, {"command": command, "settings": settings or {}})


def gsae_outputs_inside(folder: Path) -> tuple[Path, str] | None:
    """The first folder below ``folder`` (itself excluded) holding gsae outputs, and whose."""
    seen = 0
    for root, dirs, _files in os.walk(folder):
        for d in dirs:
            seen += 1
            who = owner(Path(root) / d)
            if who is not None:
                return Path(root) / d, who
        if seen > SCAN_LIMIT:
            return None
    return None


def check_writable(out: Path) -> None:
    """``out`` is a folder this process can write, or a name it can create one under."""
    if out.exists() or out.is_symlink():
        mode = out.stat().st_mode if out.exists() else 0
        if not stat.S_ISDIR(mode):
            kind = "a file" if stat.S_ISREG(mode) else "not a folder (a device, fifo or link)"
            raise OutDirError(f"--out {out} is {kind}: give a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutDirError(f"--out {out}: cannot write there (permission denied)")
    existing = next((p for p in out.absolute().parents if p.exists()), None)
    if existing is None:  # the root folder
        return
    if not existing.is_dir():
        raise OutDirError(f"--out {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutDirError(f"--out {out}: cannot write in {existing} (permission denied)")
    _probe_write(out if out.is_dir() else existing, out)


def _probe_write(folder: Path, out: Path) -> None:
    """Create and remove a file in ``folder``: ``os.access`` says yes to root everywhere, even
    on a read-only mount or in /proc, where the first write after the work would fail."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".gsae-probe-"):
            pass
    except OSError as err:
        raise OutDirError(f"--out {out}: cannot write in {folder} ({err.strerror})") from None


def check_out(
    out: str | os.PathLike,
    command: str,
    *,
    inputs: Iterable = (),
    overwrite: bool | None = False,
    replaced: bool = True,
) -> None:
    """Refuse ``out`` for ``command`` before any work (see the module's docstring).

    ``inputs``: the folders the command reads (runs, collections): ``out`` may be none of them
    nor a folder above one. ``overwrite``: None for a command without that flag. ``replaced``:
    the command replaces ``out`` as a whole (otherwise it only adds its own files to it, and a
    non-empty folder of the user's is fine)."""
    out = Path(out)
    check_writable(out)
    target = out.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if source == target or target in source.parents:
            what = "is" if source == target else "holds"
            raise OutDirError(
                f"--out {out} {what} {source}, which {command} reads: it would be "
                "replaced; pick another --out"
            )
    for above in target.parents:
        if owner(above) in REPLACED:
            raise OutDirError(
                f"--out {out} is inside {above}, {owner(above)}'s outputs, which "
                "are replaced as a whole: pick another --out"
            )
    if not out.is_dir():
        return
    who = owner(out)
    if who == "gsae-train":
        raise OutDirError(
            f"--out {out} holds a gsae-train run: it would be replaced; pick another --out"
        )
    if who is not None and who != command:
        raise OutDirError(
            f"--out {out} holds the outputs of {who}: {command} would replace or "
            f"mix with them; pick another --out"
        )
    if who is None and owner(target.parent) == "gsae-train" and any(out.iterdir()):
        raise OutDirError(
            f"--out {out} is a folder of the gsae-train run {target.parent}: pick another --out"
        )
    if who == command or not replaced or not any(out.iterdir()):
        return
    if not overwrite:
        how = "empty it" if overwrite is None else "pass --overwrite to replace it"
        raise OutDirError(
            f"--out {out} is a non-empty folder that {command} did not write; "
            f"pick another --out or {how}"
        )
    inside = gsae_outputs_inside(out)
    if inside is not None:
        raise OutDirError(
            f"--out {out} holds {inside[0]} ({inside[1]}'s outputs): --overwrite "
            "would delete it; pick another --out"
        )


def check_settings(out: str | os.PathLike, settings: dict) -> None:
    """Refuse a rerun into ``out`` whose ``settings`` differ from those recorded there, naming
    each flag (as gsae-train --resume does)."""
    marker = read_marker(Path(out)) or {}
    kept = marker.get("settings") or {}
    changed = [k for k in settings if k in kept and kept[k] != settings[k]]
    if changed:
        names = ", ".join(f"{_flag(k)} (it has {kept[k]!r})" for k in changed)
        raise OutDirError(
            f"--out {out} was made with other settings: {names}; give the same "
            "values to continue it, or pick another --out"
        )


def _flag(key: str) -> str:
    return "RUN" if key == "run" else "--" + key.replace("_", "-")


def lock_path(out: str | os.PathLike) -> Path:
    out = Path(out).resolve()
    return out.with_name(f".{out.name}{LOCK_SUFFIX}")


@contextlib.contextmanager
def locked(out: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold ``out``'s writer lock for the block; refuse at once when another process holds it."""
    lock = acquire(out, command)
    try:
        yield
    finally:
        lock.close()


class Lock:
    """A held writer lock: :meth:`close` removes its file and releases it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def close(self) -> None:
        if self.fd is None:
            return
        # removed while still held: a process that opened the file meanwhile finds, once it
        # gets the lock, that the name no longer points to it, and starts again (acquire)
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def acquire(out: str | os.PathLike, command: str) -> Lock:
    """Take ``out``'s writer lock (``.NAME.gsae-lock`` beside it); closing it, or the process
    ending in any way, releases it."""
    import fcntl

    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise OutDirError(
                f"{out} is being written by another process{_holder(path)}: wait for it to "
                "end, or pick another --out"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # the file is still the one under the name: the lock is ours
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it as we opened it: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {command}\n".encode())
    return Lock(path, fd)


def _holder(path: Path) -> str:
    try:
        pid, command = path.read_text().split(maxsplit=1)
        return f" ({command.strip()}, pid {int(pid)})"
    except (OSError, ValueError):
        return ""


def kept_words(out: Path, existed: bool) -> str:
    """What an interrupted command left in ``out``, in words."""
    if existed:
        return f"{out} keeps its earlier outputs, unchanged"
    return f"nothing was written to {out}"


@contextlib.contextmanager
def claim(
    out: str | os.PathLike, command: str, *, inputs: Iterable = (), **checks
) -> Iterator[None]:
    """``out`` checked (:func:`check_out`, with its keywords ``checks``: ``overwrite``,
    ``replaced``) and locked for ``command`` for the block."""
    out = Path(out)
    inputs = list(inputs)  # checked twice
    check_out(out, command, inputs=inputs, **checks)
    with locked(out, command):
        # again under the lock: another process may have written there meanwhile
        check_out(out, command, inputs=inputs, **checks)
        yield
