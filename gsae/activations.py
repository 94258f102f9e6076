"""Residual-stream activations of a transformers model over streamed text.

The only module of gsae that imports transformers and datasets.

- :func:`load_model`: a local directory, a hub id, or a short name (``pythia-160m`` means
  ``EleutherAI/pythia-160m``; ``demo`` the model bundled with gsae). Only the base model is
  loaded (no LM head). Offline, it fails fast with one error naming what was tried.
- :class:`TokenText`: the text of each token of a sequence, for display.
- :func:`iter_texts`: documents from a hub dataset (streamed) or a local ``.txt``/``.jsonl``
  (optionally ``.gz``), parquet file or saved ``datasets`` directory.
- :class:`TokenStream`: tokenizes in a background thread and packs the token stream into
  ``ctx_len`` chunks, documents joined by EOS, no BOS; its position can be saved and restored
  exactly (for resuming a run).
- :class:`ActivationReader`: forward hooks on the chosen layers return the residual stream after
  each layer's MLP, ``[L, N, d]``; the forward stops after the deepest layer asked for.
- :func:`splice` / :func:`record`: context managers whose forward hooks replace (splice) or keep
  (record) the residual stream of chosen layers during full forwards; :func:`lm_logits` runs one.
  ``load_model(..., lm_head=True)`` keeps a causal LM's head for them.
- :func:`load_structure` / :func:`layer_prefix`: a model's modules without weights, and the
  name of its layer list (sparsify's hookpoints: ``layers.5``, ``h.5``, ...);
  :func:`load_tokenizer`: its tokenizer alone.

A layer's output equals ``hidden_states[l + 1]`` of transformers for every layer but the last,
where transformers applies the final layer norm first; the hooks give the residual stream itself
for every layer, the last one included (as the paper's sparsify-based code does).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
DEFAULT_DATASET = "monology/pile-uncopyrighted"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


class ModelLoadError(RuntimeError):
    """A model (or its tokenizer) could not be loaded; the message says what was tried."""


class DatasetLoadError(RuntimeError):
    """A text source could not be opened; the message says what was tried."""


def bundled_dir() -> Path:
    """Where the offline demo model and corpus live (see demo/README.md)."""
    return Path(__file__).resolve().parent / "demo"


def hub_id(name: str) -> str:
    """``pythia-160m`` -> ``EleutherAI/pythia-160m`` (also ``-deduped``); other names as given."""
    base = name.lower()
    if base.startswith("pythia-") and base.removeprefix("pythia-").split("-")[0] in PYTHIA_SIZES:
        return f"EleutherAI/{base}"
    return name


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (skipped when HF_HUB_OFFLINE is set), checked
    once so that an offline machine fails in seconds rather than after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(set(DTYPES))}")
    return DTYPES[name]


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


def load_model(name: str, dtype: str | torch.dtype = "bf16", device: str = "cpu",
               lm_head: bool = False) -> LoadedModel:  # fmt: skip
    """Load the base model (no LM head) and tokenizer of ``name``, for inference.

    ``lm_head=True``: load the causal LM with its head instead, where the checkpoint has one
    (``LoadedModel.lm_head`` says whether it did, ``no_head_reason`` why not); the layers and
    hooks are the same either way."""
    dtype = parse_dtype(dtype)
    tried = []
    if name == "demo":
        name = str(bundled_dir() / "model")
    if Path(name).exists():
        try:
            model, tokenizer = _from_pretrained(name, dtype, lm_head)
        except Exception as err:
            raise ModelLoadError(f"could not load model from local path {name}: {err}") from err
        source = name
    else:
        tried.append(f"no local directory {name!r}")
        source = hub_id(name)
        try:  # the local Hugging Face cache first: works offline, costs nothing
            model, tokenizer = _from_pretrained(source, dtype, lm_head, local_files_only=True)
        except Exception:
            tried.append(f"{source!r} is not in the Hugging Face cache")
            if not hub_reachable():
                tried.append("the Hugging Face hub is unreachable (offline?)")
                raise ModelLoadError(_load_message("model", name, tried, "--model")) from None
            try:
                model, tokenizer = _from_pretrained(source, dtype, lm_head)
            except Exception as err:
                tried.append(f"the hub refused {source!r}: {err}")
                raise ModelLoadError(_load_message("model", name, tried, "--model")) from None
    model = model.to(device).eval().requires_grad_(False)
    has_head = lm_head and hasattr(model, "get_output_embeddings") and (
        model.get_output_embeddings() is not None)  # fmt: skip
    reason = "" if has_head or not lm_head else (
        f"{type(model).__name__} has no causal-LM head in {source}")  # fmt: skip
    return LoadedModel(model, tokenizer, name, source, find_layers(model), has_head, reason)


def _lookup(name: str, load: Callable[..., object]):
    """``load(source, **kwargs)`` for the first source of ``name`` that works, as
    :func:`load_model` looks: a local directory (``demo``: the bundled model), the Hugging Face
    cache, the hub; one :class:`ModelLoadError` naming what was tried otherwise."""
    source = str(bundled_dir() / "model") if name == "demo" else name
    if Path(source).exists():
        try:
            return load(source)
        except Exception as err:
            raise ModelLoadError(f"could not load {source}: {err}") from None
    tried = [f"no local directory {name!r}"]
    source = hub_id(name)
    try:  # the cache first: works offline
        return load(source, local_files_only=True)
    except Exception:
        tried.append(f"{source!r} is not in the Hugging Face cache")
    if not hub_reachable():
        tried.append("the Hugging Face hub is unreachable (offline?)")
    else:
        try:
            return load(source)
        except Exception as err:
            tried.append(f"the hub refused {source!r}: {err}")
    raise ModelLoadError(_load_message("model", name, tried, "--model"))


def load_structure(name: str) -> LoadedModel:
    """The modules of ``name`` without its weights (built on the meta device from its config,
    no tokenizer): layer names and sizes at no cost, e.g. for naming exported SAEs."""
    from transformers import AutoConfig, AutoModel

    config = _lookup(name, AutoConfig.from_pretrained)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return LoadedModel(model, None, name, name, find_layers(model))


def load_tokenizer(name: str):
    """The tokenizer of model ``name`` alone (looked up as :func:`load_model` does)."""
    from transformers import AutoTokenizer

    return _lookup(name, AutoTokenizer.from_pretrained)


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


def _load_message(what: str, name: str, tried: list[str], flag: str) -> str:
    hints = {
        "model": "a local directory saved with save_pretrained",
        "dataset": "a local .txt/.jsonl/.parquet file or a saved datasets directory",
    }
    hint = hints[what]
    return f"could not load {what} {name!r}: " + "; ".join(tried) + f". Pass {hint} with {flag}."


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the ModuleList with one entry per hidden layer
    (``gpt_neox.layers``, ``transformer.h``, ``model.layers``, ``encoder.layer``, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    candidates = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    matches = [m for m in candidates if n is None or len(m) == n]
    if not matches:
        raise ModelLoadError(f"cannot find the {n} transformer layers of {type(model).__name__}")
    return max(matches, key=lambda m: sum(p.numel() for p in m.parameters()))


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _paragraphs(path: Path) -> Iterator[str]:
    """A ``.txt`` file: documents separated by blank lines (newlines inside are kept)."""
    lines: list[str] = []
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).strip("\n")
                lines = []
    if lines:
        yield "".join(lines).strip("\n")


def _jsonl(path: Path, column: str) -> Iterator[str]:
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if column not in record:
                    raise DatasetLoadError(f"{path}:{number} has no {column!r} field")
                yield record[column]


def iter_texts(dataset: str, split: str = "train", column: str = "text") -> Iterator[str]:
    """Documents of ``dataset``: a local file or directory, ``demo``, or a hub dataset id."""
    if dataset == "demo":
        dataset = str(bundled_dir() / "corpus.txt.gz")
    path = Path(dataset)
    if path.exists():
        return _local_texts(path, split, column)
    tried = [f"no local file or directory {dataset!r}"]
    if not hub_reachable():
        tried.append("the Hugging Face hub is unreachable (offline?)")
        raise DatasetLoadError(_load_message("dataset", dataset, tried, "--dataset"))
    try:
        import datasets

        stream = datasets.load_dataset(dataset, split=split, streaming=True)
    except Exception as err:
        tried.append(f"the hub could not open {dataset!r} (split {split!r}): {err}")
        raise DatasetLoadError(_load_message("dataset", dataset, tried, "--dataset")) from None
    return (record[column] for record in stream)


def _local_texts(path: Path, split: str, column: str) -> Iterator[str]:
    suffixes = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if path.is_dir():
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
        return iter(data[column])
    if suffixes in (".txt", ".txt.gz"):
        return _paragraphs(path)
    if suffixes in (".jsonl", ".jsonl.gz", ".json", ".json.gz"):
        return _jsonl(path, column)
    if suffixes == ".parquet":
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path).iter_batches(columns=[column])
        return (text for batch in batches for text in batch.column(0).to_pylist())
    raise DatasetLoadError(
        f"cannot read {path}: expected .txt, .jsonl or .parquet (optionally .gz) "
        "or a saved datasets directory"
    )


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


class TokenText:
    """The text of each token of a sequence, for display (the latent browser, auto-interp
    prompts). Tokens are decoded one by one (cached); where that gives a broken character (a
    byte-level BPE splits a multi-byte character over tokens), the sequence is decoded
    incrementally instead, so each token shows the characters it completes ("" for a token
    that completes none)."""

    BROKEN = "\ufffd"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._one: dict[int, str] = {}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def __call__(self, ids: Sequence[int]) -> list[str]:
        ids = [int(i) for i in ids]
        pieces = []
        for i in ids:
            if i not in self._one:
                self._one[i] = self._decode([i])
            pieces.append(self._one[i])
        if not any(self.BROKEN in p for p in pieces):
            return pieces
        out, done = [], ""
        for j in range(len(ids)):
            text = self._decode(ids[: j + 1])
            if text.endswith(self.BROKEN) and j + 1 < len(ids):
                out.append("")  # an unfinished character: shown with the token that ends it
            elif text.startswith(done):
                out.append(text[len(done) :])
                done = text
            else:  # decoding is not prefix-stable here: the token on its own
                out.append(pieces[j])
                done = text
        return out


@dataclass
class StreamPosition:
    """Where a token stream stands: documents consumed and the tokens carried over after the
    last emitted chunk. Restoring it reproduces the rest of the stream exactly."""

    documents: int = 0
    carry: list[int] = field(default_factory=list)
    epoch: int = 0

    def to_dict(self) -> dict:
        return {"documents": self.documents, "carry": list(self.carry), "epoch": self.epoch}

    @classmethod
    def from_dict(cls, d: dict) -> StreamPosition:
        return cls(int(d["documents"]), [int(t) for t in d["carry"]], int(d.get("epoch", 0)))


@dataclass
class TokenBatch:
    """``input_ids``/``attention_mask`` ``[B, T]``, and the stream position after this batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position: StreamPosition

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


