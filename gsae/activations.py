"""Residual-stream activations of a transformers model over streamed text.

The only module of gsae that imports transformers and datasets.

- :func:`load_model`: a local directory, a hub id, or a short name (``pythia-160m`` means
  ``EleutherAI/pythia-160m``; ``demo`` the model bundled with gsae). Only the base model is
  loaded (no LM head). Offline, it fails fast with one error naming what was tried.
  :func:`default_dtype` is the one policy for the forward's dtype (bf16 on a GPU, fp32 on a CPU)
  and :func:`context_length` keeps the context within the model's position limit.
- :func:`open_texts`: a :class:`TextSource` of documents from a hub dataset (streamed) or a local
  ``.txt``/``.jsonl`` (optionally ``.gz``), parquet file or saved ``datasets`` directory, opened
  once and read as often as needed, from the start or from a saved state without reading what
  came before it (byte offsets, row numbers, or the streaming dataset's own ``state_dict``).
- :class:`TokenText`: the text of each token of a sequence, for display.
- :class:`TokenStream`: tokenizes in a background thread and packs the token stream into
  ``ctx_len`` chunks, documents joined by EOS, no BOS, in time linear in the text; its position
  (a few numbers) can be saved and restored exactly (for resuming a run).
- :class:`ActivationReader`: forward hooks on the chosen layers return the residual stream after
  each layer's MLP, ``[L, N, d]``; the forward stops after the deepest layer asked for.
- :func:`splice` / :func:`record`: context managers whose forward hooks replace (splice) or keep
  (record) the residual stream of chosen layers during full forwards; :func:`lm_logits` runs one.
  ``load_model(..., lm_head=True)`` keeps a causal LM's head for them.
  :func:`hidden_states` streams them over a text source.
- :func:`load_structure` / :func:`layer_prefix`: a model's modules without weights, and the
  name of its layer list (sparsify's hookpoints: ``layers.5``, ``h.5``, ...);
  :func:`load_tokenizer`: its tokenizer alone.

A layer's output equals ``hidden_states[l + 1]`` of transformers for every layer but the last,
where transformers applies the final layer norm first; the hooks give the residual stream itself
for every layer, the last one included (as the paper's sparsify-based code does).
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gzip
import json
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
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
    once so that an offline machine fails in seconds rather than after minutes of retries.

    The question goes to ``HF_ENDPOINT`` (a mirror) through huggingface_hub's own HTTP client, so
    ``HTTPS_PROXY``/``HTTP_PROXY`` and any client factory the user set are honoured; any answer,
    even an error status, means the hub is there."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session
    except ImportError:
        return False
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception:
        return False
    return True


def resolve_device(name: str) -> str:
    """``auto``: the GPU when there is one (CUDA or ROCm), else the CPU; other names as given,
    once checked: a name torch does not know, or a GPU this torch cannot use (a CPU-only build,
    no driver, an index beyond the GPUs there are), is a ValueError naming it, before any work."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return name
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu
    if backend is None or not hasattr(backend, "is_available"):
        raise ValueError(f"--device {name}: gsae runs on cpu or a GPU (cuda, cuda:N)")
    if not backend.is_available():
        cpu_build = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
        why = "it is a CPU-only build" if cpu_build else "it finds no GPU or driver"
        raise ValueError(
            f"--device {name}: this torch cannot use a {device.type} device "
            f"({why}); pass --device cpu, or auto"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"--device {name}: this machine has {count} {device.type} device(s) "
            f"({device.type}:0..{device.type}:{count - 1})"
        )
    return name


