"""The TopK SAE of the paper and its training step.

``Sae`` is :class:`gsae_kernels.TopKSAE` plus what training and reuse need: a config, the layers
it covers and a per-layer activation scale. The scale is applied inside encode/decode, so callers
pass and get activations in the model's own units, while the SAE itself (and its loss) works on
activations normalised to mean squared norm 1 (paper, Appendix A).

``SaeTrainer`` owns the optimiser and the dead-latent counters and runs one step at a time:

1. normalise x, encode (TopK + the AuxK selection among dead latents), decode, FVU + AuxK/32;
2. backward through the sparse kernels;
3. drop the part of each decoder row's gradient parallel to the row, Adam step, renormalise
   the rows to unit norm;
4. reset the counter of every latent that fired (value > 0), advance the others by N.

A step whose loss is not finite changes nothing: with ``check_finite=True`` (the default) it
raises ``FloatingPointError`` before the update; with ``check_finite=False`` (the trainer's hot
loop, which must not sync the GPU every step) the fused Adam kernel skips the update on the device
and :attr:`SaeTrainer.skipped_steps` counts it, for the caller to check at its logging interval.

Everything is saved as safetensors and JSON (no pickle is ever loaded): the SAE as
``sae.safetensors`` + ``cfg.json``, the trainer's optimiser and counters as ``state.safetensors``
+ ``state.json``. A file that cannot be read gives a ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from gsae_kernels import ForwardOutput, TopKSAE
from gsae_kernels.topk_encode import EncodeOutput
from safetensors.torch import load_file

from .io import atomic_dir, dumps_json, recover_dir, save_safetensors

SCALE_MODES = ("mean_sq", "mean_norm", "none")
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"  # beside the SAE files
NORM_CHUNK_ELEMENTS = 1 << 24  # scale estimate: at most this many values upcast at once


@dataclasses.dataclass
class SaeConfig:
    """Hyperparameters of one SAE (defaults: the paper's Table 4)."""

    d: int
    expansion_factor: int = 16
    num_latents: int | None = None  # overrides expansion_factor
    k: int = 128
    auxk_alpha: float = 1 / 32
    k_aux: int | None = None  # default d // 2 (capped by the number of dead latents)
    dead_threshold: int = 10_000_000  # tokens without firing before a latent counts as dead
    lr: float | None = None  # default 2e-4 / sqrt(m / 2^14)
    betas: tuple[float, float] = (0.9, 0.999)
    init_b_dec: str = "zeros"  # or "mean": b_dec starts at the mean of the first batch
    scale_mode: str = "mean_sq"  # paper: E||s x||^2 = 1; "mean_norm": E||s x|| = 1 (authors' code)
    scale_tokens: int = 5_000_000  # tokens used to estimate each layer's scale
    seed: int = 0

    @property
    def m(self) -> int:
        return self.num_latents if self.num_latents is not None else self.d * self.expansion_factor

    @property
    def lr_value(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.m / 2**14)

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
            (
                self.init_b_dec in ("zeros", "mean"),
                f"init_b_dec: zeros|mean, not {self.init_b_dec!r}",
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
        kwargs = {k: v for k, v in data.items() if k in names}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs).validate()


def activation_scales(
    batches: Iterable[torch.Tensor], tokens: int, mode: str = "mean_sq"
) -> list[float]:
    """Per-source scales s with ``E||s x||^2 = 1`` (``mean_sq``) or ``E||s x|| = 1``
    (``mean_norm``), from the first ``tokens`` tokens of ``batches`` (each ``[L, N, d]``: L
    sources side by side). Streamed: each token's norm is taken in float32 (a bounded slice of
    tokens upcast at a time) and only the sums over tokens are float64, so no float64 copy of the
    activations is ever made (8 GiB at Pythia-1B sizes)."""
    if mode not in SCALE_MODES:
        raise ValueError(f"scale mode must be one of {SCALE_MODES}, got {mode!r}")
    total, seen = None, 0
    for batch in batches:
        h = batch[:, : tokens - seen]  # [L, n, d]
        chunk = max(1, NORM_CHUNK_ELEMENTS // max(1, h.shape[0] * h.shape[2]))
        for i in range(0, h.shape[1], chunk):
            norms = torch.linalg.vector_norm(h[:, i : i + chunk], dim=2, dtype=torch.float32)
            values = norms.square() if mode == "mean_sq" else norms  # [L, chunk]
            part = values.sum(1, dtype=torch.float64).cpu()  # [L]
            total = part if total is None else total + part
        seen += h.shape[1]
        if seen >= tokens:
            break
    if total is None or seen == 0:
        raise ValueError(f"cannot estimate an activation scale from {seen} tokens")
    if mode == "none":
        return [1.0] * len(total)
    mean = total / seen
    if not bool(torch.isfinite(mean).all()) or bool((mean <= 0).any()):
        raise ValueError(f"cannot estimate an activation scale from {seen} tokens (means {mean})")
    return (mean.rsqrt() if mode == "mean_sq" else mean.reciprocal()).tolist()


def activation_scale(batches: Iterable[torch.Tensor], tokens: int, mode: str = "mean_sq") -> float:
    """:func:`activation_scales` for a single source: ``batches`` are ``[N, d]``."""
    if mode == "none":
        return 1.0
    return activation_scales((b.unsqueeze(0) for b in batches), tokens, mode)[0]


class Sae(TopKSAE):
    """A TopK SAE over the activations of ``layers`` (one scale per layer).

    ``layer`` arguments name model layers: an int for a whole batch, or an int tensor ``[N]`` for
    a per-token layer (a Group-SAE batch mixes the layers of its group).
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
            return self.scales[self.layer_position[layer]].unsqueeze(1)
        return self.scales[self._position(int(layer))]

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

    def forward(self, x, dead_mask=None, k_aux=0, *, layer=None) -> ForwardOutput:
        """``x_hat`` in model units; the loss is the normalised one that training minimises."""
        out = super().forward(self.normalize(x, layer), dead_mask, k_aux)
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


class StepOutput(NamedTuple):
    """Device scalars of one step (reading them syncs the GPU): the loss that was minimised,
    its FVU and AuxK terms, the mean number of active latents and the fraction of dead ones."""

    loss: torch.Tensor
    fvu: torch.Tensor
    auxk: torch.Tensor
    l0: torch.Tensor
    dead_fraction: torch.Tensor


class SaeTrainer:
    """Optimiser, dead-latent counters and the training step of one :class:`Sae`."""

    def __init__(self, sae: Sae):
        self.sae = sae
        self.cfg = sae.cfg
        device = sae.W_dec.device
        # fused Adam honours found_inf on the device: a non-finite step is skipped without a sync
        self.optimizer = torch.optim.Adam(
            sae.parameters(), lr=self.cfg.lr_value, betas=self.cfg.betas, fused=True
        )
        self.tokens_since_fired = torch.zeros(sae.m, dtype=torch.int64, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.tokens_seen = 0  # tokens of every step, skipped ones included (no sync to know)
        self.steps = 0

    @property
    def tokens_trained(self) -> int:
        """Tokens of the steps that updated the SAE (reading it syncs the GPU)."""
        return self.tokens_seen - int(self.skipped_tokens)

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_threshold

    def _k_aux(self, dead: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """AuxK width for this step, and (on a GPU) a 0/1 factor for 'any latent dead'."""
        if self.tokens_seen < self.cfg.dead_threshold:
            return 0, None  # nothing can be dead yet: skip AuxK without looking
        if dead.device.type == "cpu":
            return min(self.cfg.k_aux_value, int(dead.sum())), None  # free on a CPU
        # on a GPU a fixed width keeps the step sync-free; spare slots carry value 0, and the
        # factor zeroes AuxK when nothing is dead, which is what k_aux = 0 would give
        return self.cfg.k_aux_value, dead.any().to(torch.float32)

    def step(
        self, x: torch.Tensor, layer: int | torch.Tensor | None = None, check_finite: bool = True,
        tokens: int | None = None,
    ) -> StepOutput:  # fmt: skip
        """One optimisation step on ``x [N, d]`` (model units) from ``layer``. ``tokens``: how
        many tokens the rows stand for (default N; fewer when x stacks several layers of each
        token), which is what the dead-latent counters count."""
        sae = self.sae
        if self.cfg.init_b_dec == "mean" and self.steps == 0:
            with torch.no_grad():
                sae.b_dec.copy_(sae.normalize(x, layer).mean(0))
        dead = self.dead_mask()
        k_aux, any_dead = self._k_aux(dead)
        out = sae(x, dead if k_aux else None, k_aux, layer=layer)
        auxk = out.loss.auxk if any_dead is None else out.loss.auxk * any_dead
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
        since = torch.where(hits > 0, 0, self.tokens_since_fired + n)
        self.tokens_since_fired.copy_(torch.where(finite, since, self.tokens_since_fired))
        self.skipped_tokens += (~finite).to(torch.int64) * n
        self.tokens_seen += n
        self.steps += 1

    # ---- resume state

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "skipped_steps": int(self.skipped_steps),
            "skipped_tokens": int(self.skipped_tokens),
            "tokens_seen": self.tokens_seen,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.skipped_steps.fill_(state["skipped_steps"])
        self.skipped_tokens.fill_(state.get("skipped_tokens", 0))
        self.tokens_seen = state["tokens_seen"]
        self.steps = state["steps"]

    def save(self, path: str | Path) -> None:
        """The SAE and this trainer's state, in ``path`` as a whole, so that a resumed run
        continues exactly."""
        with atomic_dir(path) as tmp:
            self.save_files(tmp)

    def save_files(self, directory: Path) -> None:
        """The SAE's files and the state files into an existing directory (the caller makes the
        write atomic, e.g. one directory swap for a whole multi-SAE checkpoint)."""
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
