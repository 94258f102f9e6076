"""``gsae-train``: train one SAE per group of layers from a single model forward per batch.

A run: resolve the groups (``--groups auto|N|per-layer|even:N`` or ``--groups-file``), estimate
each layer's activation scale, then loop: one forward (stopping after the deepest layer any group
needs), and for each group an SAE step on, per token, the activation of a layer drawn uniformly
from the group (seeded), or of every layer of the group with ``--layers-per-token all``.

Checkpoints (every ``--save-every`` tokens, and on Ctrl-C) hold every SAE, its optimiser and
dead-latent counters, the sampling RNG and the data position, written as one directory swap, so
``--resume OUT`` continues exactly as if the run had not stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import grouping as gp
from .io import atomic_dir, recover_dir, write_json
from .sae import (
    B_DEC_INITS,
    ENCODER_INITS,
    OPTIMIZERS,
    Sae,
    SaeConfig,
    SaeTrainer,
    activation_scales,
)

STEP_HOOK = None  # called with the Run after every step (tests use it to interrupt a run)
RUN_FILE = "run.json"
CHECKPOINT = "checkpoint"
# the bundled demo model is tiny: these replace the paper-scale defaults unless set by flag
DEMO_DEFAULTS = {"tokens": "1M", "grouping_tokens": "50k", "scale_tokens": "20k",
                 "batch_tokens": 2048, "ctx_len": 128, "k": 32, "dead_threshold": "100k",
                 "save_every": "100k", "repeat": True}  # fmt: skip
DEFAULTS = {"tokens": "1B", "grouping_tokens": "10M", "scale_tokens": "5M", "batch_tokens": 32768,
            "ctx_len": 1024, "k": 128, "dead_threshold": "10M", "save_every": "100M",
            "repeat": False}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    from .cli import add_data_args

    p = argparse.ArgumentParser(
        prog="gsae-train",
        description="Train Group-SAEs: one TopK SAE per group of similar layers, all from one "
        "model forward per batch. `gsae-train --model demo --dataset demo --out OUT` runs the "
        "whole pipeline offline on the bundled demo model.",
    )
    add_data_args(p)
    p.set_defaults(batch_size=None, ctx_len=None, repeat=None, model_dtype=None)
    p.add_argument("--out", required=False, default=None, help="output directory")
    p.add_argument(
        "--groups",
        default="auto",
        help="auto (AMAD < threshold), N, per-layer or even:N (default: auto)",
    )
    p.add_argument("--groups-file", default=None, help="a groups.json from gsae-groups")
    p.add_argument("--threshold", type=float, default=gp.DEFAULT_THRESHOLD)
    p.add_argument(
        "--include-last",
        action="store_true",
        help="group the last layer too (by default it gets its own SAE)",
    )
    p.add_argument("--tokens", default=None, help="token budget per SAE (default: 1B)")
    p.add_argument("--grouping-tokens", default=None, help="tokens for --groups auto (10M)")
    p.add_argument("--scale-tokens", default=None, help="tokens to estimate scales (5M)")
    p.add_argument("--batch-tokens", type=int, default=None, help="tokens per step (32768)")
    p.add_argument(
        "--layers-per-token",
        choices=["one", "all"],
        default="one",
        help="each SAE sees one random layer of its group per token (paper), or all",
    )
    p.add_argument("--expansion-factor", type=int, default=16)
    p.add_argument("--k", type=int, default=None, help="active latents (default: 128)")
    p.add_argument("--k-aux", type=int, default=None, help="AuxK latents (default: d/2)")
    p.add_argument("--auxk-alpha", type=float, default=1 / 32)
    p.add_argument("--dead-threshold", default=None, help="tokens before a latent is dead (10M)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="default 2e-4 / sqrt(m / 2^14) for adam, 5e-3 / sqrt(m / 2^14) for signum",
    )
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adam",
        help="adam (the paper's, default) or signum: schedule-free sign-SGD, "
        "sparsify's default, faster at short budgets",
    )
    p.add_argument(
        "--init",
        dest="init_encoder",
        choices=ENCODER_INITS,
        default="fit",
        help="encoder scale at init: fit (to the first batch, default), geometry "
        "(predicted from k, m, d) or paper (W_enc = W_dec^T)",
    )
    p.add_argument(
        "--init-b-dec",
        choices=B_DEC_INITS,
        default="mean",
        help="b_dec at init: mean (of the first batch, default), median "
        "(geometric) or zeros (the paper)",
    )
    p.add_argument("--scale-mode", choices=["mean_sq", "mean_norm", "none"], default="mean_sq")
    p.add_argument("--save-every", default=None, help="checkpoint interval in tokens (100M)")
    p.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default=None, metavar="OUT", help="continue the run in OUT")
    p.add_argument("--overwrite", action="store_true", help="replace a different run in --out")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases if installed")
    p.add_argument("--tensorboard", action="store_true", help="log to TensorBoard if installed")
    return p  # fmt: skip


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    defaults = DEMO_DEFAULTS if args.model == "demo" else DEFAULTS
    for key, value in {**DEFAULTS, **defaults}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.model = args.model or "pythia-160m"
    if args.model_dtype is None:  # bf16 forward on a GPU; a CPU has no fast bf16 matmul
        args.model_dtype = "bf16" if _device(args.device) != "cpu" else "fp32"
    args.batch_size = max(1, args.batch_tokens // args.ctx_len)
    for key in ("tokens", "grouping_tokens", "scale_tokens", "dead_threshold", "save_every"):
        setattr(args, key, gp.parse_count(getattr(args, key)))
    return args


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def group_name(layers: list[int]) -> str:
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    if len(layers) == 1:
        return f"layer_{layers[0]}"
    return (
        f"layers_{layers[0]}-{layers[-1]}" if contiguous else "layers_" + "_".join(map(str, layers))
    )  # noqa: E501


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------


def resolve_groups(args, loaded) -> tuple[list[list[int]], gp.Grouping]:
    """The groups to train (model layers each; the last layer alone unless grouped) and the
    grouping they come from (measured distances for auto and N, a layout otherwise)."""
    n = loaded.num_layers
    grouped = list(range(n if args.include_last or n == 1 else n - 1))
    spec = str(args.groups)
    if args.groups_file:
        grouping = gp.Grouping.load(args.groups_file)
        check_groups_file(grouping, args, n)
        groups = grouping.groups()
        grouped = grouping.layers
    elif spec == "auto" or spec.isdigit():
        from .cli import measure_model

        grouping = measure_model(_grouping_args(args))
        if spec.isdigit():
            if not 1 <= int(spec) < max(2, len(grouped)):
                raise ValueError(f"--groups {spec}: need 1 <= G < {len(grouped)} layers grouped")
            grouping.g_hat = int(spec)  # the partition trained: complete linkage at G
        groups = grouping.groups()
    elif spec == "per-layer" or spec.startswith("even:"):
        labels = list(range(len(grouped))) if spec == "per-layer" else gp.even_groups(
            len(grouped), _int(spec[5:], spec))  # fmt: skip
        g = max(labels) + 1
        grouping = gp.Grouping(args.model, grouped, [], 0, {g: gp.Partition(labels, float("nan"))},
                               g, args.threshold, extra={"groups_spec": spec})  # fmt: skip
        groups = grouping.groups()
    else:
        raise ValueError(f"--groups must be auto, N, per-layer or even:N, got {spec!r}")
    own = [[n - 1]] if (n - 1) not in grouped else []  # the last layer: its own SAE
    return groups + own, grouping


def _int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--groups must be auto, N, per-layer or even:N, got {spec!r}") from None


def _grouping_args(args) -> argparse.Namespace:
    g = argparse.Namespace(**vars(args))
    g.tokens = args.grouping_tokens
    g.center, g.cluster_space = False, "precomputed"
    return g


def check_groups_file(grouping: gp.Grouping, args, num_layers: int) -> None:
    bad = [layer for layer in grouping.layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"{args.groups_file}: layers {bad} out of range for {args.model} "
                         f"({num_layers} layers)")  # fmt: skip
    recorded = grouping.extra.get("num_model_layers")
    if recorded is not None and int(recorded) != num_layers:
        raise ValueError(f"{args.groups_file} was made for a model with {recorded} layers; "
                         f"{args.model} has {num_layers}")  # fmt: skip
    if grouping.model and Path(grouping.model).name != Path(args.model).name:
        raise ValueError(f"{args.groups_file} was made for model {grouping.model!r}, "
                         f"not {args.model!r}")  # fmt: skip


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class GroupState:
    """One group: its layers, SAE trainer and running metrics."""

    name: str
    layers: list[int]
    positions: torch.Tensor  # rows of the [L, N, d] activations that belong to the group
    layer_ids: torch.Tensor  # the model layer of each of those rows (on the device)
    trainer: SaeTrainer


def estimate_scales(batches, layers: list[int], tokens: int, mode: str) -> dict[int, float]:
    """Per-layer scale from the first ``tokens`` tokens of ``batches`` ([L, N, d] each)."""
    if mode == "none":  # nothing to measure: skip the pass over the data
        return dict.fromkeys(layers, 1.0)
    return dict(zip(layers, activation_scales(batches, tokens, mode), strict=True))


class Run:
    """A gsae-train run: set up from args (or a checkpoint), then ``train()``."""

    def __init__(self, args: argparse.Namespace, loaded):
        self.args = args
        self.loaded = loaded
        self.out = Path(args.out)
        self.device = next(loaded.model.parameters()).device
        # layer sampling runs on the device: no host-device copy in the loop
        self.generator = torch.Generator(device=self.device).manual_seed(args.seed)
        self.tokens_seen = 0
        self.steps = 0
        self.position = None  # data position after the last trained batch
        self.groups: list[GroupState] = []
        self.grouping: gp.Grouping | None = None
        self.log_file = None

    # ---- set-up

    def setup_groups(self, groups: list[list[int]], scales: dict[int, float]) -> None:
        a = self.args
        needed = sorted({layer for g in groups for layer in g})
        self.layers = needed
        index = {layer: i for i, layer in enumerate(needed)}
        for layers in groups:
            cfg = SaeConfig(
                d=self.loaded.d_model, expansion_factor=a.expansion_factor, k=a.k, k_aux=a.k_aux,
                auxk_alpha=a.auxk_alpha, dead_threshold=a.dead_threshold, lr=a.lr,
                scale_mode=a.scale_mode, scale_tokens=a.scale_tokens, seed=a.seed,
                optimizer=a.optimizer, init_encoder=a.init_encoder, init_b_dec=a.init_b_dec,
            )  # fmt: skip
            sae = Sae(cfg, layers, device=self.device)
            for layer in layers:
                sae.set_scale(layer, scales[layer])
            positions = torch.tensor([index[layer] for layer in layers], device=self.device)
            layer_ids = torch.tensor(layers, device=self.device)
            self.groups.append(
                GroupState(group_name(layers), layers, positions, layer_ids, SaeTrainer(sae))
            )

    # ---- one step

    def batch_for(self, group: GroupState, hidden: torch.Tensor):
        """(x [N', d], layer ids [N']) for one group from the [L, N, d] activations."""
        n = hidden.shape[1]
        if self.args.layers_per_token == "all":
            x = hidden[group.positions].flatten(0, 1)  # every layer of the group, every token
            return x, group.layer_ids.repeat_interleave(n)
        pick = torch.randint(len(group.layers), (n,), generator=self.generator, device=self.device)
        x = hidden[group.positions[pick], torch.arange(n, device=self.device)]  # [N, d]
        return x, group.layer_ids[pick]

    def step(self, hidden: torch.Tensor) -> list:
        outs = []
        for group in self.groups:
            x, layer = self.batch_for(group, hidden)
            outs.append(group.trainer.step(x, layer, check_finite=False))
        self.tokens_seen += hidden.shape[1]
        self.steps += 1
        return outs

    # ---- files

    def run_config(self) -> dict:
        keys = ("model", "dataset", "split", "column", "ctx_len", "batch_tokens", "groups",
                "groups_file", "include_last", "layers_per_token", "expansion_factor", "k",
                "k_aux", "auxk_alpha", "dead_threshold", "lr", "scale_mode", "seed",
                "threshold", "optimizer", "init_encoder", "init_b_dec")  # fmt: skip
        return {k: getattr(self.args, k) for k in keys}

    def save_checkpoint(self) -> None:
        with atomic_dir(self.out / CHECKPOINT) as tmp:
            for group in self.groups:
                (tmp / group.name).mkdir()
                group.trainer.save_files(tmp / group.name)
            state = {
                "tokens_seen": self.tokens_seen,
                "steps": self.steps,
                "generator": self.generator.get_state(),
                "position": self.position.to_dict() if self.position else None,
                "groups": [g.layers for g in self.groups],
            }
            torch.save(state, tmp / "run_state.pt")

    def load_checkpoint(self) -> dict:
        path = self.out / CHECKPOINT
        recover_dir(path)
        state = torch.load(path / "run_state.pt", weights_only=False)
        for group in self.groups:
            group.trainer.load_files(path / group.name)
        self.tokens_seen, self.steps = state["tokens_seen"], state["steps"]
        self.generator.set_state(state["generator"])
        return state

    def save_outputs(self, seconds: float, final: dict) -> None:
        for group in self.groups:
            with group.trainer.averaged():  # signum: the averaged weights are the model
                group.trainer.sae.save(self.out / group.name)
        if self.grouping is not None:
            self.grouping.save(self.out / "groups.json")
        summary = {
            "model": self.args.model,
            "tokens": self.tokens_seen,
            "steps": self.steps,
            "seconds": round(seconds, 2),
            "tokens_per_second": round(self.tokens_seen / max(seconds, 1e-9), 1),
            # this session's loop only (a resumed run counts from the resume)
            "seconds_split": {k: round(v, 3) for k, v in getattr(self, "timing", {}).items()},
            "groups": {g.name: {"layers": g.layers, **final.get(g.name, {})} for g in self.groups},
        }
        write_json(self.out / "summary.json", summary)

    # ---- the loop

    def train(self, reader, stream) -> dict:
        """Train until the token budget; returns the per-group FVU of a held-out batch."""
        from .cli import progress_bar

        a = self.args
        start = time.perf_counter()
        timing = {"data": 0.0, "forward": 0.0, "sae": 0.0}
        next_save = (self.tokens_seen // a.save_every + 1) * a.save_every
        self.log_file = open(self.out / "log.jsonl", "a")  # noqa: SIM115
        self.sinks = make_sinks(a, self.out)
        batches = iter(stream)
        try:
            with progress_bar(a.tokens, "train") as bar:
                bar.update(self.tokens_seen)
                while self.tokens_seen < a.tokens:
                    t0 = time.perf_counter()
                    batch = next(batches, None)
                    if batch is None:
                        raise ValueError(f"the dataset ran out after {self.tokens_seen:,} tokens "
                                         f"of {a.tokens:,} (--repeat cycles over it)")  # fmt: skip
                    t1 = time.perf_counter()
                    hidden = reader(batch.input_ids, batch.attention_mask)
                    t2 = time.perf_counter()
                    outs = self.step(hidden)
                    t3 = time.perf_counter()
                    timing["data"] += t1 - t0
                    timing["forward"] += t2 - t1
                    timing["sae"] += t3 - t2
                    self.position = batch.position
                    bar.update(hidden.shape[1])
                    if self.steps % a.log_every == 0:
                        bar.set_postfix_str(self.log(outs, time.perf_counter() - start, timing))
                    if self.tokens_seen >= next_save:
                        self.save_checkpoint()
                        next_save += a.save_every
                    if STEP_HOOK is not None:
                        STEP_HOOK(self)
        except KeyboardInterrupt:
            self.save_checkpoint()  # Ctrl-C: keep everything trained so far
            raise
        finally:
            self.log_file.close()
        self.timing = timing
        self.save_checkpoint()
        held_out = next(batches, None)
        return (
            self.evaluate(reader(held_out.input_ids, held_out.attention_mask)) if held_out else {}
        )  # noqa: E501

    def log(self, outs, elapsed: float, timing: dict) -> str:
        record = {"step": self.steps, "tokens": self.tokens_seen, "elapsed": round(elapsed, 2),
                  "tokens_per_s": round(self.tokens_seen / max(elapsed, 1e-9), 1),
                  "seconds": {k: round(v, 3) for k, v in timing.items()}, "groups": {}}  # fmt: skip
        for group, out in zip(self.groups, outs, strict=True):
            skipped = int(group.trainer.skipped_steps)  # the sync point: once per log interval
            if skipped:
                raise FloatingPointError(
                    f"group {group.name}: {skipped} step(s) had a non-finite loss (NaN/inf in the "
                    "activations?); those steps were skipped and nothing was updated by them"
                )
            record["groups"][group.name] = {
                "fvu": round(float(out.fvu), 5), "auxk": round(float(out.auxk), 5),
                "l0": round(float(out.l0), 2), "dead": round(float(out.dead_fraction), 4),
            }  # fmt: skip
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        for sink in self.sinks:
            sink(record)
        return " ".join(f"{g.name}:{record['groups'][g.name]['fvu']:.3f}" for g in self.groups)

    @torch.no_grad()
    def evaluate(self, hidden: torch.Tensor) -> dict:
        """FVU of every group's SAE on each of its layers, for one held-out batch."""
        result = {}
        for group in self.groups:
            per_layer = {}
            with group.trainer.averaged():
                for pos, layer in zip(group.positions.tolist(), group.layers, strict=True):
                    out = group.trainer.sae(hidden[pos].float(), layer=layer)
                    per_layer[str(layer)] = round(float(out.loss.fvu), 5)
            mean = sum(per_layer.values()) / len(per_layer)
            result[group.name] = {"fvu": round(mean, 5), "fvu_per_layer": per_layer}
        return result


