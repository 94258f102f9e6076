"""Trained Group-SAEs on a model: every SAE of a run, addressed by model layer.

:class:`GroupSAEs` loads a gsae-train output folder (through :func:`gsae.run.load_run`)
and, in the model's own units:

- :meth:`~GroupSAEs.encode_layer` / :meth:`~GroupSAEs.decode_layer` /
  :meth:`~GroupSAEs.reconstruct` for activations of any leading shape ``[..., d]``;
- :meth:`~GroupSAEs.splice`: a context manager that replaces the residual stream of chosen
  layers with its reconstruction during every forward inside it;
- :meth:`~GroupSAEs.record`: one that keeps the latents of chosen layers during forwards.

Both are :func:`gsae.activations.splice` and :func:`gsae.activations.record` (the hooks
gsae-eval uses) with the run's SAEs plugged in. Latent values are gsae's: those of the SAE's
normalised input (see :class:`gsae.sae.Sae`); an exported SAE (:mod:`gsae.export`) reports
them divided by the layer's scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from gsae_kernels.topk_encode import EncodeOutput

from .hf.hooks import record, splice
from .hf.models import LoadedModel, load_model
from .run import FinishedRun, load_run
from .sae import Sae


class GroupSAEs:
    """The SAEs of one run, by group name, with the model layer -> SAE map.

    ``GroupSAEs.load("runs/auto")``; ``saes.layers`` lists the covered model layers,
    ``saes.sae(layer)`` the SAE of a layer and ``saes.group(layer)`` its group's name."""

    def __init__(self, saes: dict[str, Sae], run: FinishedRun | None = None):
        self.saes = dict(saes)
        self.run = run
        self._by_layer: dict[int, str] = {}
        for name, sae in self.saes.items():
            for layer in sae.layers:
                if layer in self._by_layer:
                    other = self._by_layer[layer]
                    raise ValueError(f"layer {layer} is covered by two SAEs ({other} and {name})")
                self._by_layer[layer] = name

    @classmethod
    def load(cls, run_dir: str | Path, device="cpu") -> GroupSAEs:
        """Every SAE of the gsae-train run ``run_dir``, on ``device``."""
        run = load_run(run_dir)
        return cls({entry.name: entry.load(device) for entry in run.saes}, run)

    @property
    def layers(self) -> list[int]:
        return sorted(self._by_layer)

    def group(self, layer: int) -> str:
        if layer not in self._by_layer:
            raise KeyError(f"no SAE covers layer {layer} (covered: {self.layers})")
        return self._by_layer[layer]

    def sae(self, layer: int) -> Sae:
        return self.saes[self.group(layer)]

    @property
    def device(self) -> torch.device:
        return next(iter(self.saes.values())).W_dec.device

    def load_model(
        self, device: str | None = None, dtype: str = "fp32", lm_head: bool = True
    ) -> LoadedModel:
        """The run's model (with its LM head where it has one), on the SAEs' device."""
        if self.run is None:
            raise ValueError(
                "these SAEs were not loaded from a run: use gsae.activations.load_model(name)"
            )
        return load_model(self.run.model, dtype, device or str(self.device), lm_head=lm_head)

    # ---- model units in, model units out

    @torch.no_grad()
    def encode_layer(self, x: torch.Tensor, layer: int) -> EncodeOutput:
        """Top-k latents of activations ``x [..., d]`` of model ``layer``: ``values`` and
        ``indices`` ``[..., k]`` (``aux_*`` None)."""
        sae = self.sae(layer)
        lead = x.shape[:-1]
        enc = sae.encode(x.reshape(-1, x.shape[-1]).to(sae.W_dec.device), layer=layer)
        return EncodeOutput(enc.values.view(*lead, -1), enc.indices.view(*lead, -1), None, None)

    @torch.no_grad()
    def decode_layer(self, values: torch.Tensor, indices: torch.Tensor, layer: int) -> torch.Tensor:
        """Activations ``[..., d]`` of model ``layer`` from top-k ``values``/``indices``
        ``[..., k]``."""
        sae = self.sae(layer)
        lead = values.shape[:-1]
        k = values.shape[-1]
        out = sae.decode(
            values.reshape(-1, k).to(sae.W_dec.device),
            indices.reshape(-1, k).to(sae.W_dec.device),
            layer=layer,
        )
        return out.view(*lead, -1)

    def reconstruct(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``x [..., d]`` through the SAE of ``layer``, as float32 on the SAEs' device."""
        enc = self.encode_layer(x, layer)
        return self.decode_layer(enc.values, enc.indices, layer)

    # ---- hooks on a model's forward

    def _layers(self, layers: Sequence[int] | int | None) -> list[int]:
        if layers is None:
            return self.layers
        layers = [layers] if isinstance(layers, int) else [int(x) for x in layers]
        for layer in layers:
            self.group(layer)  # raises for a layer no SAE covers
        return layers

    @contextlib.contextmanager
    def splice(
        self, loaded: LoadedModel, layers: Sequence[int] | int | None = None
    ) -> Iterator[None]:
        """Inside the block, every forward of ``loaded`` continues from the SAE reconstruction
        of the residual stream after each of ``layers`` (default: every covered layer)."""
        fns = {
            layer: (lambda h, layer=layer: self.reconstruct(h, layer).to(h.device))
            for layer in self._layers(layers)
        }
        with splice(loaded, fns):
            yield

    @contextlib.contextmanager
    def record(
        self, loaded: LoadedModel, layers: Sequence[int] | int | None = None
    ) -> Iterator[dict[int, EncodeOutput]]:
        """Yields a dict that every forward inside the block fills with ``{layer:
        EncodeOutput}`` (``values``/``indices`` ``[B, T, k]``) for each of ``layers``
        (default: every covered layer). Entered inside :meth:`splice`, the latents are those
        of the spliced forward."""
        fn = lambda layer, hidden: self.encode_layer(hidden, layer)  # noqa: E731
        with record(loaded, self._layers(layers), fn=fn) as store:
            yield store