def default_dtype(device: str) -> str:
    """The model forward's dtype when none is asked for, the same for every command: bf16 on a
    GPU, fp32 on a CPU (which has no fast bf16 matmul, and where fp32 is the paper's setting)."""
    return "fp32" if torch.device(resolve_device(device)).type == "cpu" else "bf16"


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

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer block (for the FLOP model)."""
        return sum(p.numel() for p in self.layers[0].parameters())

    @property
    def position_limit(self) -> int | None:
        """The longest sequence the model takes (None when it states no limit)."""
        return position_limit(self.model.config)


# position limits go by many names; encoders of the RoBERTa family count from padding_idx + 1
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length",
                 "max_sequence_length")  # fmt: skip
PADDING_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text",
                        "xmod", "roberta-prelayernorm")  # fmt: skip
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


def context_length(loaded: LoadedModel, requested: int | None,
                   default: int = DEFAULT_CTX_LEN) -> ContextLength:  # fmt: skip
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
        raise ValueError(f"--ctx-len {requested} is longer than the {limit} positions "
                         f"{loaded.name} takes; pass --ctx-len {limit} or less (by default it "
                         "is capped at the limit)")  # fmt: skip
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


def load_model(name: str, dtype: str | torch.dtype | None = None, device: str = "cpu",
               lm_head: bool = False) -> LoadedModel:  # fmt: skip
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
    has_head = lm_head and hasattr(model, "get_output_embeddings") and (
        model.get_output_embeddings() is not None)  # fmt: skip
    reason = "" if has_head or not lm_head else (
        f"{type(model).__name__} has no causal-LM head in {source}")  # fmt: skip
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
    raise ModelLoadError(_load_message("model", name, tried, "--model"))


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


class TextSource:
    """The documents of one dataset, opened once and read as often as needed.

    ``read(state)`` yields ``(document, state after it)``; passing a saved state resumes right
    after that document without reading what came before it. States are small JSON-able dicts.
    """

    name = "texts"

    def read(self, state: dict | None = None) -> Iterator[tuple[str, dict]]:
        raise NotImplementedError

    def texts(self) -> Iterator[str]:
        """The documents alone, from the first."""
        return (text for text, _ in self.read())


class _LineFile(TextSource):
    """A ``.txt`` (documents separated by blank lines, newlines inside kept) or ``.jsonl`` file,
    optionally gzipped; the state is a byte offset into the (uncompressed) text."""

    SNIFF = 1 << 20  # bytes checked when the file is opened

    def __init__(self, path: Path, kind: str, column: str, start: int = 0, end: int | None = None):
        """``start``/``end``: the byte offsets of a part of the file (a split of the demo)."""
        self.path, self.kind, self.column = path, kind, column
        self.start, self.end = start, end
        self.name = str(path)
        self._check()

    def _open(self):
        return gzip.open(self.path, "rb") if self.path.suffix == ".gz" else open(self.path, "rb")

    def _check(self) -> None:
        """Refuse, naming the file, one that is empty, not gzip though named .gz, binary or not
        UTF-8, judged on its first MiB (a bad byte further on is named when it is read)."""
        try:
            with self._open() as f:
                head = f.read(self.SNIFF)
        except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
            raise DatasetLoadError(f"cannot read {self.path}: {err}") from None
        if not head.strip():
            raise DatasetLoadError(
                f"{self.path} holds no text (it is empty or blank): pass a "
                "file with documents as --dataset"
            )
        if b"\0" in head:
            raise DatasetLoadError(
                f"{self.path} is a binary file, not {self.kind} text "
                f"(a NUL byte at byte {head.index(0)})"
            )
        try:  # incremental: a character cut at the end of the sniffed part is not an error
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as err:
            raise DatasetLoadError(self._not_utf8(err.start)) from None

    def _not_utf8(self, offset: int) -> str:
        return (
            f"{self.path} is not UTF-8 text (an invalid byte at byte {offset}); convert it, "
            "e.g. iconv -f latin1 -t utf-8"
        )

    def read(self, state=None):
        offset = int(state["offset"]) if state else self.start
        with self._open() as f:
            if offset:
                f.seek(offset)  # a gzip file decompresses up to it, reading nothing else
            lines: list[str] = []
            for raw in f:
                if self.end is not None and offset >= self.end:
                    break  # the end of this part: a document starts there
                start, offset = offset, offset + len(raw)
                try:
                    line = raw.decode("utf-8").replace("\r\n", "\n")
                except UnicodeDecodeError as err:
                    raise DatasetLoadError(self._not_utf8(start + err.start)) from None
                if self.kind == "jsonl":
                    if line.strip():
                        yield self._record(line, start), {"offset": offset}
                elif line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).strip("\n"), {"offset": offset}
                    lines = []
            if lines:
                yield "".join(lines).strip("\n"), {"offset": offset}

    def _record(self, line: str, start: int) -> str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            message = f"{self.path}: the line at byte {start} is not JSON ({err})"
            raise DatasetLoadError(message) from None
        if not isinstance(record, dict) or self.column not in record:
            raise DatasetLoadError(f"{self.path}: the record at byte {start} has no "
                                   f"{self.column!r} field (pass it with --column)")  # fmt: skip
        return record[self.column]


class _Rows(TextSource):
    """A parquet file or a saved ``datasets`` directory: rows read in slices; the state is the
    number of rows read."""

    def __init__(self, name: str, num_rows: int, read_rows: Callable[[int, int], list[str]]):
        self.name, self.num_rows, self._read_rows = name, num_rows, read_rows

    def read(self, state=None):
        row = int(state["row"]) if state else 0
        while row < self.num_rows:
            for text in self._read_rows(row, min(row + 1024, self.num_rows)):
                row += 1
                yield text, {"row": row}


def _parquet_rows(path: Path, column: str) -> _Rows:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as err:  # pyarrow's errors name a buffer, not the file
        raise DatasetLoadError(f"{path} is not a parquet file ({err})") from None
    if column not in file.schema_arrow.names:
        raise DatasetLoadError(f"{path} has no column {column!r} (it has "
                               f"{file.schema_arrow.names}); pass it with --column")  # fmt: skip
    starts = np.cumsum([0] + [file.metadata.row_group(i).num_rows
                              for i in range(file.num_row_groups)])  # fmt: skip

    def read_rows(begin: int, end: int) -> list[str]:  # whole row groups, only those needed
        first = int(np.searchsorted(starts, begin, side="right")) - 1
        last = int(np.searchsorted(starts, end, side="left"))
        table = file.read_row_groups(list(range(first, last)), columns=[column])
        return table.column(0).to_pylist()[begin - starts[first] : end - starts[first]]

    return _Rows(str(path), int(starts[-1]), read_rows)


def _saved_rows(path: Path, split: str, column: str) -> _Rows:
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DatasetLoadError(f"{path} has no split {split!r} (it has {list(data)})")
        data = data[split]
    if column not in data.column_names:
        raise DatasetLoadError(f"{path} has no column {column!r} (it has {data.column_names}); "
                               "pass it with --column")  # fmt: skip
    return _Rows(str(path), len(data), lambda begin, end: data[begin:end][column])


class _HubStream(TextSource):
    """A streamed hub dataset; the state is the streaming dataset's own ``state_dict()``, so a
    resumed run starts at its shard and offset instead of streaming everything before it."""

    def __init__(self, name: str, stream, column: str):
        self.name, self.stream, self.column = name, stream, column
        self.start = stream.state_dict()

    def read(self, state=None):
        self.stream.load_state_dict(state["hub"] if state else self.start)
        for record in self.stream:
            if self.column not in record:
                raise DatasetLoadError(f"{self.name} has no column {self.column!r} (it has "
                                       f"{list(record)}); pass it with --column")  # fmt: skip
            yield record[self.column], {"hub": self.stream.state_dict()}


class IterableSource(TextSource):
    """Documents from ``texts_fn()`` (an iterator from the start each call); resuming skips the
    documents already read, so it reads them again: for small in-memory sources and tests."""

    def __init__(self, texts_fn: Callable[[], Iterator[str]], name: str = "texts"):
        self.texts_fn, self.name = texts_fn, name

    def read(self, state=None):
        skip = int(state["documents"]) if state else 0
        for number, text in enumerate(self.texts_fn(), 1):
            if number > skip:
                yield text, {"documents": number}


# the demo corpus's last tenth of documents is its "test" split: "train" (what gsae-train reads
# by default, cycling with --repeat) never includes it, so gsae-eval always has held-out text
DEMO_HELDOUT = 0.1
DEMO_SPLITS = ("train", "test")


@functools.cache
def _demo_boundary() -> int:
    """The byte offset (in the uncompressed corpus) where the demo's test split begins."""
    corpus = _LineFile(bundled_dir() / "corpus.txt.gz", "txt", "text")
    ends = [int(state["offset"]) for _, state in corpus.read()]
    return ends[len(ends) - math.ceil(len(ends) * DEMO_HELDOUT) - 1]


