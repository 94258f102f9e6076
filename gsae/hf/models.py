"""A transformers model for activation reading.

:func:`load_model`: a local directory, a hub id, or a short name (``pythia-160m`` means
``EleutherAI/pythia-160m``; ``demo`` the model bundled with gsae). Only the base model is
loaded (no LM head) unless ``lm_head=True``. Offline, it fails fast with one error naming what
was tried. :func:`context_length` keeps the context within the model's position limit;
:func:`load_structure` / :func:`layer_prefix`: a model's modules without weights, and the name
of its layer list (sparsify's hookpoints: ``layers.5``, ``h.5``, ...); :func:`load_tokenizer`:
its tokenizer alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..device import default_dtype, parse_dtype, resolve_device
from .hub import bundled_dir, hub_id, hub_reachable, load_message


class ModelLoadError(RuntimeError):
    """A model (or its tokenizer) could not be loaded; the message says what was tried."""


@dataclass
class LoadedModel:
    """A base model ready for activation reading, with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object
    name: str  # as asked for
    source: str  # the local path or hub id it was loaded from
    layers: nn.ModuleList = field(repr=False)
    lm_head: bool = False  # the model is a causal LM with its head (load_model(lm_head=True))
    no_head_reason: str = ""  # why lm_head=True found no usable head

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer block (for the FLOP model)."""
        return sum(p.numel() for p in self.layers[0].parameters())

    @property
    def position_limit(self) -> int | None:
        """The longest sequence the model takes (None when it states no limit)."""
        return position_limit(self.model.config)


# position limits go by many names; encoders of the RoBERTa family count from padding_idx + 1
POSITION_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "n_ctx",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
)
PADDING_OFFSET_TYPES = (
    "roberta",
    "xlm-roberta",
    "camembert",
    "longformer",
    "data2vec-text",
    "xmod",
    "roberta-prelayernorm",
)
DEFAULT_CTX_LEN = 1024


def position_limit(config) -> int | None:
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", "") in PADDING_OFFSET_TYPES:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return None


class ContextLength(NamedTuple):
    """The context length a command uses, and whether the model's limit shortened the default."""

    tokens: int
    capped: bool


def context_length(
    loaded: LoadedModel, requested: int | None, default: int = DEFAULT_CTX_LEN
) -> ContextLength:
    """``requested`` if the model takes it (a clear error if not); with None the default, capped
    at the model's position limit."""
    limit = loaded.position_limit
    if requested is None:
        if limit is not None and limit < default:
            return ContextLength(limit, True)
        return ContextLength(default, False)
    if requested < 2:
        raise ValueError(f"--ctx-len {requested}: need at least 2 tokens per sequence")
    if limit is not None and requested > limit:
        raise ValueError(
            f"--ctx-len {requested} is longer than the {limit} positions "
            f"{loaded.name} takes; pass --ctx-len {limit} or less (by default it "
            "is capped at the limit)"
        )
    return ContextLength(requested, False)


