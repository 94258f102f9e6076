"""The training step of one :class:`~gsae.sae.Sae`: :class:`SaeTrainer` owns the optimiser and
the dead-latent counters and runs one step at a time:

1. normalise x, encode (TopK + the AuxK selection among dead latents), decode, FVU + AuxK/32;
2. backward through the sparse kernels;
3. drop the part of each decoder row's gradient parallel to the row, optimiser step (signum by
   default, Adam for ``--recipe paper``), renormalise the rows to unit norm;
4. reset the counter of every latent that fired (value > 0), advance the others by N.

During the batch warm-up (the first ``warmup_tokens`` of the SAE) a batch is split into parts of
at most ``warmup_batch`` tokens, each one such step (:func:`warmup_split`).

A step whose loss is not finite changes nothing: with ``check_finite=True`` (the default) it
raises ``FloatingPointError`` before the update; with ``check_finite=False`` (the trainer's hot
loop, which must not sync the GPU every step) the optimiser (fused Adam, or signum through its
``found_inf``) skips the update on the device
and :attr:`SaeTrainer.skipped_steps` counts it, for the caller to check at its logging interval.

The trainer's optimiser and counters are saved beside the SAE's files as ``state.safetensors``
+ ``state.json`` (no pickle is ever loaded); a file that cannot be read gives a ``ValueError``
naming it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch
from gsae_kernels import TopKSAE
from gsae_kernels.topk_encode import EncodeOutput

from ..io import (
    atomic_dir,
    dumps_json,
    read_json,
    read_safetensors,
    save_safetensors,
    tensors_from_json,
    tensors_to_json,
)
from ..optim import ScheduleFreeSignSGD
from ..sae import Sae

STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"  # beside the SAE files


class StepOutput(NamedTuple):
    """Device scalars of one step (reading them syncs the GPU): the loss that was minimised,
    its FVU and AuxK terms, the mean number of active latents and the fraction of dead ones."""

    loss: torch.Tensor
    fvu: torch.Tensor
    auxk: torch.Tensor
    l0: torch.Tensor
    dead_fraction: torch.Tensor


SAE_PRECISIONS = ("auto", "bf16", "tf32", "fp32")
AUX_REFRESH_STEPS = 8  # GPU: steps between reads of the number of dead latents


def resolve_sae_precision(precision: str, device: torch.device) -> str:
    """The encoder matmul precision of training (``--sae-precision``): ``auto`` is bf16 on a
    GPU (tensor cores, fp32 sums; weights, gradients and optimiser state stay fp32) and fp32
    (the paper's) on a CPU, where bf16 would only be emulated."""
    if precision not in SAE_PRECISIONS:
        raise ValueError(f"precision must be one of {'|'.join(SAE_PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


class DeadCount:
    """The number of dead latents on the host, without a per-step sync on a GPU.

    On a CPU it is read every step (free). On a GPU the count is copied to pinned host memory
    behind an event every ``AUX_REFRESH_STEPS`` steps and read at the next refresh, one
    interval later, when the GPU is long past it (waiting on the event only if the host is a
    whole interval ahead of the GPU, when a wait costs nothing). So AuxK's width follows the
    number of dead latents as it was up to 2 intervals earlier; the first read (at the start,
    or after a resume) is a blocking one."""

    def __init__(self, device: torch.device):
        self.gpu = torch.device(device).type == "cuda"
        self.value: int | None = None
        self._host = torch.zeros((), dtype=torch.int64, pin_memory=self.gpu)
        self._event = None

    def read(self, dead: torch.Tensor, step: int) -> int:
        if not self.gpu:
            return int(dead.sum())
        if self.value is None:  # first use: one blocking read
            self.value = int(dead.sum())
        if step % AUX_REFRESH_STEPS == 0:
            if self._event is not None:
                self._event.synchronize()  # passed long ago, except when the host runs ahead
                self.value = int(self._host)
            self._host.copy_(dead.sum(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        return self.value


def mean_output(outs: list[StepOutput]) -> StepOutput:
    """The numbers of a batch trained in several steps (the batch warm-up): their means."""
    return StepOutput(*(torch.stack(values).mean() for values in zip(*outs, strict=True)))


def warmup_split(x: torch.Tensor, layer, tokens: int, parts: int) -> tuple[list, list, list]:
    """``x [N, d]``, its ``layer`` (an int, or a tensor ``[N]``) and ``tokens`` in ``parts``
    steps of the batch warm-up: rows ``j::parts`` for step j, so that each step holds every
    part of the batch (a layer-major batch of several layers per token, too); its tokens are
    ``tokens`` shared out as evenly."""
    xs = [x[j::parts] for j in range(parts)]
    per_row = isinstance(layer, torch.Tensor) and layer.dim() == 1
    layers = [layer[j::parts] if per_row else layer for j in range(parts)]
    base, extra = divmod(tokens, parts)
    return xs, layers, [base + (j < extra) for j in range(parts)]


def make_optimizer(sae: Sae) -> torch.optim.Optimizer:
    """Schedule-free sign-SGD (``signum``, the default: sparsify's optimiser with gsae's learning
    rate and averaging weights) or Adam (the paper's). Both honour ``found_inf`` on the device, so
    a non-finite step is skipped without a sync."""
    cfg = sae.cfg
    if cfg.optimizer == "signum":
        return ScheduleFreeSignSGD(
            sae.parameters(), lr=cfg.lr_value, average_power=cfg.average_power
        )
    return torch.optim.Adam(sae.parameters(), lr=cfg.lr_value, betas=cfg.betas, fused=True)


class SaeTrainer:
    """Optimiser, dead-latent counters and the training step of one :class:`Sae`.

    With ``optimizer="signum"`` the parameters hold the point where gradients are taken, not the
    model to use: evaluate inside :meth:`averaged`, which swaps in the averaged weights. The
    SAE files written by :meth:`save_files` always hold the weights to use.

    ``precision``: the encoder matmul's (:func:`resolve_sae_precision`; ``auto`` is bf16 on a
    GPU). AuxK is ``min(k_aux, dead latents)`` wide (:class:`DeadCount`): no AuxK work at all
    while no latent is dead. On a GPU a step with ``check_finite=False`` never syncs the host.
    """

    def __init__(self, sae: Sae, precision: str = "auto"):
        self.sae = sae
        self.cfg = sae.cfg
        device = sae.W_dec.device
        self.precision = resolve_sae_precision(precision, device)  # of the encoder matmul
        self.dead_count = DeadCount(device)
        self.optimizer = make_optimizer(sae)
        self.tokens_since_fired = torch.zeros(sae.m, dtype=torch.int64, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.tokens_seen = 0  # tokens of every step, skipped ones included (no sync to know)
        self.steps = 0
        self.initialized = False  # init_from_batch has run

    @property
    def tokens_trained(self) -> int:
        """Tokens of the steps that updated the SAE (reading it syncs the GPU)."""
        return self.tokens_seen - int(self.skipped_tokens)

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_threshold

    def _k_aux(self, dead: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """AuxK width for this step (``min(k_aux, dead latents)``: 0, so no AuxK work, while
        none is dead) and, on a GPU, a 0/1 factor for 'any latent dead now' (the count may be a
        few steps old: without a dead latent the AuxK term is 0, as k_aux = 0 would give)."""
        if self.tokens_seen < self.cfg.dead_threshold:
            return 0, None  # nothing can be dead yet: skip AuxK without looking
        width = min(self.cfg.k_aux_value, self.dead_count.read(dead, self.steps))
        if dead.device.type == "cpu" or width == 0:
            return width, None
        return width, dead.any().to(torch.float32)

    def _forward(self, x: torch.Tensor, dead: torch.Tensor):
        """The SAE's forward on ``x`` in its own units with this step's AuxK, in the trainer's
        precision; and the AuxK term to train."""
        k_aux, any_dead = self._k_aux(dead)
        mask, limit = (dead if k_aux else None), self.dead_count.value
        out = TopKSAE.forward(self.sae, x, mask, k_aux, precision=self.precision, aux_limit=limit)
        auxk = out.loss.auxk if any_dead is None else out.loss.auxk * any_dead
        return out, auxk

    def step(
        self,
        x: torch.Tensor,
        layer: int | torch.Tensor | None = None,
        check_finite: bool = True,
        tokens: int | None = None,
    ) -> StepOutput:
        """One optimisation step on ``x [N, d]`` (model units) from ``layer``. ``tokens``: how
        many tokens the rows stand for (default N; fewer when x stacks several layers of each
        token), which is what the dead-latent counters count. During the batch warm-up (the
        first ``warmup_tokens``) the batch is split into :meth:`warmup_parts` steps; the
        returned numbers are then their means."""
        tokens = x.shape[0] if tokens is None else tokens
        if not self.initialized:  # the first finite batch completes the init (a whole batch)
            self.initialized = self.sae.init_from_batch(x, layer) is not None
        parts = min(self.warmup_parts(tokens), max(1, x.shape[0]))
        if parts == 1:
            return self._step(x, layer, tokens, check_finite)
        outs = [
            self._step(*part, check_finite)
            for part in zip(*warmup_split(x, layer, tokens, parts), strict=True)
        ]
        return mean_output(outs)

    def warmup_parts(self, tokens: int) -> int:
        """How many steps a batch of ``tokens`` makes: 1, or during the batch warm-up enough
        for at most ``warmup_batch`` tokens each (decided at the batch's start, from the host's
        count: no sync)."""
        if self.tokens_seen >= self.cfg.warmup_tokens:
            return 1
        return max(1, -(-tokens // self.cfg.warmup_batch))

    def _step(self, x, layer, tokens: int, check_finite: bool) -> StepOutput:
        sae = self.sae
        dead = self.dead_mask()
        out, auxk = self._forward(sae.normalize(x, layer), dead)
        loss = out.loss.fvu + self.cfg.auxk_alpha * auxk
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        finite = torch.isfinite(loss)
        if check_finite and not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
            x_finite = bool(torch.isfinite(x).all())
            raise FloatingPointError(
                f"non-finite loss {float(loss.detach())} at step {self.steps} (x: shape "
                f"{tuple(x.shape)}, all finite: {x_finite}); this step did not update the weights"
            )
        self._update(finite)
        self._count_firing(out.latents, finite, tokens)
        with torch.no_grad():
            l0 = (out.latents.values > 0).sum(1).float().mean()
        return StepOutput(
            loss.detach(), out.loss.fvu.detach(), auxk.detach(), l0, dead.float().mean()
        )

    @torch.no_grad()
    def _update(self, finite: torch.Tensor) -> None:
        w_dec = self.sae.W_dec
        if w_dec.grad is not None:
            # keep the rows on the unit sphere: no gradient along the row itself
            parallel = torch.bmm(w_dec.grad.unsqueeze(1), w_dec.unsqueeze(2)).view(-1, 1)  # [m, 1]
            w_dec.grad.addcmul_(parallel, w_dec, value=-1)  # in place: no [m, d] temporary
        self.optimizer.found_inf = (~finite).to(torch.float32)
        self.optimizer.step()
        # renormalise; a skipped step divides by exactly 1 and leaves the rows bit-identical
        norms = w_dec.norm(dim=1, keepdim=True)
        w_dec.div_(torch.where(finite, norms, torch.ones_like(norms)))
        self.skipped_steps += (~finite).to(torch.int64)

    @torch.no_grad()
    def _count_firing(self, latents: EncodeOutput, finite: torch.Tensor, n: int) -> None:
        # integer index_add: deterministic, and no data-dependent shape (a mask index would sync)
        hits = torch.zeros_like(self.tokens_since_fired)
        hits.index_add_(0, latents.indices.reshape(-1), (latents.values > 0).reshape(-1).long())
        self._advance_counters(hits, finite, n)

    @torch.no_grad()
    def _advance_counters(self, hits: torch.Tensor, finite: torch.Tensor, n: int) -> None:
        """Reset the counter of every latent with ``hits > 0``, advance the others by ``n``."""
        since = torch.where(hits > 0, 0, self.tokens_since_fired + n)
        self.tokens_since_fired.copy_(torch.where(finite, since, self.tokens_since_fired))
        self.skipped_tokens += (~finite).to(torch.int64) * n
        self.tokens_seen += n
        self.steps += 1

    # ---- data-parallel steps: each process holds a part of the batch

    def part_stats_size(self) -> int:
        """Length of the ``stats`` vector :meth:`backward_part` fills (see there)."""
        return self.sae.d + 6

    def backward_part(
        self, x: torch.Tensor, layer, hits: torch.Tensor, stats: torch.Tensor
    ) -> None:
        """The first half of a data-parallel :meth:`step`, on this process's part ``x [n, d]``
        (n may be 0) of a batch split over processes.

        The FVU and AuxK of the whole batch share one denominator, the batch's total variance
        ``V = sum ||x - mean||^2``, which depends on the data only: so their gradient is the sum
        over parts of the gradients of the *unnormalised* terms, divided by the whole batch's V.
        This accumulates those unnormalised gradients into the parameters' ``.grad`` (which the
        caller zeroed, typically views into one buffer it all-reduces), counts the latents that
        fired into ``hits [m]`` and writes into ``stats`` (zeroed, length
        :meth:`part_stats_size`) what the whole batch's V, losses and L0 are combined from:
        ``[n, n * mean (d), n * |mean|^2, n * var, FVU * n var, AuxK * n var, active latents]``.
        Sum ``hits`` and ``stats`` (and the gradients) over processes, then call
        :meth:`apply_reduced`. The init (:meth:`Sae.init_from_batch` with ``reduce``) is the
        caller's, on the first step."""
        n = x.shape[0]
        if n == 0:
            return
        sae, d = self.sae, self.sae.d
        xs = sae.normalize(x, layer)  # [n, d], the SAE's units
        dead = self.dead_mask()
        out, auxk = self._forward(xs, dead)  # the same kernels
        with torch.no_grad():
            var, mean = torch.var_mean(xs.double(), dim=0, correction=0)  # [d], float64
            within = var.sum() * n  # this part's own total variance
        loss = out.loss.fvu + self.cfg.auxk_alpha * auxk
        # FVU * V_part = the part's squared error: its gradient is the unnormalised one
        (loss * within.float()).backward()
        with torch.no_grad():
            latents = out.latents
            fired = (latents.values > 0).reshape(-1)
            hits.index_add_(0, latents.indices.reshape(-1), fired.to(hits.dtype))
            stats[0] = n
            stats[1 : d + 1] = mean * n
            stats[d + 1] = mean.dot(mean) * n
            stats[d + 2] = within
            stats[d + 3] = out.loss.fvu.double() * within
            stats[d + 4] = auxk.double() * within
            stats[d + 5] = fired.sum()

    @torch.no_grad()
    def apply_reduced(self, hits: torch.Tensor, stats: torch.Tensor, tokens: int) -> StepOutput:
        """The second half of a data-parallel step, given ``hits`` and ``stats`` summed over the
        processes' parts (and the ``.grad`` of the unnormalised terms too): divide the gradients
        by the whole batch's total variance, update (skipped on the device if the loss is not
        finite, as :meth:`step` does) and count ``tokens`` for the dead-latent counters. Every
        process that applies the same sums makes the same update, bit for bit."""
        d = self.sae.d
        s = stats.double()
        n, mean_sum = s[0], s[1 : d + 1]
        # total variance of the whole batch: within the parts, plus between their means
        var = s[d + 2] + s[d + 1] - mean_sum.dot(mean_sum) / n.clamp_min(1)
        fvu, auxk = s[d + 3] / var, s[d + 4] / var
        loss = (fvu + self.cfg.auxk_alpha * auxk).float()
        dead = self.dead_mask()
        for p in self.sae.parameters():
            if p.grad is not None:
                p.grad.div_(var.float())
        finite = torch.isfinite(loss)
        self._update(finite)
        self._advance_counters(hits, finite, tokens)
        l0 = (s[d + 5] / n.clamp_min(1)).float()
        return StepOutput(loss, fvu.float(), auxk.float(), l0, dead.float().mean())

    def averaged(self) -> contextlib.AbstractContextManager:
        """Inside the block the SAE holds the weights to evaluate and save: the running average
        for ``signum`` (restored bit-exactly afterwards), the weights themselves for Adam."""
        if isinstance(self.optimizer, ScheduleFreeSignSGD):
            return self.optimizer.averaged()
        return contextlib.nullcontext()

    # ---- resume state

    def state_dict(self) -> dict:
        # signum: the SAE files hold the average, so the training point is saved here
        train_weights = (
            {n: p.detach().cpu().clone() for n, p in self.sae.named_parameters()}
            if isinstance(self.optimizer, ScheduleFreeSignSGD)
            else None
        )
        return {
            "train_weights": train_weights,
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "skipped_steps": int(self.skipped_steps),
            "skipped_tokens": int(self.skipped_tokens),
            "tokens_seen": self.tokens_seen,
            "steps": self.steps,
            "initialized": self.initialized,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("train_weights") is not None:
            with torch.no_grad():
                for name, p in self.sae.named_parameters():
                    p.copy_(state["train_weights"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.skipped_steps.fill_(state["skipped_steps"])
        self.skipped_tokens.fill_(state.get("skipped_tokens", 0))
        self.tokens_seen = state["tokens_seen"]
        self.steps = state["steps"]
        self.initialized = state.get("initialized", self.steps > 0)

    def save(self, path: str | Path) -> None:
        """The SAE and this trainer's state, in ``path`` as a whole, so that a resumed run
        continues exactly."""
        with atomic_dir(path) as tmp:
            self.save_files(tmp)

    def save_files(self, directory: Path) -> None:
        """The SAE's files and the state files into an existing directory (the caller makes the
        write atomic, e.g. one directory swap for a whole multi-SAE checkpoint)."""
        with self.averaged():  # the SAE files hold the weights to use (signum: the average)
            self.sae.save_files(directory)
        tensors: dict[str, torch.Tensor] = {}
        meta = tensors_to_json(self.state_dict(), "", tensors)
        save_safetensors(tensors, directory / STATE_TENSORS)
        (directory / STATE_JSON).write_text(dumps_json(meta))

    def load_files(self, directory: Path) -> None:
        """Weights, scales and state written by :meth:`save_files`, into this trainer."""
        directory = Path(directory)
        device = self.sae.W_dec.device
        saved = Sae.load(directory, device=device)
        if saved.layers != self.sae.layers or saved.cfg != self.cfg:
            raise ValueError(
                f"{directory} holds an SAE for layers {saved.layers} with another "
                "config, not this one"
            )
        self.sae.load_state_dict(saved.state_dict())
        meta = read_json(directory / STATE_JSON)
        tensors = read_safetensors(directory / STATE_TENSORS, "cpu")
        try:
            self.load_state_dict(tensors_from_json(meta, tensors))
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as err:
            raise ValueError(f"{directory / STATE_JSON} does not fit this SAE: {err}") from None

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> SaeTrainer:
        trainer = cls(Sae.load(path, device=device))
        trainer.load_files(Path(path))
        return trainer