def demo_texts(split: str = "train") -> TextSource:
    """The bundled demo corpus: ``train`` (its first nine tenths of documents) or ``test``."""
    if split not in DEMO_SPLITS:
        raise DatasetLoadError(
            f"the demo dataset has the splits {' and '.join(DEMO_SPLITS)} (held out), not {split!r}"
        )
    path, boundary = bundled_dir() / "corpus.txt.gz", _demo_boundary()
    if split == "train":
        return _LineFile(path, "txt", "text", end=boundary)
    return _LineFile(path, "txt", "text", start=boundary)


def heldout_split(dataset: str, split: str) -> str | None:
    """The split of ``dataset`` that training on ``split`` never reads, when it has one by
    construction (the demo's test split), else None."""
    return "test" if dataset == "demo" and split == "train" else None


def open_texts(dataset: str, split: str = "train", column: str = "text") -> TextSource:
    """The documents of ``dataset``: a local file or directory, ``demo`` (see
    :func:`demo_texts`), or a hub dataset id (streamed). Opened once here; fails now, with one
    message, if it cannot be."""
    if dataset == "demo":
        return demo_texts(split)
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
    return _HubStream(dataset, stream, column)


def local_name(name: str) -> str:
    """A model or dataset name as a run records it: a local path made absolute (the run is then
    read the same from any directory), anything else (``demo``, a hub id) as given."""
    if name == "demo" or not Path(name).exists():
        return name
    return str(Path(name).resolve())


