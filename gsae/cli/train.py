"""``gsae-train``: train one SAE per group of layers from a single model forward per batch.

A run: resolve the groups (``--groups auto|N|per-layer|even:N`` or ``--groups-file``), estimate
each layer's activation scale, then loop: one forward (stopping after the deepest layer any group
needs), and for each group an SAE step on, per token, the activation of a layer drawn uniformly
from the group, or of every layer of the group with ``--layers-per-token all``. Every stage is
saved as soon as it is done and ``--resume OUT`` continues from there (see gsae.train).
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
from ..sae import B_DEC_INITS, BASE_LR, ENCODER_INITS, OPTIMIZERS, SaeConfig
from ..train import (
    RECIPES,
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
from ..train.settings import parse_save_every
from ..train.step import SAE_PRECISIONS
from ..units import parse_count
from .common import add_data_args, data_defaults

# the paper's settings; the bundled demo model is tiny and gets its own unless set by flag
DEFAULTS = {
    "tokens": "1B",
    "grouping_tokens": "10M",
    "scale_tokens": "5M",
    "batch_tokens": 32768,
    "k": 128,
    "dead_threshold": "10M",
    "save_every": RunSettings.save_every,
    "repeat": False,
    "groups": "auto",
    "threshold": gp.DEFAULT_THRESHOLD,
    "layers_per_token": "one",
    "expansion_factor": 16,
    "auxk_alpha": 1 / 32,
    "scale_mode": "mean_sq",
    "recipe": "default",
    "optimizer": SaeConfig.optimizer,
    "average_power": SaeConfig.average_power,
    "sae_precision": "auto",
    "init_encoder": SaeConfig.init_encoder,
    "init_b_dec": SaeConfig.init_b_dec,
    "log_every": 20,
    "seed": 0,
    "include_last": False,
    "wandb": False,
    "tensorboard": False,
    "distribute_saes": False,
    "dist_timeout": 600.0,
    "check_replicas": False,
}
DEMO_DEFAULTS = {
    "tokens": "1M",
    "grouping_tokens": "50k",
    "scale_tokens": "20k",
    "batch_tokens": 2048,
    "ctx_len": 128,
    "k": 32,
    "dead_threshold": "100k",
    "save_every": "100k",
}
# the demo corpus's own: its train part (the held-out part is gsae-eval's) is smaller than the
# demo model's 1M-token budget; another dataset read by the demo model stops at its end
DEMO_DATA_DEFAULTS = {"repeat": True}
COUNTS = ("tokens", "grouping_tokens", "scale_tokens", "dead_threshold")
NOT_SETTINGS = ("out", "resume", "overwrite", "previous_checkpoint")


def parser() -> argparse.ArgumentParser:
    """Every default is None here and filled by :func:`settings_from_args`, so that the flags
    given on the command line are known (``--resume`` accepts only some)."""
    p = argparse.ArgumentParser(
        prog="gsae-train",
        description="Train Group-SAEs: one TopK SAE per group of similar layers, all from one "
        "model forward per batch. `gsae-train --model demo --dataset demo --out OUT` runs the "
        "whole pipeline offline on the bundled demo model.",
    )
    add_data_args(p)
    add = p.add_argument
    add("--out", help="output directory")
    add("--groups", help="auto (AMAD < threshold), N, per-layer or even:N (default: auto)")
    add("--groups-file", help="a groups.json from gsae-groups (with --groups N: its partition N)")
    add(
        "--threshold", type=float, help=f"AMAD threshold for auto (default: {gp.DEFAULT_THRESHOLD})"
    )
    add(
        "--include-last",
        action="store_true",
        default=None,
        help="group the last layer too (by default it gets its own SAE)",
    )
    add("--tokens", help="token budget per SAE (default: 1B)")
    add("--grouping-tokens", help="tokens for --groups auto or N (default: 10M)")
    add("--scale-tokens", help="tokens to estimate the activation scales (default: 5M)")
    add("--batch-tokens", type=int, help="tokens per step (default: 32768)")
    add(
        "--layers-per-token",
        choices=["one", "all"],
        help="each SAE sees one random layer of its group per token (paper), or all",
    )
    add("--expansion-factor", type=int, help="latents per dimension (default: 16)")
    add("--k", type=int, help="active latents (default: 128)")
    add("--k-aux", type=int, help="AuxK latents (default: d/2)")
    add("--auxk-alpha", type=float, help="AuxK weight (default: 1/32)")
    add("--dead-threshold", help="tokens without firing before a latent is dead (default: 10M)")
    add(
        "--lr",
        type=float,
        help="default "
        + ", ".join(f"{lr:g} / sqrt(m / 2^14) for {name}" for name, lr in BASE_LR.items()),
    )
    add(
        "--recipe",
        choices=list(RECIPES),
        help="default: gsae's tuned optimiser and init; paper: the paper's Table 1 setting "
        "(Adam at 2e-4 / sqrt(m / 2^14), --init paper, --init-b-dec zeros, --model-dtype fp32). "
        "Flags given override the recipe's values",
    )
    add(
        "--optimizer",
        choices=OPTIMIZERS,
        help=f"{SaeConfig.optimizer} (default) or adam (the paper's); signum is schedule-free "
        "sign-SGD, as sparsify's default, with gsae's tuned learning rate and averaging (its "
        "averaged weights are evaluated and saved)",
    )
    add(
        "--average-power",
        type=float,
        help="signum: step t weighs t^r in the averaged weights (default: "
        f"{SaeConfig.average_power}; 0 is the plain mean, sparsify's)",
    )
    add(
        "--sae-precision",
        choices=SAE_PRECISIONS,
        help="the SAE encoder's matmul: auto (default: bf16 on a GPU, fp32 on a CPU), bf16 or "
        "tf32 (tensor cores, fp32 sums; weights and optimiser state stay fp32) or fp32 (the "
        "paper's)",
    )
    add(
        "--init",
        dest="init_encoder",
        choices=ENCODER_INITS,
        help="encoder scale at init: fit (to the first batch, default), geometry (predicted "
        "from k, m and d) or paper (W_enc = W_dec^T)",
    )
    add(
        "--init-b-dec",
        choices=B_DEC_INITS,
        help="b_dec at init: mean (of the first batch, default), median (geometric) or zeros "
        "(the paper's)",
    )
    add("--scale-mode", choices=["mean_sq", "mean_norm", "none"], help="(default: mean_sq)")
    add(
        "--save-every",
        help="checkpoint interval: a time (30s, 15m, 1h; lowercase m is minutes) or tokens "
        f"(100M, 500k) (default: {RunSettings.save_every}: an exception or a kill loses at most "
        "that much work)",
    )
    add("--log-every", type=int, help="steps between log lines (default: 20)")
    add("--seed", type=int, help="(default: 0)")
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
    add(
        "--distribute-saes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with several processes (torchrun): each process trains whole group SAEs and "
        "receives the activations they need (default: every SAE on every process; a resumed "
        "run may switch)",
    )
    add(
        "--data-shards",
        type=int,
        help="split the text into this many shards, a part of every step's batch each (default: "
        "the number of processes; fixed for the run: it decides the batches)",
    )
    add(
        "--dist-timeout",
        type=float,
        help="seconds a process waits for the others in a collective before the job stops "
        "(default: 600)",
    )
    add(
        "--check-replicas",
        action="store_true",
        default=None,
        help="at each log step, check that every copy of each SAE is identical (debugging)",
    )
    add("--wandb", action="store_true", default=None, help="log to Weights & Biases if installed")
    add("--tensorboard", action="store_true", default=None, help="log to TensorBoard if installed")
    flags = setting_flags(p)
    resume.help = (
        f"continue the run in OUT; it may take {', '.join(flags[k] for k in RESUMABLE)} (the "
        "rest is the run's own)"
    )
    return p


def setting_flags(p: argparse.ArgumentParser) -> dict[str, str]:
    """Each flag by the name its value is stored under in the run's settings: the parser is
    the one source (``init_encoder`` is ``--init``)."""
    return {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}


def sae_fields(args: argparse.Namespace) -> dict:
    """The SaeConfig fields set by flags (d comes from the model): one line per field."""
    return dict(
        expansion_factor=args.expansion_factor,
        k=args.k,
        k_aux=args.k_aux,
        auxk_alpha=args.auxk_alpha,
        dead_threshold=args.dead_threshold,
        lr=args.lr,
        scale_mode=args.scale_mode,
        scale_tokens=args.scale_tokens,
        seed=args.seed,
        optimizer=args.optimizer,
        average_power=args.average_power,
        init_encoder=args.init_encoder,
        init_b_dec=args.init_b_dec,
    )


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The run's settings: the flags given, then the demo's or the paper's defaults."""
    args = argparse.Namespace(**vars(args))
    recipe = RECIPES[args.recipe or DEFAULTS["recipe"]]
    defaults = {**DEFAULTS, **(DEMO_DEFAULTS if args.model == "demo" else {})}
    defaults.update(DEMO_DATA_DEFAULTS if args.dataset == "demo" else {})
    defaults.update(recipe)  # the recipe's values win over the defaults, the flags over both
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    data_defaults(args)  # after the run's own: the demo's --repeat must not be reset
    for key in COUNTS:
        setattr(args, key, parse_count(getattr(args, key)))
    args.save_every = parse_save_every(args.save_every)
    run_fields = set(RunSettings.__dataclass_fields__) - {"sae"}
    return RunSettings(**{k: getattr(args, k) for k in run_fields}, sae=sae_fields(args)).check()


def resumed_settings(args: argparse.Namespace) -> RunSettings:
    """The saved run's settings, with the flags --resume may change; any other flag given with
    a different value is refused, naming it."""
    if args.out and Path(args.out) != Path(args.resume):
        raise ValueError(f"--out {args.out} and --resume {args.resume}: give only --resume")
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