def make_sinks(args, out: Path) -> list:
    """TensorBoard and/or Weights & Biases loggers, when asked for and installed."""
    sinks = []

    def flat(record: dict) -> dict:
        return {f"{g}/{k}": v for g, m in record["groups"].items() for k, v in m.items()}

    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("gsae-train: --tensorboard: tensorboard is not installed", file=sys.stderr)
        else:
            writer = SummaryWriter(str(out / "tensorboard"))
            add = writer.add_scalar
            sinks.append(lambda r: [add(k, v, r["tokens"]) for k, v in flat(r).items()])
    if args.wandb:
        try:
            import wandb
        except ImportError:
            print("gsae-train: --wandb: wandb is not installed", file=sys.stderr)
        else:
            wandb.init(project="gsae", dir=str(out), config=_jsonable(vars(args)))
            sinks.append(lambda r: wandb.log(flat(r), step=r["tokens"]))
    return sinks


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def check_out_dir(args) -> None:
    """Refuse an output directory that holds a different run (or this one, unfinished)."""
    out = Path(args.out)
    run_file = out / RUN_FILE
    if args.resume:
        if not (out / CHECKPOINT).exists() and not (out / (CHECKPOINT + ".old")).exists():
            raise FileNotFoundError(f"--resume {out}: no checkpoint there to resume from")
        return
    if run_file.exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a gsae-train run: pass --resume {out} to continue "
                         "it or --overwrite to replace it")  # fmt: skip
    if out.exists() and any(out.iterdir()) and not run_file.exists() and not args.overwrite:
        raise ValueError(f"{out} is not empty and holds no gsae-train run; pick another --out "
                         "or pass --overwrite")  # fmt: skip