def next_document(texts: TextSource, position: StreamPosition) -> StreamPosition:
    """The position at the start of the document after the one ``position`` stopped inside
    (itself when no token of that document was emitted): text that shares no document with
    what came before it."""
    if position.offset == 0:
        return position
    with contextlib.closing(texts.read(position.source)) as documents:
        after = next(documents, None)
    if after is None:  # the text ends there
        return position
    return StreamPosition(position.epoch, position.documents + 1, after[1], 0)


def iter_texts(dataset: str, split: str = "train", column: str = "text") -> Iterator[str]:
    """The documents of ``dataset`` from the first (see :func:`open_texts`)."""
    return open_texts(dataset, split, column).texts()


def _local_texts(path: Path, split: str, column: str) -> TextSource:
    suffixes = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if path.is_dir():
        return _saved_rows(path, split, column)
    if suffixes in (".txt", ".txt.gz"):
        return _LineFile(path, "txt", column)
    if suffixes in (".jsonl", ".jsonl.gz", ".json", ".json.gz"):
        return _LineFile(path, "jsonl", column)
    if suffixes == ".parquet":
        return _parquet_rows(path, column)
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
    """Where a token stream stands after a chunk, in a few numbers whatever the documents' length:
    ``source``, the text source's state before the document being packed (None: the first one);
    ``offset``, how many of that document's tokens (its EOS included) are already emitted;
    ``documents``, how many documents of this pass over the data came before it; ``epoch``, the
    pass (``repeat`` cycles). Restoring it reproduces the rest of the stream exactly, reading
    and tokenizing only that one document again."""

    epoch: int = 0
    documents: int = 0
    source: dict | None = None
    offset: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "documents": self.documents, "source": self.source,
                "offset": self.offset}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> StreamPosition:
        return cls(int(d.get("epoch", 0)), int(d.get("documents", 0)), d.get("source"),
                   int(d.get("offset", 0)))  # fmt: skip


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
    a finite source (small local corpora). ``texts`` is a :class:`TextSource` or a function
    returning an iterator of documents. Iterate to get :class:`TokenBatch` objects.

    ``shard=(i, n)`` packs only the documents whose number in each pass is ``i`` modulo ``n``
    (the others are read but not tokenized): n such streams split the text between them, for
    several processes. Positions are those of the whole text, so each shard resumes alone.
    """

    def __init__(self, texts: TextSource | Callable[[], Iterator[str]], tokenizer,
                 ctx_len: int = 1024, batch_size: int = 8, position: StreamPosition | None = None,
                 repeat: bool = False, prefetch: int = 4, docs_per_call: int = 64,
                 shard: tuple[int, int] = (0, 1)):  # fmt: skip
        if ctx_len < 2 or batch_size < 1:
            raise ValueError(f"need ctx_len >= 2 and batch_size >= 1, got {ctx_len}, {batch_size}")
        if not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
        self.shard = (int(shard[0]), int(shard[1]))
        self.source = texts if isinstance(texts, TextSource) else IterableSource(texts)
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

    def _documents(self) -> Iterator[tuple[int, int, dict | None, str]]:
        """(epoch, documents before it in the epoch, source state before it, text) from the
        saved position on."""
        epoch, number, state = self.start.epoch, self.start.documents, self.start.source
        index, count = self.shard
        while True:
            read_any, whole_pass = False, state is None
            for text, after in self.source.read(state):
                if number % count == index:
                    read_any = True
                    yield epoch, number, state, text
                number, state = number + 1, after
            if not self.repeat or (whole_pass and not read_any):  # the end, or nothing to cycle
                return
            epoch, number, state = epoch + 1, 0, None

    def _chunks(self) -> Iterator[tuple[np.ndarray, int, StreamPosition]]:
        """(tokens [ctx_len], real length, position after the chunk), tokenizing documents
        ``docs_per_call`` at a time (fast tokenizers run a batch in parallel, outside the GIL).
        Linear in the text: each document's tokens are copied once, chunks are views."""
        ctx = self.ctx_len
        pending = np.empty(0, dtype=np.int64)  # tokens of earlier documents, fewer than ctx
        skip = self.start.offset  # the saved position is inside the first document
        last = None
        documents = self._documents()
        while True:
            block = [doc for _, doc in zip(range(self.docs_per_call), documents, strict=False)]
            if not block:
                break
            ids = self.tokenizer([doc[3] for doc in block], add_special_tokens=False)["input_ids"]
            for (epoch, number, state, _), tokens in zip(block, ids, strict=True):
                doc = np.empty(len(tokens) + 1, dtype=np.int64)
                doc[:-1] = tokens
                doc[-1] = self.eos
                carry = np.concatenate([pending, doc[skip:]])
                done = skip - len(pending)  # tokens of this document emitted, minus the offset
                full = len(carry) // ctx
                for i in range(full):
                    end = (i + 1) * ctx
                    yield carry[end - ctx : end], ctx, StreamPosition(epoch, number, state,
                                                                      done + end)  # fmt: skip
                pending, skip = carry[full * ctx :], 0
                last = StreamPosition(epoch, number, state, len(doc))
        if len(pending):  # a finite source's last, partial chunk: padded, and masked in the batch
            padded = np.full(ctx, self.pad, dtype=np.int64)
            padded[: len(pending)] = pending
            yield padded, len(pending), last

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
        ids = torch.from_numpy(np.stack(rows))
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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor goes to a GPU from pinned memory, so the copy is
    asynchronous (from pageable memory ``non_blocking=True`` is a synchronous staged copy)."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


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


@contextlib.contextmanager
def hidden_states(
    loaded: LoadedModel, layers: Sequence[int], texts: TextSource, ctx_len: int, batch_size: int,
    repeat: bool = False, position: StreamPosition | None = None,
) -> Iterator[Iterator[torch.Tensor]]:  # fmt: skip
    """Yields an iterator of the ``[L, N, d]`` activations of ``layers`` over ``texts``, one
    batch of ``batch_size`` sequences of ``ctx_len`` tokens at a time (the tokenizer runs ahead
    in a thread, stopped when the block ends)."""
    reader = ActivationReader(loaded, layers)
    with TokenStream(texts, loaded.tokenizer, ctx_len, batch_size, position, repeat) as stream:
        yield (reader(b.input_ids, b.attention_mask) for b in stream)
