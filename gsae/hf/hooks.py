"""Forward hooks on a model's layers.

- :class:`ActivationReader`: the residual stream after each chosen layer's MLP, ``[L, N, d]``;
  the forward stops after the deepest layer asked for. :func:`hidden_states` streams it over a
  text source.
- :func:`splice` / :func:`record`: context managers whose hooks replace (splice) or keep
  (record) the residual stream of chosen layers during full forwards; :func:`lm_logits` runs one
  (``load_model(..., lm_head=True)`` keeps a causal LM's head for it).

A layer's output equals ``hidden_states[l + 1]`` of transformers for every layer but the last,
where transformers applies the final layer norm first; the hooks give the residual stream itself
for every layer, the last one included (as the paper's sparsify-based code does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from ..device import to_device
from .models import LoadedModel
from .texts import TextSource
from .tokens import StreamPosition, TokenStream


class _StopForward(Exception):
    pass


class ActivationReader:
    """Residual stream after the MLP of the chosen layers, via forward hooks.

    ``reader(input_ids, attention_mask) -> [L, N, d]`` with N the number of non-padding tokens,
    in the model's dtype, on its device. The forward pass stops right after the deepest layer.
    """

    def __init__(self, loaded: LoadedModel, layers: Sequence[int]):
        n = loaded.num_layers
        bad = [layer for layer in layers if not 0 <= int(layer) < n]
        if bad or not layers:
            shown = list(bad or layers)
            raise ValueError(f"layers {shown} out of range: the model has {n} layers (0..{n - 1})")
        self.loaded = loaded
        self.layers = [int(layer) for layer in layers]
        self.deepest = max(self.layers)
        self._captured: dict[int, torch.Tensor] = {}

    def _hook(self, index: int):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self._captured[index] = hidden
            if index == self.deepest:
                raise _StopForward

        return hook

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        model = self.loaded.model
        device = next(model.parameters()).device
        padded = attention_mask is not None and not bool(attention_mask.all())  # on the host
        input_ids = to_device(input_ids, device)
        mask = to_device(attention_mask, device) if attention_mask is not None else None
        layers = self.loaded.layers
        handles = [layers[i].register_forward_hook(self._hook(i)) for i in set(self.layers)]
        self._captured.clear()
        try:
            model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        hidden = torch.stack([self._captured[i] for i in self.layers])  # [L, B, T, d]
        self._captured.clear()
        hidden = hidden.flatten(1, 2)  # [L, B*T, d]
        if padded:
            hidden = hidden[:, mask.flatten().bool()]
        return hidden


def _layer_index(loaded: LoadedModel, layer: int) -> int:
    n = loaded.num_layers
    if not 0 <= int(layer) < n:
        raise ValueError(f"layer {layer} out of range: the model has {n} layers (0..{n - 1})")
    return int(layer)


@contextlib.contextmanager
def splice(loaded: LoadedModel, replacements: dict[int, Callable[[torch.Tensor], torch.Tensor]]):
    """Replace the residual stream after chosen layers in every forward inside the block.

    ``replacements`` maps a model layer to ``fn(hidden [B, T, d]) -> [B, T, d]``, called on the
    layer's output; what it returns (cast to the model's dtype) is what the rest of the forward
    sees. Layers before it run as normal, and the hooks are removed on exit, even on an error.
    An SAE reconstruction spliced in: ``splice(loaded, {l: lambda h: sae(h...)})``; a zero
    ablation: ``{l: torch.zeros_like}``.
    """

    def hook_for(fn):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = fn(hidden)
            if new.shape != hidden.shape:
                raise ValueError(
                    f"a spliced activation must keep the shape {tuple(hidden.shape)},"
                    f" got {tuple(new.shape)}"
                )
            new = new.to(hidden.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    targets = {_layer_index(loaded, layer): fn for layer, fn in replacements.items()}
    handles = [loaded.layers[i].register_forward_hook(hook_for(fn)) for i, fn in targets.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def record(loaded: LoadedModel, layers: Sequence[int], fn=None):
    """Keep the residual stream after ``layers`` during forwards inside the block.

    Yields a dict filled by every forward: ``{layer: hidden [B, T, d]}``, or ``fn(layer,
    hidden)`` when ``fn`` is given (e.g. an SAE's latents). Unlike :class:`ActivationReader`
    the forward runs to the end (the logits are wanted too). Layers hooked by :func:`splice` are
    recorded as spliced when ``record`` is entered inside the ``splice`` block.
    """
    store: dict[int, object] = {}

    def hook_for(layer: int):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            store[layer] = hidden if fn is None else fn(layer, hidden)

        return hook

    targets = sorted({_layer_index(loaded, layer) for layer in layers})
    handles = [loaded.layers[i].register_forward_hook(hook_for(i)) for i in targets]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def lm_logits(
    loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token logits ``[B, T, V]`` of a model loaded with ``lm_head=True`` (one full
    forward: hooks of :func:`splice` and :func:`record` apply)."""
    if not loaded.lm_head:
        raise ValueError(
            f"{loaded.name} was loaded without a causal-LM head "
            f"({loaded.no_head_reason or 'load_model(lm_head=True)'})"
        )
    device = next(loaded.model.parameters()).device
    mask = attention_mask.to(device) if attention_mask is not None else None
    out = loaded.model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
    return out.logits


@contextlib.contextmanager
def hidden_states(
    loaded: LoadedModel,
    layers: Sequence[int],
    texts: TextSource,
    ctx_len: int,
    batch_size: int,
    repeat: bool = False,
    position: StreamPosition | None = None,
) -> Iterator[Iterator[torch.Tensor]]:
    """Yields an iterator of the ``[L, N, d]`` activations of ``layers`` over ``texts``, one
    batch of ``batch_size`` sequences of ``ctx_len`` tokens at a time (the tokenizer runs ahead
    in a thread, stopped when the block ends)."""
    reader = ActivationReader(loaded, layers)
    with TokenStream(texts, loaded.tokenizer, ctx_len, batch_size, position, repeat) as stream:
        yield (reader(b.input_ids, b.attention_mask) for b in stream)