class TokenStream:
    """Packs documents into ``[B, ctx_len]`` batches in a background thread.

    Documents are tokenized without special tokens and joined by EOS (no BOS, as the paper).
    The last, partial chunk of a finite source is padded and masked. ``repeat=True`` cycles over
    a finite source (small local corpora). Iterate to get :class:`TokenBatch` objects.
    """

    def __init__(self, texts_fn, tokenizer, ctx_len: int = 1024, batch_size: int = 8,
                 position: StreamPosition | None = None, repeat: bool = False,
                 prefetch: int = 4, docs_per_call: int = 64):  # fmt: skip
        if ctx_len < 2 or batch_size < 1:
            raise ValueError(f"need ctx_len >= 2 and batch_size >= 1, got {ctx_len}, {batch_size}")
        self.texts_fn = texts_fn  # () -> iterator of documents, from the start
        self.tokenizer = tokenizer
        self.ctx_len, self.batch_size = ctx_len, batch_size
        self.start = position or StreamPosition()
        self.repeat = repeat
        self.docs_per_call = docs_per_call
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.eos = eos if eos is not None else tokenizer.sep_token_id  # BERT-style: [SEP]
        self.pad = pad if pad is not None else (self.eos or 0)
        if self.eos is None:
            raise ValueError("the tokenizer has no EOS (or SEP) token to join documents with")
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True, name="gsae-tokenize")
        self._thread.start()

    # -- worker

    def _documents(self) -> Iterator[tuple[int, int, str]]:
        """(epoch, index, text) from the saved position on."""
        epoch = self.start.epoch
        skip = self.start.documents
        while True:
            index = 0
            for text in self.texts_fn():
                index += 1
                if index <= skip:
                    continue
                yield epoch, index, text
            if not self.repeat or index == 0:
                return
            epoch, skip = epoch + 1, 0

    def _chunks(self) -> Iterator[tuple[list[int], int, StreamPosition]]:
        """(tokens [ctx_len], real length, position after the chunk), tokenizing documents
        ``docs_per_call`` at a time (fast tokenizers run a batch in parallel, outside the GIL)."""
        carry = list(self.start.carry)
        last = (self.start.epoch, self.start.documents)
        pending: list[tuple[int, int, str]] = []
        documents = self._documents()
        while True:
            pending = [doc for _, doc in zip(range(self.docs_per_call), documents, strict=False)]
            if not pending:
                break
            ids = self.tokenizer([t for _, _, t in pending], add_special_tokens=False)["input_ids"]
            for (epoch, index, _), tokens in zip(pending, ids, strict=True):
                carry.extend(tokens)
                carry.append(self.eos)
                last = (epoch, index)
                while len(carry) >= self.ctx_len:
                    chunk = carry[: self.ctx_len]
                    del carry[: self.ctx_len]
                    yield chunk, self.ctx_len, StreamPosition(index, list(carry), epoch)
        if carry:  # a finite source's last, partial chunk: padded, and masked in the batch
            padded = carry + [self.pad] * (self.ctx_len - len(carry))
            yield padded, len(carry), StreamPosition(last[1], [], last[0])

    def _work(self) -> None:
        try:
            rows, lengths = [], []
            for chunk, length, pos in self._chunks():
                rows.append(chunk)
                lengths.append(length)
                if len(rows) == self.batch_size:
                    if not self._put(self._batch(rows, lengths, pos)):
                        return  # closed by the consumer
                    rows, lengths = [], []
            if rows and not self._put(self._batch(rows, lengths, pos)):
                return
            self._put(None)
        except BaseException as err:  # hand it to the consumer
            self._put(err)

    def _batch(self, rows, lengths, pos) -> TokenBatch:
        ids = torch.tensor(rows, dtype=torch.long)
        mask = torch.arange(self.ctx_len)[None, :] < torch.tensor(lengths)[:, None]
        return TokenBatch(ids, mask.long(), pos)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # -- consumer

    def __iter__(self) -> Iterator[TokenBatch]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the worker and wait for it (a thread left inside the tokenizer at interpreter
        exit aborts the process)."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


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
        input_ids = input_ids.to(device, non_blocking=True)
        mask = attention_mask.to(device, non_blocking=True) if attention_mask is not None else None
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


# --------------------------------------------------------------------------------------------
# Hooks for full forwards: splice and record
# --------------------------------------------------------------------------------------------


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
                raise ValueError(f"a spliced activation must keep the shape {tuple(hidden.shape)},"
                                 f" got {tuple(new.shape)}")  # fmt: skip
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
def lm_logits(loaded: LoadedModel, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Next-token logits ``[B, T, V]`` of a model loaded with ``lm_head=True`` (one full
    forward: hooks of :func:`splice` and :func:`record` apply)."""
    if not loaded.lm_head:
        raise ValueError(f"{loaded.name} was loaded without a causal-LM head "
                         f"({loaded.no_head_reason or 'load_model(lm_head=True)'})")  # fmt: skip
    device = next(loaded.model.parameters()).device
    mask = attention_mask.to(device) if attention_mask is not None else None
    out = loaded.model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
    return out.logits