def prepare(argv=None) -> tuple[argparse.Namespace, object]:
    """Parse, validate everything that can be validated before any work, load the model."""
    from .activations import iter_texts, load_model

    args = parser().parse_args(argv)
    if args.resume:
        resume, run_file = args.resume, Path(args.resume) / RUN_FILE
        if not run_file.exists():
            raise FileNotFoundError(f"--resume {resume}: no gsae-train run there ({run_file})")
        saved = json.loads(run_file.read_text())
        args = argparse.Namespace(**{**vars(args), **saved["args"]})  # the run's own settings
        args.resume = args.out = resume
    if not args.out:
        raise ValueError("--out is required (or --resume OUT)")
    fill_defaults(args)
    check_out_dir(args)
    loaded = load_model(args.model, args.model_dtype, _device(args.device))
    SaeConfig(
        d=loaded.d_model,
        expansion_factor=args.expansion_factor,
        k=args.k,
        k_aux=args.k_aux,
        lr=args.lr,
        optimizer=args.optimizer,
        init_encoder=args.init_encoder,
        init_b_dec=args.init_b_dec,
    ).validate()  # k > m and friends, before any work
    iter_texts(args.dataset, args.split, args.column)  # fails now if the data cannot be opened
    return args, loaded


def train_main(argv=None) -> int:
    from .activations import ActivationReader, DatasetLoadError, ModelLoadError, StreamPosition
    from .cli import stream_hidden

    try:
        args, loaded = prepare(argv)
        out = Path(args.out)
        resume = bool(args.resume)
        if resume:
            grouping = gp.Grouping.load(out / "groups.json")
            state = torch.load(out / CHECKPOINT / "run_state.pt", weights_only=False)
            groups = state["groups"]
            scales = {layer: 1.0 for g in groups for layer in g}  # the checkpoint has the real ones
        else:
            groups, grouping = resolve_groups(args, loaded)
        print_plan(args, loaded, groups, grouping)
        run = Run(args, loaded)
        run.grouping = grouping
        if not resume:
            needed = sorted({layer for g in groups for layer in g})
            hidden, stream = stream_hidden(loaded, needed, args, args.scale_tokens)
            with stream:
                scales = estimate_scales(hidden, needed, args.scale_tokens, args.scale_mode)
        run.setup_groups(groups, scales)
        position = None
        if resume:
            saved = run.load_checkpoint()
            position = StreamPosition.from_dict(saved["position"]) if saved["position"] else None
        else:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / RUN_FILE, {"args": _jsonable(vars(args)), "config": run.run_config()})
            grouping.save(out / "groups.json")
        _, stream = stream_hidden(loaded, run.layers, args, args.tokens, position=position)
        reader = ActivationReader(loaded, run.layers)
        start = time.perf_counter()
        with stream:
            final = run.train(reader, stream)
        run.save_outputs(time.perf_counter() - start, final)
    except KeyboardInterrupt:
        print(f"\ninterrupted: checkpoint saved in {Path(args.out) / CHECKPOINT}; continue with "
              f"gsae-train --resume {args.out}", file=sys.stderr)  # fmt: skip
        return 130
    except (ModelLoadError, DatasetLoadError, ValueError, FileNotFoundError,
            FloatingPointError) as err:  # fmt: skip
        print(f"gsae-train: error: {err}", file=sys.stderr)
        return 2
    names = ", ".join(g.name for g in run.groups)
    print(
        f"done: {run.tokens_seen:,} tokens in {run.steps} steps; SAEs ({names}) and "
        f"summary.json in {args.out}"
    )
    return 0


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), list))}


def print_plan(args, loaded, groups, grouping) -> None:
    from .cli import model_costs

    n_grouped = len(grouping.layers)
    n_saes = len(groups)
    a_cost, t_cost, extra = model_costs(loaded, grouping.layers, args.ctx_len,
                                        args.expansion_factor, args.k, "sparse")  # fmt: skip
    saving = gp.compute_savings(n_saes - extra, n_grouped, a_cost, t_cost, extra)
    print(f"{args.model}: {loaded.num_layers} layers, d = {loaded.d_model}; {n_saes} SAEs "
          f"(m = {args.expansion_factor * loaded.d_model}, k = {args.k}; {args.optimizer}, "
          f"init {args.init_encoder}, b_dec {args.init_b_dec}):")  # fmt: skip
    for g in groups:
        print(f"  {group_name(g):<16} layers {g}")
    print(
        f"predicted compute saving against one SAE per layer: {100 * saving:.1f}% "
        f"(forward {a_cost / 1e6:.1f} MFLOP/token, SAE step {t_cost / 1e6:.1f} MFLOP/token)"
    )


def main() -> None:
    sys.exit(train_main())
