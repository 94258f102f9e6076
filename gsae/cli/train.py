"""``gsae-train``: train one SAE per group of layers from a single model forward per batch.

A run: resolve the groups (``--groups auto|N|per-layer|even:N`` or ``--groups-file``), estimate
each layer's activation scale, then loop: one forward (stopping after the deepest layer any group
needs), and for each group an SAE step on, per token, the activation of a layer drawn uniformly
from the group, or of every layer of the group with ``layers_per_token: "all"`` (a --config
setting). Every stage is saved as soon as it is done and ``--resume OUT`` continues from there
(see gsae.train).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from pathlib import Path

from .. import grouping as gp
from ..hf.models import ModelLoadError
from ..hf.texts import DatasetLoadError
from ..progress import set_progress
from ..run import DAMAGED_CHECKPOINT
from ..sae import SaeSettings
from ..train import (
    RESUMABLE,
    CheckpointError,
    DataExhausted,
    NonFiniteLoss,
    RunSettings,
    StepFailed,
    TrainingRun,
)
from ..train.distributed import CollectiveError, PeerFailed, init_world
from ..train.groups import group_name
from ..train.settings import resolve_settings
from .common import add_options

# flags of earlier versions whose settings are now research settings, set in a --config file
FORMER_FLAGS = {
    "--init": "init_encoder",
    "--init-b-dec": "init_b_dec",
    "--average-power": "average_power",
    "--scale-mode": "scale_mode",
    "--k-aux": "k_aux",
    "--auxk-alpha": "auxk_alpha",
    "--layers-per-token": "layers_per_token",
    "--check-replicas": "check_replicas",
}
NOT_SETTINGS = ("out", "resume", "overwrite", "previous_checkpoint", "config")


def parser() -> argparse.ArgumentParser:
    """The flags are the :func:`gsae.options.option` fields of RunSettings and SaeSettings,
    each None unless given, so that the flags given are known (``--resume`` accepts only
    some); :func:`settings_from_args` fills in the rest."""
    p = argparse.ArgumentParser(
        prog="gsae-train",
        description="Train Group-SAEs: one TopK SAE per group of similar layers, all from one "
        "model forward per batch. `gsae-train --model demo --dataset demo --out OUT` runs the "
        "whole pipeline offline on the bundled demo model.",
    )
    add_options(p, RunSettings)
    add_options(p, SaeSettings)
    add = p.add_argument
    add("--out", help="output directory")
    add(
        "--config",
        metavar="JSON",
        help="settings by name, as a run's run.json holds them (its whole file will do): the "
        "research settings that have no flag (init_encoder, k_aux, layers_per_token, ...: see "
        "docs/training.md); flags given override it",
    )
    resume = add("--resume", metavar="OUT")
    add(
        "--previous-checkpoint",
        action="store_true",
        default=None,
        help="with --resume: continue from the checkpoint before the latest (if it is damaged)",
    )
    add(
        "--overwrite",
        action="store_true",
        default=None,
        help="remove the run in --out first, then start a new one",
    )
    for flag, name in FORMER_FLAGS.items():
        add(flag, action=_Moved, nargs="?", help=argparse.SUPPRESS, dest=f"_former_{name}")
    flags = setting_flags(p)
    resumable = ", ".join(flags[k] for k in RESUMABLE if k in flags)
    resume.help = f"continue the run in OUT; it may take {resumable} (the rest is the run's own)"
    return p


class _Moved(argparse.Action):
    """A flag of an earlier version: one line naming where its setting went."""

    def __call__(self, parser, namespace, values, option_string=None):
        name = self.dest.removeprefix("_former_")
        parser.error(f"{option_string} is no longer a flag: set {name} in a --config file")


def setting_flags(p: argparse.ArgumentParser) -> dict[str, str]:
    """Each flag by the name its value is stored under in the run's settings."""
    return {
        a.dest: a.option_strings[0]
        for a in p._actions
        if a.option_strings and not a.dest.startswith("_former_")
    }


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The run's settings: the flags given, then the --config file's, the recipe's, and the
    demo's or the paper's defaults."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in NOT_SETTINGS}
    return resolve_settings(given, getattr(args, "config", None))


def resumed_settings(args: argparse.Namespace) -> RunSettings:
    """The saved run's settings, with the flags --resume may change; any other flag given with
    a different value is refused, naming it."""
    if args.out and Path(args.out) != Path(args.resume):
        raise ValueError(f"--out {args.out} and --resume {args.resume}: give only --resume")
    if args.config:
        raise ValueError(f"--config {args.config} and --resume: a resumed run keeps its settings")
    saved = RunSettings.read(args.resume)
    given = {k for k, v in vars(args).items() if v is not None and k not in NOT_SETTINGS}
    asked = settings_from_args(args).flags()
    kept = saved.flags()
    changed = sorted(k for k in given if k in kept and asked[k] != kept[k])
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        had = {k: "its default" if kept[k] is None else repr(kept[k]) for k in refused}
        flags = setting_flags(parser())
        names = ", ".join(f"{flags[k]} (the run has {had[k]})" for k in refused)
        raise ValueError(
            f"--resume keeps the run's own settings; these cannot change: {names}. "
            "They would make it another run: start one with a new --out"
        )
    for key in changed:
        setattr(saved, key, asked[key])
    return saved


