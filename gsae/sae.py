"""The TopK SAE of the paper and its training step.

``Sae`` is :class:`gsae_kernels.TopKSAE` plus what training and reuse need: a config, the layers
it covers and a per-layer activation scale. The scale is applied inside encode/decode, so callers
pass and get activations in the model's own units, while the SAE itself (and its loss) works on
activations normalised to mean squared norm 1 (paper, Appendix A).

``SaeTrainer`` owns the optimiser and the dead-latent counters and runs one step at a time:

1. normalise x, encode (TopK + the AuxK selection among dead latents), decode, FVU + AuxK/32;
2. backward through the sparse kernels;
3. drop the part of each decoder row's gradient parallel to the row, optimiser step (signum by
   default, Adam for ``--recipe paper``), renormalise the rows to unit norm;
4. reset the counter of every latent that fired (value > 0), advance the others by N.

A step whose loss is not finite changes nothing: with ``check_finite=True`` (the default) it
raises ``FloatingPointError`` before the update; with ``check_finite=False`` (the trainer's hot
loop, which must not sync the GPU every step) the optimiser (fused Adam, or signum through its
``found_inf``) skips the update on the device
and :attr:`SaeTrainer.skipped_steps` counts it, for the caller to check at its logging interval.

Everything is saved as safetensors and JSON (no pickle is ever loaded): the SAE as
``sae.safetensors`` + ``cfg.json``, the trainer's optimiser and counters as ``state.safetensors``
+ ``state.json``. A file that cannot be read gives a ``ValueError`` naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from gsae_kernels import ForwardOutput, TopKSAE
from gsae_kernels.topk_encode import EncodeOutput
from safetensors.torch import load_file

from .io import atomic_dir, dumps_json, recover_dir, save_safetensors
from .optim import ScheduleFreeSignSGD

SCALE_MODES = ("mean_sq", "mean_norm", "none")
ENCODER_INITS = ("fit", "geometry", "paper")
B_DEC_INITS = ("zeros", "mean", "median")
OPTIMIZERS = ("signum", "adam")
# learning rate at m = 2^14 latents, scaled by 1/sqrt(m / 2^14): the paper's for Adam; for signum
# half sparsify's 5e-3, which the sweep of benchmarks/bench_quality.py found better at every budget
BASE_LR = {"adam": 2e-4, "signum": 2.5e-3}
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"  # beside the SAE files
NORM_CHUNK_ELEMENTS = 1 << 24  # scale estimate: at most this many values upcast at once
# EleutherAI sparsify's tensor names for gsae's weights (``SparseCoder``: an nn.Linear encoder)
SPARSIFY_NAMES = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "W_dec",
                  "b_dec": "b_dec"}  # fmt: skip


@dataclasses.dataclass
class SaeConfig:
    """Hyperparameters of one SAE (defaults: the paper's Table 4, but for the optimiser and the
    init, gsae's; the paper's are ``gsae.train.RECIPES["paper"]``)."""

    d: int
    expansion_factor: int = 16
    num_latents: int | None = None  # overrides expansion_factor
    k: int = 128
    auxk_alpha: float = 1 / 32
    k_aux: int | None = None  # default d // 2 (capped by the number of dead latents)
    dead_threshold: int = 10_000_000  # tokens without firing before a latent counts as dead
    lr: float | None = None  # default BASE_LR[optimizer] / sqrt(m / 2^14)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's
    # "signum": schedule-free sign-SGD (as sparsify's default, gsae's lr and averaging: see the
    # README's quality section); "adam": the paper's (--recipe paper)
    optimizer: str = "signum"
    average_power: float = 2.0  # signum: step t weighs t^r in the average (sparsify's: r = 0)
    init_encoder: str = "fit"  # scale of W_enc = c W_dec^T: see Sae; "paper": c = 1
    init_b_dec: str = "mean"  # of the first batch; "median": geometric median; "zeros" (paper)
    scale_mode: str = "mean_sq"  # paper: E||s x||^2 = 1; "mean_norm": E||s x|| = 1 (authors' code)
    scale_tokens: int = 5_000_000  # tokens used to estimate each layer's scale
    seed: int = 0

    @property
    def m(self) -> int:
        return self.num_latents if self.num_latents is not None else self.d * self.expansion_factor

    @property
    def lr_value(self) -> float:
        base = BASE_LR[self.optimizer]
        return self.lr if self.lr is not None else base / math.sqrt(self.m / 2**14)

    @property
    def k_aux_value(self) -> int:
        return min(self.k_aux if self.k_aux is not None else self.d // 2, self.m)

    def validate(self) -> SaeConfig:
        checks = [
            (self.d >= 1, f"d must be >= 1, got {self.d}"),
            (self.m >= 1, f"the number of latents must be >= 1, got {self.m}"),
            (1 <= self.k <= self.m, f"k must be in [1, m={self.m}], got {self.k}"),
            (self.k_aux is None or self.k_aux >= 0, f"k_aux must be >= 0, got {self.k_aux}"),
            (self.dead_threshold > 0, f"dead_threshold must be > 0, got {self.dead_threshold}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.average_power >= 0, f"average_power must be >= 0, got {self.average_power}"),
            (
                self.init_b_dec in B_DEC_INITS,
                f"init_b_dec: {'|'.join(B_DEC_INITS)}, not {self.init_b_dec!r}",
            ),
            (
                self.init_encoder in ENCODER_INITS,
                f"init_encoder: {'|'.join(ENCODER_INITS)}, not {self.init_encoder!r}",
            ),
            (
                self.optimizer in OPTIMIZERS,
                f"optimizer: {'|'.join(OPTIMIZERS)}, not {self.optimizer!r}",
            ),
            (
                self.scale_mode in SCALE_MODES,
                f"scale_mode: {'|'.join(SCALE_MODES)}, not {self.scale_mode!r}",
            ),  # noqa: E501
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SaeConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in legacy_fields(data).items() if k in names}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs).validate()


def legacy_fields(data: dict) -> dict:
    """SaeConfig fields (with ``d``) as saved, completed for a config saved before
    ``average_power`` existed, when the default optimizer was Adam and signum meant sparsify's
    plain mean at 5e-3 / sqrt(m / 2^14): so an old run resumes, and its SAEs load, as what they
    were."""
    if "average_power" in data:
        return data
    data = {"optimizer": "adam", **data, "average_power": 0.0}  # adam: the default until then
    if data.get("optimizer") == "signum" and data.get("lr") is None:
        m = data.get("num_latents") or data["d"] * data.get(
            "expansion_factor", SaeConfig.expansion_factor
        )
        data["lr"] = 5e-3 / math.sqrt(m / 2**14)
    return data


def activation_scales(
    batches: Iterable[torch.Tensor], tokens: int, mode: str = "mean_sq", merge=None
) -> list[float]:
    """Per-source scales s with ``E||s x||^2 = 1`` (``mean_sq``) or ``E||s x|| = 1``
    (``mean_norm``), from the first ``tokens`` tokens of ``batches`` (each ``[L, N, d]``: L
    sources side by side). Streamed: each token's norm is taken in float32 (a bounded slice of
    tokens upcast at a time) and only the sums over tokens are float64, so no float64 copy of the
    activations is ever made (8 GiB at Pythia-1B sizes).

    ``merge((sums [L] float64, tokens))`` combines the sums of several processes, each over its
    own part of the data (distributed training), and returns the totals."""
    if mode not in SCALE_MODES:
        raise ValueError(f"scale mode must be one of {SCALE_MODES}, got {mode!r}")
    total, seen = activation_norm_sums(batches, tokens, mode)
    if merge is not None:
        total, seen = merge((total, seen))
    if total is None or seen == 0:
        raise ValueError(f"cannot estimate an activation scale from {seen} tokens")
    if mode == "none":
        return [1.0] * len(total)
    mean = total / seen
    if not bool(torch.isfinite(mean).all()) or bool((mean <= 0).any()):
        raise ValueError(f"cannot estimate an activation scale from {seen} tokens (means {mean})")
    return (mean.rsqrt() if mode == "mean_sq" else mean.reciprocal()).tolist()


def activation_norm_sums(
    batches: Iterable[torch.Tensor], tokens: int, mode: str = "mean_sq"
) -> tuple[torch.Tensor | None, int]:
    """Per-source float64 sums of ``||x||^2`` (``mean_sq``) or ``||x||`` over the first
    ``tokens`` tokens of ``batches [L, N, d]``, and the number of tokens summed (None: none)."""
    total, seen = None, 0
    for batch in batches:
        h = batch[:, : tokens - seen]  # [L, n, d]
        chunk = max(1, NORM_CHUNK_ELEMENTS // max(1, h.shape[0] * h.shape[2]))
        for i in range(0, h.shape[1], chunk):
            norms = torch.linalg.vector_norm(h[:, i : i + chunk], dim=2, dtype=torch.float32)
            values = norms.square() if mode == "mean_sq" else norms  # [L, chunk]
            part = values.sum(1, dtype=torch.float64).cpu()  # [L]
            total = part if total is None else total + part
        if total is None and h.shape[1] == 0:  # an empty part (distributed): sums of nothing
            total = torch.zeros(h.shape[0], dtype=torch.float64)
        seen += h.shape[1]
        if seen >= tokens:
            break
    return total, seen


def activation_scale(batches: Iterable[torch.Tensor], tokens: int, mode: str = "mean_sq") -> float:
    """:func:`activation_scales` for a single source: ``batches`` are ``[N, d]``."""
    if mode == "none":
        return 1.0
    return activation_scales((b.unsqueeze(0) for b in batches), tokens, mode)[0]


def geometry_encoder_scale(d: int, m: int, k: int) -> float:
    """The encoder scale c that best fits, in expectation, isotropic data at init.

    With unit decoder rows w_i drawn at random and ``W_enc = c W_dec^T``, an input x has
    pre-activations f_i = <w_i, x> ~ N(0, |x|^2 / d). The top k of m lie beyond the normal
    quantile t = Phi^-1(1 - k/m), so with z = f sqrt(d) / |x| and p = k/m:

        S = sum f_i^2 = |x|^2 (k/d) E[z^2 | z > t],    E[z^2 | z > t] = 1 + t phi(t) / p
        Q = sum f_i^4 = |x|^4 (k/d^2) E[z^4 | z > t],  E[z^4 | z > t] = 3 + (t^3 + 3t) phi(t) / p

    Their reconstruction r = sum f_i w_i has <x, r> = S, and since each chosen row leans towards
    x (w_i = f_i x / |x|^2 + a part orthogonal to x, random), |r|^2 = S + (S^2 - Q) / |x|^2.
    The c minimising |x - c r|^2 is <x, r> / |r|^2 = ``1 / (1 + S/|x|^2 - Q/(S |x|^2))``:
    0.39 at d=128, m=2048, k=32 (a Monte-Carlo fit gives 0.40), 0.65 at the paper's d=2048,
    m=32768, k=128. The paper's c = 1 overshoots by the inverse of that.
    """
    from statistics import NormalDist

    p = k / m
    if p >= 1:  # every latent is chosen: the full Gaussian moments
        e2, e4 = 1.0, 3.0
    else:
        t = NormalDist().inv_cdf(1 - p)
        phi = NormalDist().pdf(t)
        e2, e4 = 1 + t * phi / p, 3 + (t**3 + 3 * t) * phi / p
    s = k / d * e2  # S / |x|^2
    q = k / d**2 * e4  # Q / |x|^4
    return 1 / (1 + s - q / s)


def geometric_median(
    x: torch.Tensor, iters: int = 50, tol: float = 1e-6, reduce=None
) -> torch.Tensor:
    """Geometric median of the rows of ``x [N, d]`` (Weiszfeld's iterations from the mean).

    ``reduce(t)``: the sum of a float64 tensor over the processes that each hold some of the rows
    (distributed training); every process then gets the median of all of them, iterating alike."""
    x = x.double()
    if reduce is None:
        y = x.mean(0)
    else:
        sums = reduce(torch.cat([x.sum(0), x.new_tensor([x.shape[0]])]))
        y = sums[:-1] / sums[-1]
    for _ in range(iters):
        w = (x - y).norm(dim=1).clamp_min(1e-12).reciprocal()  # [N]
        if reduce is None:
            new = (w[:, None] * x).sum(0) / w.sum()
        else:
            sums = reduce(torch.cat([(w[:, None] * x).sum(0), w.sum().view(1)]))
            new = sums[:-1] / sums[-1]
        done = float((new - y).norm()) <= tol * max(float(y.norm()), 1e-12)
        y = new
        if done:
            break
    return y


def _check_layer_ids(device: torch.device) -> bool:
    """Whether per-token layer ids on ``device`` are checked (a host sync on a GPU)."""
    return device.type == "cpu" or os.environ.get("GSAE_CHECK_LAYERS") == "1"


class Sae(TopKSAE):
    """A TopK SAE over the activations of ``layers`` (one scale per layer).

    ``layer`` arguments name model layers: an int for a whole batch, or an int tensor ``[N]`` for
    a per-token layer (a Group-SAE batch mixes the layers of its group).

    **Initialisation.** Decoder rows are random unit vectors and ``W_enc = c W_dec^T``, biases 0.
    The paper (``init_encoder="paper"``) takes c = 1; but top-k then selects the k largest of m
    random projections, and their sum overshoots the input: on the demo model (k=32, m=2048)
    the first reconstruction is 2.0x the norm of the (centred) input, FVU 1.8 at init, worse
    than predicting the mean, and Adam at the paper's learning rate spends most of a short
    budget shrinking the encoder. gsae chooses c instead:

    - ``"fit"`` (default): the c that best fits the first training batch, in closed form. Top-k
      selection does not depend on c (a positive factor on every pre-activation), so with r the
      reconstruction at c = 1, ``c = <x - b_dec, r> / |r|^2`` over the batch (0.39-0.40 on
      every demo layer: FVU 0.38 at init);
    - ``"geometry"``: the same fit in expectation for isotropic data, from d, m and k alone
      (:func:`geometry_encoder_scale`); on the demo model it lands within 3% of "fit".

    ``init_b_dec``: ``"mean"`` (default) of the first batch, ``"median"`` (geometric), or
    ``"zeros"`` (the paper). :class:`SaeTrainer` applies the data-dependent parts on its first
    step (:meth:`init_from_batch`).

    Measured at equal tokens (held-out FVU, 200k tokens, k=32, m=2048, Adam at the paper's
    learning rate, layers 0-5 of the demo model; benchmarks/bench_quality.py):

    ========================  ======  ======  ======  ======  ======  ======
    init_encoder, init_b_dec  0       1       2       3       4       5
    ========================  ======  ======  ======  ======  ======  ======
    paper, zeros              0.254   0.276   0.295   0.323   0.332   0.340
    paper, mean               0.252   0.277   0.299   0.325   0.332   0.331
    c = 0.577 (nn.Linear's)   0.125   0.134   0.146   0.162   0.168   0.170
    fit, zeros                0.121   0.130   0.138   0.149   0.152   0.151
    fit, mean (default)       0.110   0.119   0.130   0.145   0.150   0.151
    fit, median               0.110   0.120   0.130   0.145   0.150   0.152
    geometry, mean            0.109   0.119   0.130   0.145   0.150   0.151
    ========================  ======  ======  ======  ======  ======  ======

    A fixed c of 0.15 / 0.25 / 0.3 / 0.5 / 0.65 gives 0.120 / 0.112 / 0.110 / 0.113 / 0.133 on
    layer 0: the fit (0.40) sits at the optimum. sparsify's SparseCoder (c = 0.577 by its
    nn.Linear init, b_dec mean) on the same batches: 0.124 ... 0.170, i.e. the default reaches
    0.89x of its FVU on average, below it on every layer (3 seeds agree within 1%).
    On synthetic data (d=256, 64 true directions, 4 active, k=4, m=4096, 200 steps of 4096)
    the fitted c is 0.88 and the default reaches 0.083 with every direction found, the paper's
    c = 1 (b_dec mean) 0.078 (3 seeds agree): a 5% cost where the overshoot is small, against
    2.3x gained on the demo model. "fit" is the default over "geometry", which matches it on
    both, because real residual streams are far from isotropic in larger models (a few outlier
    dimensions), where only the fit sees the data.
    """

    def __init__(self, cfg: SaeConfig, layers: Sequence[int] = (0,), device=None):
        cfg.validate()
        generator = torch.Generator().manual_seed(cfg.seed)  # same init on every device
        super().__init__(cfg.d, cfg.m, cfg.k, cfg.auxk_alpha, device, torch.float32, generator)
        if len(layers) == 0 or len(set(layers)) != len(layers) or min(layers) < 0:
            raise ValueError(f"layers must be distinct non-negative ints, got {list(layers)}")
        self.cfg = cfg
        self.layers = [int(layer) for layer in layers]
        self.register_buffer("scales", torch.ones(len(self.layers), device=device))
        position = torch.full((max(self.layers) + 1,), -1, dtype=torch.int64)
        position[self.layers] = torch.arange(len(self.layers))
        self.register_buffer("layer_position", position.to(device), persistent=False)
        if cfg.init_encoder == "geometry":
            with torch.no_grad():
                self.W_enc.mul_(geometry_encoder_scale(cfg.d, cfg.m, cfg.k))

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor, layer=None, reduce=None) -> float | None:
        """The data-dependent part of the initialisation, from a first batch ``x [N, d]`` in
        model units: ``b_dec`` (``init_b_dec``), then the encoder scale (``init_encoder="fit"``).
        Returns the factor applied to ``W_enc`` (1.0 if none), or None, changing nothing, when
        the batch is not finite (NaN activations, or a layer id the SAE does not cover). One
        host sync: it runs once per training.

        ``reduce(t)``, for data-parallel training: the sum of a float64 tensor over the processes
        that train this SAE, each holding its part of the batch in ``x`` (possibly none). The
        statistics are then those of the whole batch, so every replica gets the same init, the
        one a single process would compute from the whole batch."""
        if reduce is not None:
            return self._init_from_parts(x, layer, reduce)
        xs = self.normalize(x, layer)  # [N, d], the SAE's units
        if xs.shape[0] == 0 or not bool(torch.isfinite(xs).all()):
            return None
        if self.cfg.init_b_dec == "mean":
            self.b_dec.copy_(xs.double().mean(0))
        elif self.cfg.init_b_dec == "median":
            self.b_dec.copy_(geometric_median(xs))
        if self.cfg.init_encoder != "fit":
            return 1.0
        enc = super().encode(xs)
        r = (super().decode(enc.values, enc.indices) - self.b_dec).double()  # [N, d], c = 1
        e = (xs - self.b_dec).double()
        num, den = float((e * r).sum()), float(r.pow(2).sum())
        if not (den > 0 and math.isfinite(num) and num > 0):
            return 1.0  # a degenerate batch (e.g. every row equals b_dec): keep c = 1
        self.W_enc.mul_(num / den)
        return num / den

    def _init_from_parts(self, x: torch.Tensor, layer, reduce) -> float | None:
        """:meth:`init_from_batch` from sums over every process's part (see there). Every
        process makes the same ``reduce`` calls whatever its part holds."""
        xs = self.normalize(x, layer).double()  # [n, d], the SAE's units (n may be 0)
        sums = reduce(torch.cat([xs.sum(0), xs.new_tensor([xs.shape[0]])]))  # [d + 1]
        count = float(sums[-1])
        if count == 0 or not bool(torch.isfinite(sums).all()):
            return None  # NaN/inf rows anywhere poison the sums: nobody initialises
        if self.cfg.init_b_dec == "mean":
            self.b_dec.copy_(sums[:-1] / count)
        elif self.cfg.init_b_dec == "median":
            self.b_dec.copy_(geometric_median(xs, reduce=reduce))
        if self.cfg.init_encoder != "fit":
            return 1.0
        part = xs.new_zeros(2)
        if xs.shape[0]:
            xs32 = xs.float()
            enc = super().encode(xs32)
            r = (super().decode(enc.values, enc.indices) - self.b_dec).double()  # c = 1
            e = (xs32 - self.b_dec).double()
            part = torch.stack([(e * r).sum(), r.pow(2).sum()])
        num, den = reduce(part).tolist()
        if not (den > 0 and math.isfinite(num) and num > 0):
            return 1.0
        self.W_enc.mul_(num / den)
        return num / den

    # ---- scales

    def set_scale(self, layer: int, value: float) -> None:
        self.scales[self._position(layer)] = value

    def layer_scales(self) -> dict[int, float]:
        return {layer: float(s) for layer, s in zip(self.layers, self.scales.tolist(), strict=True)}

    def _position(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not covered by this SAE (layers {self.layers})")
        return self.layers.index(layer)

    def scale_for(self, layer: int | torch.Tensor | None) -> torch.Tensor:
        """Scale for a batch: a scalar, or ``[N, 1]`` for per-token layers."""
        if layer is None:
            if len(self.layers) != 1:
                raise ValueError(f"this SAE covers layers {self.layers}: say which with layer=")
            return self.scales[0]
        if isinstance(layer, torch.Tensor):
            return self._token_scales(layer).unsqueeze(1)
        return self.scales[self._position(int(layer))]

    def _token_scales(self, layer: torch.Tensor) -> torch.Tensor:
        """Scales of per-token layer ids ``[N]``. An id this SAE does not cover is refused: with
        a ValueError for CPU ids (checking is free there) or under ``GSAE_CHECK_LAYERS=1``; on a
        GPU, where checking would sync the host every step, it gets a NaN scale, so the step's
        loss is NaN and the step raises (check_finite) or is skipped and counted: it is never
        trained with another layer's scale."""
        if layer.dtype.is_floating_point or layer.dtype.is_complex or layer.dtype == torch.bool:
            raise TypeError(f"per-token layer ids must be an integer tensor, got {layer.dtype}")
        table = self.layer_position  # [max layer + 1]: position of each layer, -1 if not covered
        inside = (layer >= 0) & (layer < table.numel())
        position = torch.where(inside, table[layer.clamp(0, table.numel() - 1)], -1)  # [N]
        if _check_layer_ids(layer.device):
            bad = layer[position < 0]
            if bad.numel() > 0:
                raise ValueError(
                    f"layer ids {sorted(set(bad.tolist()))} are not covered by this SAE "
                    f"(layers {self.layers})"
                )
        nan = self.scales.new_full((1,), float("nan"))
        return torch.cat([self.scales, nan])[position]  # position -1: the NaN

    def normalize(self, x: torch.Tensor, layer=None) -> torch.Tensor:
        """Model units -> the SAE's units (mean squared norm 1), as float32."""
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must have shape (N, {self.d}), got {tuple(x.shape)}")
        if isinstance(layer, torch.Tensor) and tuple(layer.shape) != (x.shape[0],):
            raise ValueError(f"layer must have shape ({x.shape[0]},), got {tuple(layer.shape)}")
        return x.to(torch.float32) * self.scale_for(layer)

    # ---- model-unit encode / decode / forward

    def encode(self, x, dead_mask=None, k_aux=0, *, layer=None) -> EncodeOutput:
        return super().encode(self.normalize(x, layer), dead_mask, k_aux)

    def decode(self, values, indices, *, layer=None) -> torch.Tensor:
        return super().decode(values, indices) / self.scale_for(layer)

    def forward(
        self, x, dead_mask=None, k_aux=0, *, layer=None, precision=None, aux_limit=None
    ) -> ForwardOutput:
        """``x_hat`` in model units; the loss is the normalised one that training minimises."""
        xs = self.normalize(x, layer)
        out = super().forward(xs, dead_mask, k_aux, precision=precision, aux_limit=aux_limit)
        return out._replace(x_hat=out.x_hat / self.scale_for(layer))

    # ---- files

    def save(self, path: str | Path) -> None:
        """``path/sae.safetensors`` (weights) and ``path/cfg.json``, replaced as a whole."""
        with atomic_dir(path) as tmp:
            self.save_files(tmp)

    def save_files(self, directory: Path) -> None:
        tensors = {n: getattr(self, n).detach().contiguous().cpu() for n in WEIGHT_NAMES}
        save_safetensors(tensors, directory / "sae.safetensors")
        meta = {**self.cfg.to_dict(), "layers": self.layers, "scales": self.layer_scales()}
        (directory / "cfg.json").write_text(dumps_json(meta))

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> Sae:
        path = Path(path)
        recover_dir(path)
        if not (path / "cfg.json").exists() or not (path / "sae.safetensors").exists():
            raise FileNotFoundError(f"{path} holds no SAE (expected cfg.json and sae.safetensors)")
        meta = read_json(path / "cfg.json")
        try:
            sae = cls(SaeConfig.from_dict(meta), meta.get("layers", [0]), device=device)
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path / 'cfg.json'} is not an SAE config: {err}") from None
        tensors = read_safetensors(path / "sae.safetensors", device)
        missing = [n for n in WEIGHT_NAMES if n not in tensors]
        if missing:
            raise ValueError(f"{path / 'sae.safetensors'} lacks {missing}")
        wrong = [n for n in WEIGHT_NAMES if tensors[n].shape != getattr(sae, n).shape]
        if wrong:
            raise ValueError(f"{path / 'sae.safetensors'}: {wrong} do not fit its cfg.json")
        with torch.no_grad():
            for name in WEIGHT_NAMES:
                getattr(sae, name).copy_(tensors[name])
            for layer, value in meta.get("scales", {}).items():
                sae.set_scale(int(layer), value)
        return sae

    @classmethod
    def from_sparsify(cls, path: str | Path, layer: int | None = None, device="cpu") -> Sae:
        """An SAE saved by EleutherAI's sparsify (``SparseCoder.save_to_disk``: ``cfg.json`` with
        ``d_in``, ``num_latents``/``expansion_factor``, ``k``; ``sae.safetensors`` with
        ``encoder.weight``, ``encoder.bias``, ``W_dec``, ``b_dec``), e.g. one folder of a
        sparsify training run or of ``gsae-export --format sparsify``.

        It covers one model ``layer``: by default the number that ends the folder's name (its
        hookpoint, ``layers.5`` -> 5), else 0. Its scale is 1 (sparsify SAEs take the model's
        own units), so :meth:`encode` selects the latents sparsify selects, with the same values.
        Weights are read as float32. Transcoders, skip connections and group-max activations
        are refused: they are not TopK SAEs."""
        path = Path(path)
        if not (path / "cfg.json").exists() or not (path / "sae.safetensors").exists():
            raise FileNotFoundError(f"{path} holds no sparsify SAE (expected cfg.json and "
                                    "sae.safetensors)")  # fmt: skip
        meta = json.loads((path / "cfg.json").read_text())
        if "d_in" not in meta:
            raise ValueError(f"{path / 'cfg.json'} is not a sparsify config (no d_in)")
        unsupported = [key for key, bad in (("transcode", True), ("skip_connection", True))
                       if meta.get(key) == bad]  # fmt: skip
        if meta.get("activation", "topk") != "topk":
            unsupported.append(f"activation={meta['activation']}")
        if unsupported:
            raise ValueError(f"{path}: a sparsify coder with {', '.join(unsupported)} is not a "
                             "TopK SAE; gsae cannot load it")  # fmt: skip
        d = int(meta["d_in"])
        m = int(meta.get("num_latents") or 0) or d * int(meta.get("expansion_factor", 32))
        if layer is None:
            digits = re.search(r"(\d+)$", path.name)
            layer = int(digits.group(1)) if digits else 0
        tensors = load_file(str(path / "sae.safetensors"), device=str(device))
        missing = [n for n in SPARSIFY_NAMES.values() if n not in tensors]
        if missing:
            raise ValueError(f"{path / 'sae.safetensors'} lacks {missing} (sparsify's names)")
        cfg = SaeConfig(d=d, num_latents=m, k=int(meta.get("k", 32)), init_encoder="paper",
                        init_b_dec="zeros")  # fmt: skip
        sae = cls(cfg, [layer], device=device)
        with torch.no_grad():
            for name, theirs in SPARSIFY_NAMES.items():
                weight = tensors[theirs]
                if tuple(weight.shape) != tuple(getattr(sae, name).shape):
                    raise ValueError(f"{path}: {theirs} has shape {tuple(weight.shape)}, "
                                     f"expected {tuple(getattr(sae, name).shape)}")  # fmt: skip
                getattr(sae, name).copy_(weight.float())
        return sae


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
        self, x: torch.Tensor, layer: int | torch.Tensor | None = None, check_finite: bool = True,
        tokens: int | None = None,
    ) -> StepOutput:  # fmt: skip
        """One optimisation step on ``x [N, d]`` (model units) from ``layer``. ``tokens``: how
        many tokens the rows stand for (default N; fewer when x stacks several layers of each
        token), which is what the dead-latent counters count."""
        sae = self.sae
        if not self.initialized:  # the first finite batch completes the init
            self.initialized = sae.init_from_batch(x, layer) is not None
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
                f"{tuple(x.shape)}, all finite: {x_finite}); the weights were not updated"
            )
        self._update(finite)
        self._count_firing(out.latents, finite, x.shape[0] if tokens is None else tokens)
        with torch.no_grad():
            l0 = (out.latents.values > 0).sum(1).float().mean()
        return StepOutput(loss.detach(), out.loss.fvu.detach(), auxk.detach(), l0,
                          dead.float().mean())  # fmt: skip

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
        meta = _to_json(self.state_dict(), "", tensors)
        save_safetensors(tensors, directory / STATE_TENSORS)
        (directory / STATE_JSON).write_text(dumps_json(meta))

    def load_files(self, directory: Path) -> None:
        """Weights, scales and state written by :meth:`save_files`, into this trainer."""
        directory = Path(directory)
        device = self.sae.W_dec.device
        saved = Sae.load(directory, device=device)
        if saved.layers != self.sae.layers or saved.cfg != self.cfg:
            raise ValueError(f"{directory} holds an SAE for layers {saved.layers} with another "
                             "config, not this one")  # fmt: skip
        self.sae.load_state_dict(saved.state_dict())
        meta = read_json(directory / STATE_JSON)
        tensors = read_safetensors(directory / STATE_TENSORS, "cpu")
        try:
            self.load_state_dict(_from_json(meta, tensors))
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as err:
            raise ValueError(f"{directory / STATE_JSON} does not fit this SAE: {err}") from None

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> SaeTrainer:
        trainer = cls(Sae.load(path, device=device))
        trainer.load_files(Path(path))
        return trainer


# ---- files: JSON and safetensors, never pickle


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupted (not JSON: {err})") from None


def read_safetensors(path: Path, device) -> dict[str, torch.Tensor]:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path} is corrupted ({type(err).__name__}: {err})") from None


def _to_json(obj, key: str, tensors: dict):
    """``obj`` as JSON, its tensors moved into ``tensors`` under their path; tuples and
    int-keyed dicts (an optimiser's state) are marked so that :func:`_from_json` restores them."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) for k in obj):
            return {"__int_keys__": [[k, _to_json(v, f"{key}.{k}", tensors)]
                                     for k, v in obj.items()]}  # fmt: skip
        return {str(k): _to_json(v, f"{key}.{k}" if key else str(k), tensors)
                for k, v in obj.items()}  # fmt: skip
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_json(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _from_json(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__int_keys__" in obj:
            return {int(k): _from_json(v, tensors) for k, v in obj["__int_keys__"]}
        if "__tuple__" in obj:
            return tuple(_from_json(v, tensors) for v in obj["__tuple__"])
        return {k: _from_json(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v, tensors) for v in obj]
    return obj
