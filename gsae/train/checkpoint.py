"""The training checkpoint: JSON and safetensors only, written as one directory swap, with the
previous checkpoint kept beside it.

::

    OUT/checkpoint/        the latest: run_state.json (the manifest) + one folder per group SAE
                           (sae.safetensors, cfg.json, state.safetensors, state.json)
    OUT/checkpoint.prev/   the one before (to resume from if the latest is damaged)
    OUT/checkpoint.new/    a checkpoint being written

A save writes ``checkpoint.new`` completely, then its manifest, which lists every file with its
size, last (each file synced to disk first); then it swaps: ``checkpoint.prev`` is deleted,
``checkpoint`` becomes ``checkpoint.prev``, ``checkpoint.new`` becomes ``checkpoint``, each step
one rename. :func:`recover` runs before anything is read or written: a complete
``checkpoint.new`` is swapped in (the save had finished writing), an incomplete one deleted, so
an interruption at any instant (Ctrl-C, a kill, a power cut after the fsyncs) resumes from the
newest complete checkpoint. A failed write (a full disk) deletes ``checkpoint.new`` and leaves
the others as they were.

For several processes (distributed training, ``world`` given): rank 0 recovers and stages,
every process writes the groups it owns into ``checkpoint.new`` (replicated SAEs: rank 0 alone
writes them), they check in (:meth:`gsae.train.distributed.World.agree`), and rank 0 writes the
manifest and swaps: the same single swap, so the checkpoint is the old one or the new one, never
a mix. A write failing on any process fails the save on every process and leaves the previous
checkpoint. On resume, rank 0 recovers, then every process reads the groups it holds: the
checkpoint is one folder per group whoever wrote it, so it resumes on any number of processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..io import dumps_json, fsync_dir, fsync_tree, remove_temp_dirs, remove_tree
from ..run import CHECKPOINTS as NAMES
from ..run import MANIFEST, RunFolder

LATEST, PREVIOUS, STAGING, DAMAGED = NAMES[:4]  # the folder names are gsae.run's
FORMAT = "gsae-train checkpoint"
VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be used. ``path`` is the damaged file or folder; ``previous`` the
    manifest of an intact previous checkpoint to fall back on, if there is one."""

    def __init__(self, message: str, path: Path | None = None, previous: dict | None = None):
        super().__init__(message)
        self.path, self.previous = path, previous


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, no permission); nothing was replaced."""


# ---- writing


def stage(out: Path) -> Path:
    """A fresh, empty ``checkpoint.new`` to write into (after :func:`recover`)."""
    recover(out)
    staging = out / STAGING
    remove_tree(staging)
    staging.mkdir(parents=True)
    return staging


def write_group(staging: Path, name: str, trainer) -> None:
    """One group SAE's files (weights, config, optimiser and counters)."""
    (staging / name).mkdir()
    trainer.save_files(staging / name)


def commit(out: Path, staging: Path, state: dict) -> None:
    """Sync the staged files, write the manifest last, and swap the checkpoint in."""
    fsync_tree(staging)
    files = {
        str(p.relative_to(staging)): p.stat().st_size
        for p in sorted(staging.rglob("*"))
        if p.is_file()
    }
    manifest = {"format": FORMAT, "version": VERSION, **state, "files": files}
    with open(staging / MANIFEST, "w") as f:
        f.write(dumps_json(manifest))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(staging)
    _swap(out)


def save(out: Path, state: dict, trainers: dict, world=None) -> None:
    """One checkpoint of ``trainers`` (group name -> SaeTrainer) and the run's ``state`` (any
    JSON: tokens, steps, the data position, ...). A failed write raises
    :class:`CheckpointWriteError` and leaves the existing checkpoints as they were. With a
    distributed ``world``: a collective; ``trainers`` are the groups this process writes."""
    out = Path(out)
    if world is not None and world.distributed:
        return _save_together(out, state, trainers, world)
    try:
        staging = stage(out)
        for name, trainer in trainers.items():
            write_group(staging, name, trainer)
        commit(out, staging, state)
    except OSError as err:
        _discard_staging(out)
        raise _write_error(out, err) from err
    except BaseException:
        _discard_staging(out)  # e.g. a second Ctrl-C: an unfinished staging folder is useless
        raise


def _write_error(out: Path, err: OSError) -> CheckpointWriteError:
    return CheckpointWriteError(
        err.errno, f"cannot write a checkpoint in {out}: {err.strerror or err}"
    )


def _save_together(out: Path, state: dict, trainers: dict, world) -> None:
    """:func:`save` by every process: rank 0 stages, each writes its groups, rank 0 commits."""
    staging = out / STAGING

    def check_in(err: OSError | None) -> None:
        mine = None if err is None else (err.errno, err.strerror or str(err))
        failed = [(r, m) for r, m in enumerate(world.gather_objects(mine)) if m]
        if failed:
            if world.is_main:
                _discard_staging(out)
            rank, (errno, message) = failed[0]
            where = "" if rank == 0 else f" (process {rank})"
            text = f"cannot write a checkpoint in {out}{where}: {message}"
            raise CheckpointWriteError(errno, text)

    error = None
    if world.is_main:
        try:
            stage(out)
        except OSError as err:
            error = err
    check_in(error)
    try:
        for name, trainer in trainers.items():
            write_group(staging, name, trainer)
    except OSError as err:
        error = err
    check_in(error)
    if world.is_main:
        try:
            commit(out, staging, state)
        except OSError as err:
            error = err
    check_in(error)