def print_plan(run: TrainingRun) -> None:
    s, loaded, groups = run.settings, run.loaded, run.groups
    cfg = s.sae_config(loaded.d_model)
    grouped = run.grouping.layers
    a_cost, t_cost, extra = gp.model_costs(loaded, grouped, s.ctx_len, cfg.m // cfg.d, cfg.k)
    saving = gp.compute_savings(len(groups) - extra, len(grouped), a_cost, t_cost, extra)
    capped = f" (capped at the {s.ctx_len} positions {s.model} takes)" if run.ctx.capped else ""
    print(
        f"{s.model}: {loaded.num_layers} layers, d = {loaded.d_model}; context {s.ctx_len} "
        f"tokens{capped}; {len(groups)} SAEs (m = {cfg.m}, k = {cfg.k}; {cfg.optimizer}, "
        f"init {cfg.init_encoder}, b_dec {cfg.init_b_dec}):"
    )
    for g in groups:
        print(f"  {group_name(g):<16} layers {g}")
    print(
        f"predicted compute saving against one SAE per layer: {100 * saving:.1f}% "
        f"(forward {a_cost / 1e6:.1f} MFLOP/token, SAE step {t_cost / 1e6:.1f} MFLOP/token)"
    )
    if run.resume:
        print(f"resuming from {run.resumed_from}")
    if run.previous_checkpoint:
        print(f"the damaged checkpoint is set aside in {run.out / DAMAGED_CHECKPOINT}")


def main(argv=None) -> int:
    worlds: list = []
    code = train(parser().parse_args(argv), worlds)
    if worlds and worlds[0].distributed:
        # one of several processes: end it here. Once torch.distributed is initialised,
        # transformers' from_pretrained keeps a reference to the process group, whose gloo
        # threads are then torn down among the interpreter's last destructors: now and then
        # that aborts (SIGABRT) a run that succeeded. The process group is closed already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def train(args: argparse.Namespace, worlds: list) -> int:
    """The run; appends its World to ``worlds`` as soon as there is one."""
    run, world = None, None
    try:
        if args.resume:
            settings, out = resumed_settings(args), args.resume
        elif args.out:
            settings, out = settings_from_args(args), args.out
        else:
            raise ValueError("--out is required (or --resume OUT)")
        world = init_world(settings.device, settings.dist_timeout)  # one process: no-op
        worlds.append(world)
        set_progress(world.is_main)
        run = TrainingRun(
            out,
            settings,
            resume=bool(args.resume),
            overwrite=bool(args.overwrite),
            previous_checkpoint=bool(args.previous_checkpoint),
            world=world,
        )
        run.prepare()
        run.resolve_groups()
        if world.is_main:
            print_plan(run)
        run.estimate_scales()
        summary = run.train()
    except KeyboardInterrupt:
        with held_ctrl_c():  # a further Ctrl-C: let the message finish
            return stopped(run, "interrupted", 130)
    except (DataExhausted, NonFiniteLoss) as err:
        hint = (
            " (--repeat cycles over it, or --tokens N ends the run earlier)"
            if isinstance(err, DataExhausted)
            else ""
        )
        return stopped(run, f"{err}{hint}", 1)
    except StepFailed as err:  # e.g. a CUDA out-of-memory: the traceback, then what was kept
        traceback.print_exception(err.__cause__, file=sys.stderr)
        return stopped(run, str(err), 1)
    except PeerFailed:  # another process failed and printed its own error
        return 1
    except CollectiveError as err:  # another process died, or the timeout passed
        print(f"gsae-train: error: {err}", file=sys.stderr)
        world = None  # the process group is broken: tearing it down could wait for the dead
        return 1
    except CheckpointError as err:
        error(world, err)
        if err.previous is not None and _main(world):
            print(
                f"the previous checkpoint ({err.previous['tokens']:,} tokens, step "
                f"{err.previous['steps']}) is intact: continue from it with gsae-train "
                f"--resume {run.out} --previous-checkpoint",
                file=sys.stderr,
            )
        return 2
    except (ModelLoadError, DatasetLoadError, ValueError, FileNotFoundError) as err:
        error(world, err)
        return 2
    except OSError as err:  # a full disk, no permission
        if run is None or not run.written:
            error(world, err)
            return 2
        return stopped(run, f"cannot write in {run.out}: {err}", 1)
    finally:
        if run is not None:
            run.close()  # the lock on the output folder
        if world is not None:
            world.close()
    if world.is_main:
        names = ", ".join(summary["groups"])
        print(
            f"done: {summary['tokens']:,} tokens in {summary['steps']} steps; SAEs ({names}) and "
            f"summary.json in {run.out}"
        )
    return 0


def _main(world) -> bool:
    return world is None or world.is_main


def error(world, err: BaseException) -> None:
    """An error this process met: every process that meets it says so, naming itself when
    there are several (the same error on all of them: rank 0 alone)."""
    where = f" (process {world.rank})" if world is not None and world.distributed else ""
    print(f"gsae-train: error{where}: {err}", file=sys.stderr)


@contextlib.contextmanager
def held_ctrl_c():
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to set
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stopped(run: TrainingRun | None, why: str, code: int) -> int:
    """Say why the run stopped and, truthfully, what is on disk to continue from (with several
    processes: the first one says it)."""
    if run is not None and not run.world.is_main:
        return code
    if run is None or not run.written:
        stage = f" while {run.stage}" if run else ""
        print(
            f"\ngsae-train: {why}{stage}; nothing of this run was written yet: run the same "
            "command again",
            file=sys.stderr,
        )
        return code
    if run.run is not None and run.run.guard.broken:
        why += " inside a training step (Ctrl-C twice): that step was not saved"
    elif code == 130 and run.stage != "training":
        why += f" while {run.stage}"
    kept = run.describe()
    saes = "; the SAEs of what was trained and summary.json too" if run.outputs_written else ""
    print(
        f"\ngsae-train: {why}.\n{run.out} holds {kept}{saes}; continue with gsae-train "
        f"--resume {run.out}",
        file=sys.stderr,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
