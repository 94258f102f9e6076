"""The TopK SAE of the paper and its config.

``Sae`` is :class:`gsae_kernels.TopKSAE` plus what training and reuse need: a config, the layers
it covers and a per-layer activation scale. The scale is applied inside encode/decode, so callers
pass and get activations in the model's own units, while the SAE itself (and its loss) works on
activations normalised to mean squared norm 1 (paper, Appendix A).

Initialisation (:mod:`gsae.init`) and the activation scales are estimated beside it; its training
step is :class:`gsae.train.step.SaeTrainer`. The SAE is saved as safetensors and JSON (no pickle
is ever loaded): ``sae.safetensors`` + ``cfg.json``; a file that cannot be read gives a
``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from gsae_kernels import ForwardOutput, TopKSAE
from gsae_kernels.topk_encode import EncodeOutput
from safetensors.torch import load_file

from .init import SCALE_MODES, geometry_encoder_scale, init_from_batch
from .io import atomic_dir, dumps_json, read_json, read_safetensors, recover_dir, save_safetensors
from .options import option

ENCODER_INITS = ("fit", "geometry", "paper")
B_DEC_INITS = ("zeros", "mean", "median")
OPTIMIZERS = ("signum", "adam")
# learning rate at m = 2^14 latents, scaled by 1/sqrt(m / 2^14): the paper's for Adam; for signum
# half sparsify's 5e-3, which the sweep of benchmarks/bench_quality.py found better at every budget
BASE_LR = {"adam": 2e-4, "signum": 2.5e-3}
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
# EleutherAI sparsify's tensor names for gsae's weights (``SparseCoder``: an nn.Linear encoder)
SPARSIFY_NAMES = {
    "W_enc": "encoder.weight",
    "b_enc": "encoder.bias",
    "W_dec": "W_dec",
    "b_dec": "b_dec",
}


@dataclasses.dataclass(kw_only=True)
class SaeSettings:
    """What a run sets for every SAE (all of :class:`SaeConfig` but ``d``, which comes from the
    model). Defaults: the paper's Table 4, but for the optimiser and the init, gsae's; the
    paper's are ``gsae.train.RECIPES["paper"]``. The fields made with :func:`option` are
    gsae-train's flags; the rest are research settings (``--config``, the Python API)."""

    expansion_factor: int = option(16, "latents per dimension")
    num_latents: int | None = None  # overrides expansion_factor
    k: int = option(128, "active latents")
    auxk_alpha: float = 1 / 32  # AuxK's weight in the loss
    k_aux: int | None = None  # default d // 2 (capped by the number of dead latents)
    dead_threshold: int = option(
        10_000_000, "tokens without firing before a latent is dead", count=True
    )
    lr: float | None = option(
        None,
        "learning rate",
        shown=", ".join(f"{lr:g} / sqrt(m / 2^14) for {name}" for name, lr in BASE_LR.items()),
    )
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's
    # "signum": schedule-free sign-SGD (as sparsify's default, with gsae's lr and averaging:
    # benchmarks/bench_quality.py); "adam": the paper's (--recipe paper)
    optimizer: str = option(
        "signum",
        "signum is schedule-free sign-SGD, as sparsify's default, with gsae's tuned learning rate "
        "and averaging (its averaged weights are evaluated and saved); adam is the paper's",
        choices=OPTIMIZERS,
    )
    average_power: float = 2.0  # signum: step t weighs t^r in the average (sparsify's: r = 0)
    # batch warm-up: the first warmup_tokens tokens are trained in steps of at most warmup_batch
    # tokens (each batch split): early on more, smaller steps learn more per token; later the
    # full batch's lower noise does (benchmarks/bench_quality.py). warmup_tokens 0: off (paper)
    warmup_tokens: int = 300_000
    warmup_batch: int = 1024
    init_encoder: str = "fit"  # scale of W_enc = c W_dec^T: see Sae; "paper": c = 1
    init_b_dec: str = "mean"  # of the first batch; "median": geometric median; "zeros" (paper)
    scale_mode: str = "mean_sq"  # paper: E||s x||^2 = 1; "mean_norm": E||s x|| = 1 (authors' code)
    scale_tokens: int = option(
        5_000_000, "tokens to estimate each layer's activation scale", count=True
    )
    seed: int = 0