def _discard_staging(out: Path) -> None:
    staging = out / STAGING
    try:
        if staging.exists() and not _complete(staging):
            remove_tree(staging)
    except OSError:
        pass  # recover() will try again


def _swap(out: Path) -> None:
    """Steps of the swap, each one rename; run again from any point it finishes the swap."""
    latest, previous, staging = out / LATEST, out / PREVIOUS, out / STAGING
    if previous.exists() and latest.exists():
        remove_tree(previous)  # renamed aside first, then deleted
    if latest.exists():
        os.replace(latest, previous)
    os.replace(staging, latest)
    fsync_dir(out)


# ---- recovering, reading


def recover(out: Path) -> None:
    """Finish a swap whose ``checkpoint.new`` is complete, delete an incomplete one and any
    half-deleted folder: afterwards ``checkpoint`` is the newest complete checkpoint."""
    out = Path(out)
    for name in NAMES:
        remove_temp_dirs(out / name)
    staging = out / STAGING
    if staging.exists():
        if _complete(staging):
            _swap(out)
        else:
            remove_tree(staging)


def exists(out: Path) -> bool:
    return RunFolder(out).has_checkpoint()


def _complete(folder: Path) -> bool:
    try:
        manifest = read_manifest(folder)
    except CheckpointError:
        return False
    return manifest is not None and not _damaged_files(folder, manifest)


def _damaged_files(folder: Path, manifest: dict) -> list[str]:
    wrong = []
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            wrong.append(name)
    return wrong


def read_manifest(folder: Path, missing_ok: bool = False) -> dict | None:
    """The run state of a checkpoint folder; None if there is none (with ``missing_ok``)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        if (folder / "run_state.pt").exists():
            raise CheckpointError(
                f"{folder} was written by an older gsae-train (pickle files, "
                "which are never loaded: they could run code); start the run "
                "again with --overwrite",
                folder,
            )
        if missing_ok and not folder.exists():
            return None
        raise CheckpointError(f"{folder} holds no {MANIFEST}: not a complete checkpoint", folder)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupted ({err})", path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gsae-train checkpoint", path)
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {manifest.get('version')}, this "
            f"gsae-train reads version {VERSION}",
            path,
        )
    return manifest


def load(out: Path, trainers: dict, names: list[str] | None = None, world=None) -> dict:
    """Recover, then load the latest checkpoint into ``trainers`` (group name -> SaeTrainer) and
    return its run state. ``names``: every group of the run, when ``trainers`` holds only some
    (the ones this process trains). Raises :class:`CheckpointError` naming the damaged file,
    with the previous checkpoint's state when that one is intact. With a distributed ``world``
    a collective: rank 0 recovers, then every process reads its own groups."""
    out = Path(out)
    together = world is not None and world.distributed
    if together:
        world.checked(recover, out) if world.is_main else world.agree()
    else:
        recover(out)
    try:
        manifest = _read_into(out / LATEST, trainers, sorted(names or trainers))
    except CheckpointError as err:
        err.previous = _intact_previous(out)
        if together:
            world.agree(err)
        raise
    if together:
        world.agree()
    return manifest


def _read_into(folder: Path, trainers: dict, names: list[str]) -> dict:
    manifest = read_manifest(folder)
    damaged = _damaged_files(folder, manifest)
    if damaged:
        raise CheckpointError(
            f"{folder / damaged[0]} is missing or truncated (its size is not "
            f"the one recorded in {MANIFEST})",
            folder / damaged[0],
        )
    if sorted(manifest.get("groups", {})) != names:
        raise CheckpointError(
            f"{folder} holds the SAEs {sorted(manifest.get('groups', {}))}, not this run's {names}",
            folder,
        )
    for name, trainer in trainers.items():
        try:
            trainer.load_files(folder / name)
        except (ValueError, FileNotFoundError) as err:
            raise CheckpointError(str(err), _named_path(err, folder / name)) from None
    return manifest


def _named_path(err: Exception, default: Path) -> Path:
    """The file an error message starts with (sae.py names the file it could not read)."""
    first = str(err).split(" ", 1)[0]
    return Path(first) if first.startswith(str(default)) else default


def _intact_previous(out: Path) -> dict | None:
    folder = out / PREVIOUS
    try:
        manifest = read_manifest(folder, missing_ok=True)
    except CheckpointError:
        return None
    if manifest is None or _damaged_files(folder, manifest):
        return None
    return manifest


def use_previous(out: Path) -> dict:
    """Set the latest checkpoint aside (as ``checkpoint.damaged``) and make the previous one the
    latest; returns its manifest."""
    out = Path(out)
    recover(out)
    previous = _intact_previous(out)
    if previous is None:
        raise CheckpointError(f"{out} has no intact previous checkpoint ({PREVIOUS})")
    remove_tree(out / DAMAGED)
    if (out / LATEST).exists():
        os.replace(out / LATEST, out / DAMAGED)
    os.replace(out / PREVIOUS, out / LATEST)
    fsync_dir(out)
    return previous