def _from_pretrained(source: str, dtype: torch.dtype, lm_head: bool = False, **kwargs):
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the base model of a *ForCausalLM checkpoint: its
    try:  # unused LM head would be reported as an unexpected weight
        model = _causal_lm(source, dtype, **kwargs) if lm_head else None
        if model is None:
            model = AutoModel.from_pretrained(source, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    return model, tokenizer


def _causal_lm(source: str, dtype: torch.dtype, **kwargs):
    """The model with its causal-LM head, or None when its config names no causal-LM class or
    the checkpoint lacks head weights (a head initialised at random would give meaningless
    losses; an encoder's masked-LM head does not predict the next token)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, **kwargs)
    names = getattr(config, "architectures", None) or []
    if not any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return None
    model, info = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, output_loading_info=True, **kwargs
    )
    return None if info.get("missing_keys") else model


def load_model(
    name: str, dtype: str | torch.dtype | None = None, device: str = "cpu", lm_head: bool = False
) -> LoadedModel:
    """Load the base model (no LM head) and tokenizer of ``name``, for inference, in ``dtype``
    (default: :func:`default_dtype` of the device) on ``device`` (``auto`` allowed).

    ``lm_head=True``: load the causal LM with its head instead, where the checkpoint has one
    (``LoadedModel.lm_head`` says whether it did, ``no_head_reason`` why not); the layers and
    hooks are the same either way."""
    device = resolve_device(device)
    dtype = parse_dtype(dtype if dtype is not None else default_dtype(device))

    def load(source, **kwargs):
        return _from_pretrained(source, dtype, lm_head, **kwargs)

    (model, tokenizer), source = _lookup(name, load)
    model = model.to(device).eval().requires_grad_(False)
    has_head = (
        lm_head
        and hasattr(model, "get_output_embeddings")
        and (model.get_output_embeddings() is not None)
    )
    reason = (
        ""
        if has_head or not lm_head
        else (f"{type(model).__name__} has no causal-LM head in {source}")
    )
    return LoadedModel(model, tokenizer, name, source, find_layers(model), has_head, reason)


def _lookup(name: str, load: Callable[..., object]) -> tuple[object, str]:
    """``(load(source, **kwargs), source)`` for the first source of ``name`` that works: a local
    directory (``demo``: the bundled model), the Hugging Face cache (works offline, costs
    nothing), the hub; one :class:`ModelLoadError` naming what was tried otherwise."""
    local = str(bundled_dir() / "model") if name == "demo" else name
    if Path(local).exists():
        try:
            return load(local), str(Path(local).resolve())
        except Exception as err:
            raise ModelLoadError(f"could not load model from local path {local}: {err}") from err
    tried = [f"no local directory {name!r}"]
    source = hub_id(name)
    try:
        return load(source, local_files_only=True), source
    except Exception:
        tried.append(f"{source!r} is not in the Hugging Face cache")
    if not hub_reachable():
        tried.append("the Hugging Face hub is unreachable (offline?)")
    else:
        try:
            return load(source), source
        except Exception as err:
            tried.append(f"the hub refused {source!r}: {err}")
    raise ModelLoadError(load_message("model", name, tried, "--model"))


def load_structure(name: str) -> LoadedModel:
    """The modules of ``name`` without its weights (built on the meta device from its config,
    no tokenizer): layer names and sizes at no cost, e.g. for naming exported SAEs."""
    from transformers import AutoConfig, AutoModel

    config, source = _lookup(name, AutoConfig.from_pretrained)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return LoadedModel(model, None, name, source, find_layers(model))


def load_tokenizer(name: str):
    """The tokenizer of model ``name`` alone (looked up as :func:`load_model` does)."""
    from transformers import AutoTokenizer

    return _lookup(name, AutoTokenizer.from_pretrained)[0]


def layer_prefix(loaded: LoadedModel) -> str:
    """The dotted name of the model's list of layers inside its base model: ``layers``
    (GPT-NeoX, Llama, Mistral, Qwen), ``h`` (GPT-2), ``encoder.layer`` (BERT), ... With
    ``.N`` appended it names layer N's output as sparsify's hookpoints do (sparsify names the
    modules of ``model.base_model``)."""
    base = getattr(loaded.model, "base_model", loaded.model)
    for name, module in base.named_modules():
        if module is loaded.layers:
            return name
    raise ModelLoadError(f"the layers of {loaded.name} are not inside its base model")


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the ModuleList with one entry per hidden layer
    (``gpt_neox.layers``, ``transformer.h``, ``model.layers``, ``encoder.layer``, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    candidates = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    matches = [m for m in candidates if n is None or len(m) == n]
    if not matches:
        raise ModelLoadError(f"cannot find the {n} transformer layers of {type(model).__name__}")
    return max(matches, key=lambda m: sum(p.numel() for p in m.parameters()))