@dataclasses.dataclass(kw_only=True)
class SaeConfig(SaeSettings):
    """Hyperparameters of one SAE: its :class:`SaeSettings` and the model's width ``d``."""

    d: int

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
            (self.auxk_alpha >= 0, f"auxk_alpha must be >= 0, got {self.auxk_alpha}"),
            (self.warmup_tokens >= 0, f"warmup_tokens must be >= 0, got {self.warmup_tokens}"),
            (self.warmup_batch >= 1, f"warmup_batch must be >= 1, got {self.warmup_batch}"),
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
        data = dataclasses.asdict(self)
        return {"d": data.pop("d"), **data}  # d first, as cfg.json has always been written

    @classmethod
    def from_dict(cls, data: dict) -> SaeConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in legacy_fields(data).items() if k in names}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs).validate()


def legacy_fields(data: dict) -> dict:
    """SaeConfig fields (with ``d``) as saved, completed for a config saved before a field
    existed: before ``warmup_tokens``, no batch warm-up; before ``average_power``, the default
    optimizer was Adam and signum meant sparsify's plain mean at 5e-3 / sqrt(m / 2^14). So an old
    run resumes, and its SAEs load, as what they were."""
    if "warmup_tokens" not in data:  # saved before the batch warm-up: trained without one
        data = {**data, "warmup_tokens": 0}
    if "average_power" in data:
        return data
    data = {"optimizer": "adam", **data, "average_power": 0.0}  # adam: the default until then
    if data.get("optimizer") == "signum" and data.get("lr") is None:
        m = data.get("num_latents") or data["d"] * data.get(
            "expansion_factor", SaeConfig.expansion_factor
        )
        data["lr"] = 5e-3 / math.sqrt(m / 2**14)
    return data


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
    ``"zeros"`` (the paper). :class:`~gsae.train.step.SaeTrainer` applies the data-dependent parts
    on its first step (:meth:`init_from_batch`).

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
        the batch is not finite (NaN activations, or a layer id the SAE does not cover).

        ``reduce(t)``, for data-parallel training: the sum of a float64 tensor over the processes
        that train this SAE, each holding its part of the batch in ``x`` (possibly none); see
        :func:`gsae.init.init_from_batch`."""
        return init_from_batch(self, self.normalize(x, layer), reduce)

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
            raise FileNotFoundError(
                f"{path} holds no sparsify SAE (expected cfg.json and sae.safetensors)"
            )
        meta = json.loads((path / "cfg.json").read_text())
        if "d_in" not in meta:
            raise ValueError(f"{path / 'cfg.json'} is not a sparsify config (no d_in)")
        unsupported = [
            key
            for key, bad in (("transcode", True), ("skip_connection", True))
            if meta.get(key) == bad
        ]
        if meta.get("activation", "topk") != "topk":
            unsupported.append(f"activation={meta['activation']}")
        if unsupported:
            raise ValueError(
                f"{path}: a sparsify coder with {', '.join(unsupported)} is not a "
                "TopK SAE; gsae cannot load it"
            )
        d = int(meta["d_in"])
        m = int(meta.get("num_latents") or 0) or d * int(meta.get("expansion_factor", 32))
        if layer is None:
            digits = re.search(r"(\d+)$", path.name)
            layer = int(digits.group(1)) if digits else 0
        tensors = load_file(str(path / "sae.safetensors"), device=str(device))
        missing = [n for n in SPARSIFY_NAMES.values() if n not in tensors]
        if missing:
            raise ValueError(f"{path / 'sae.safetensors'} lacks {missing} (sparsify's names)")
        cfg = SaeConfig(
            d=d, num_latents=m, k=int(meta.get("k", 32)), init_encoder="paper", init_b_dec="zeros"
        )
        sae = cls(cfg, [layer], device=device)
        with torch.no_grad():
            for name, theirs in SPARSIFY_NAMES.items():
                weight = tensors[theirs]
                if tuple(weight.shape) != tuple(getattr(sae, name).shape):
                    raise ValueError(
                        f"{path}: {theirs} has shape {tuple(weight.shape)}, "
                        f"expected {tuple(getattr(sae, name).shape)}"
                    )
                getattr(sae, name).copy_(weight.float())
        return sae
