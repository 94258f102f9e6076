"""One streamed pass over text that gathers what the latent browser and auto-interp show.

For every SAE of a run and every layer of its group, per latent (:class:`SaeCollector`):

- the top-activating token windows (:class:`~gsae.browse.heap.WindowHeap`, keyed by the
  activation) and a uniform sample of the windows where it fired (the same heap, random keys),
  each with its tokens, the latent's value at every token, and the layer it came from;
- how many tokens it fired on at each layer of the group (the Appendix F distribution of one
  latent) and the sum of its activations there; a histogram of its activations (log bins);
- given a per-layer ``baseline`` run: co-occurrence counts with the baseline's latents at each
  layer (:class:`gsae.eval.similarity.CoOccurrence`, for the best Jaccard partner).

and per layer a uniform sample of ``pool`` windows with every token's top-k latents (where
auto-interp draws windows on which a latent does not fire). Everything lives on the device in
tensors whose size is fixed by the SAE and these settings: memory does not grow with the
number of tokens. :func:`collect` runs the pass from a gsae-train folder and returns a
:class:`Collection`, which :meth:`Collection.save`/:meth:`Collection.load` keep on disk so that
the browser and auto-interp share one collection.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..device import resolve_device
from ..eval.evaluate import trim_mask
from ..eval.runs import check_model, check_runs
from ..eval.similarity import CoOccurrence, feature_distribution, mmcs, nearest
from ..hf.hooks import ActivationReader
from ..hf.models import LoadedModel, context_length, load_model
from ..hf.texts import TextSource, open_texts
from ..hf.tokens import StreamPosition, TokenStream
from ..io import atomic_dir, save_safetensors
from ..run import FinishedRun, RunData, load_run
from ..sae import Sae
from .heap import WindowHeap, window_candidates

HIST_LOW, HIST_HIGH, HIST_BINS = -3.0, 2.0, 50  # log10 of the activation: 1e-3 .. 1e2
META_FILE = "collection.json"


@dataclass
class CollectConfig:
    """What to keep: ``window`` tokens per example (the paper's 32), the ``top`` highest and
    ``random`` random activating windows per (layer, latent), ``pool`` random windows per layer,
    ``neighbours`` nearest latents by decoder cosine."""

    window: int = 32
    top: int = 20
    random: int = 10
    pool: int = 128
    neighbours: int = 8
    seed: int = 0

    def validate(self) -> CollectConfig:
        for name in ("window", "top", "random", "pool", "neighbours"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        return self


class WindowPool:
    """Per layer, a uniform sample of ``size`` windows of the stream with each token's top-k
    latents: ``tokens [L, P, W]``, ``indices``/``values`` ``[L, P, W, k]`` (-1 / 0 where empty)."""

    def __init__(self, layers: int, size: int, window: int, k: int, device, generator):
        self.generator = generator
        self.keys = torch.full((layers, size), float("-inf"), device=device)
        self.tokens = torch.full((layers, size, window), -1, dtype=torch.int32, device=device)
        self.indices = torch.full((layers, size, window, k), -1, dtype=torch.int32, device=device)
        self.values = torch.zeros(layers, size, window, k, dtype=torch.float16, device=device)
        self.where = torch.full((layers, size), -1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(
        self,
        pos: int,
        windows: torch.Tensor,
        where: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor,
    ) -> None:
        """``windows [B', W]`` token ids (-1: padding), ``indices``/``values`` ``[B', W, k]``."""
        real = (windows >= 0).any(1)
        keys = torch.rand(windows.shape[0], device=windows.device, generator=self.generator)
        keys = torch.where(real, keys, float("-inf"))
        size = self.keys.shape[1]
        both = torch.cat([self.keys[pos], keys])
        best, pick = both.topk(size)
        new = pick >= size
        src = (pick - size).clamp_min(0)
        old = pick.clamp_max(size - 1)

        def choose(mine, theirs):
            shape = (-1,) + (1,) * (mine.dim() - 2)
            return torch.where(new.view(shape), theirs[src].to(mine.dtype), mine[pos, old])

        self.tokens[pos] = choose(self.tokens, windows)
        self.indices[pos] = choose(self.indices, indices)
        self.values[pos] = choose(self.values, values)
        self.where[pos] = torch.where(new, where[src], self.where[pos, old])
        self.keys[pos] = best


class SaeCollector:
    """The streamed statistics of one SAE over the layers of its group (rows: layer-major,
    ``row = position_of_layer * m + latent``)."""

    def __init__(
        self,
        name: str,
        sae: Sae,
        cfg: CollectConfig,
        device,
        generator,
        baseline: dict[int, Sae] | None = None,
    ):
        self.name, self.sae, self.cfg = name, sae, cfg
        self.layers = list(sae.layers)
        n_layers, m = len(self.layers), sae.m
        self.rows = n_layers * m
        self.top = WindowHeap(self.rows, cfg.top, cfg.window, device)
        self.random = WindowHeap(self.rows, cfg.random, cfg.window, device, True, generator)
        self.pool = WindowPool(n_layers, cfg.pool, cfg.window, sae.k, device, generator)
        self.fired = torch.zeros(n_layers, m, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(n_layers, m, dtype=torch.float64, device=device)
        self.hist = torch.zeros(m * HIST_BINS, dtype=torch.int64, device=device)
        self.tokens = torch.zeros(n_layers, dtype=torch.int64, device=device)
        self.baseline = baseline or {}
        self.cooc = {
            layer: CoOccurrence(m, base.m, device) for layer, base in self.baseline.items()
        }

    @torch.no_grad()
    def update(self, layer: int, x: torch.Tensor, batch: _Batch) -> None:
        """Encode ``x [N, d]`` (the batch's real tokens at model ``layer``) and count it."""
        enc = self.sae.encode(x, layer=layer)
        self.add(layer, enc.values, enc.indices, batch)
        if layer in self.cooc:
            other = self.baseline[layer].encode(x, layer=layer)
            self.cooc[layer].update(enc.indices, enc.values > 0, other.indices, other.values > 0)

    @torch.no_grad()
    def add(self, layer: int, values: torch.Tensor, indices: torch.Tensor, batch: _Batch) -> None:
        """Count the top-k latents ``values``/``indices`` ``[N, k]`` of the batch's real tokens
        at model ``layer``: firing counts, sums, histogram, heaps, pool."""
        pos = self.layers.index(layer)
        m = self.sae.m
        on = values > 0
        self.tokens[pos] += values.shape[0]
        self.fired[pos].index_add_(0, indices.reshape(-1), on.reshape(-1).long())
        self.act_sum[pos].index_add_(0, indices.reshape(-1), values.reshape(-1).double())
        v = values[on].float()
        bins = ((v.log10() - HIST_LOW) / (HIST_HIGH - HIST_LOW) * HIST_BINS).long()
        bins = bins.clamp(0, HIST_BINS - 1)
        self.hist.index_add_(0, indices[on].long() * HIST_BINS + bins, torch.ones_like(bins))
        cand = window_candidates(
            values, indices, batch.token_pos, pos * m, self.rows, self.cfg.window, batch.seq_len
        )
        self.top.update(cand, batch.windows, batch.where)
        self.random.update(cand, batch.windows, batch.where)
        grid_i, grid_v = batch.grid(indices, values)
        self.pool.update(pos, batch.windows, batch.where, grid_i, grid_v)

    @property
    def nbytes(self) -> int:
        """Memory held (fixed at construction): heaps, pool, counts, co-occurrences."""
        pool = self.pool
        tensors = [
            self.fired,
            self.act_sum,
            self.hist,
            self.tokens,
            pool.keys,
            pool.tokens,
            pool.indices,
            pool.values,
            pool.where,
        ]
        held = sum(t.numel() * t.element_size() for t in tensors)
        cooc = sum(CoOccurrence.nbytes(c.m_a, c.m_b) for c in self.cooc.values())
        return self.top.nbytes + self.random.nbytes + held + cooc

    @torch.no_grad()
    def result(self) -> dict[str, torch.Tensor]:
        """Every tensor the browser and auto-interp read, on the CPU."""
        out = {
            **self.top.state("top"),
            **self.random.state("random"),
            "pool.tokens": self.pool.tokens.cpu(),
            "pool.indices": self.pool.indices.cpu(),
            "pool.values": self.pool.values.cpu(),
            "pool.where": self.pool.where.cpu(),
            "fired": self.fired.cpu(),
            "act_sum": self.act_sum.cpu(),
            "hist": self.hist.view(self.sae.m, HIST_BINS).cpu(),
            "tokens": self.tokens.cpu(),
            "layers": torch.tensor(self.layers),
        }
        cos, idx = nearest(self.sae.W_dec, None, self.cfg.neighbours)
        out["neighbours.cosine"], out["neighbours.index"] = cos.cpu(), idx.cpu()
        for layer, base in self.baseline.items():
            best = mmcs(self.sae.W_dec, base.W_dec)
            out[f"baseline.{layer}.cosine"] = best.score.cpu()
            out[f"baseline.{layer}.cosine_index"] = best.index.cpu()
            if layer in self.cooc:
                jac = self.cooc[layer].best_match()
                out[f"baseline.{layer}.jaccard"] = jac.score.cpu()
                out[f"baseline.{layer}.jaccard_index"] = jac.index.cpu()
        return out


@dataclass
class _Batch:
    """A batch as the collectors see it: ``windows [B * n_windows, W]`` token ids (-1 for
    padding), a stream-wide ``where`` id per window, each real token's flat position
    ``b * seq_len + t``."""

    windows: torch.Tensor
    where: torch.Tensor
    token_pos: torch.Tensor  # [N]
    seq_len: int
    n_windows: int  # per sequence
    window: int

    @classmethod
    def make(cls, input_ids, mask, first_sequence: int, window: int) -> _Batch:
        b, t = input_ids.shape
        n_windows = -(-t // window)
        ids = torch.where(mask.bool(), input_ids, -1)
        ids = torch.nn.functional.pad(ids, (0, n_windows * window - t), value=-1)
        windows = ids.view(b * n_windows, window)
        where = first_sequence * n_windows + torch.arange(b * n_windows, device=ids.device)
        token_pos = mask.flatten().nonzero().squeeze(1)
        return cls(windows, where, token_pos, t, n_windows, window)

    def grid(self, indices: torch.Tensor, values: torch.Tensor):
        """Scatter per-token latents ``[N, k]`` into the windows: ``[B * n_windows, W, k]``
        (index -1 and value 0 at padding)."""
        k = indices.shape[1]
        b, t = self.token_pos // self.seq_len, self.token_pos % self.seq_len
        padded = b * (self.n_windows * self.window) + t  # position in the padded rows
        cells = self.windows.numel()
        grid_i = torch.full((cells, k), -1, dtype=torch.int32, device=indices.device)
        grid_v = torch.zeros(cells, k, dtype=torch.float16, device=indices.device)
        grid_i[padded] = indices.to(torch.int32)
        grid_v[padded] = values.half()
        shape = (self.windows.shape[0], self.window, k)
        return grid_i.view(shape), grid_v.view(shape)


# --------------------------------------------------------------------------------------------
# The collection of a run
# --------------------------------------------------------------------------------------------


@dataclass
class Collection:
    """What :func:`collect` gathered: ``meta`` (the run, the text, the settings, token
    counts) and, per SAE (group name), the tensors of :meth:`SaeCollector.result`."""

    meta: dict
    saes: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        """``directory/collection.json`` and one ``<group>.safetensors`` per SAE, as a whole."""
        with atomic_dir(directory) as tmp:
            self.save_files(tmp)

    def save_files(self, directory: Path) -> None:
        """The files of :meth:`save` into an existing folder (the caller makes it atomic)."""
        for name, tensors in self.saes.items():
            save_safetensors(
                {k: v.contiguous() for k, v in tensors.items()}, directory / f"{name}.safetensors"
            )
        (directory / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Collection:
        directory = Path(directory)
        if not (directory / META_FILE).exists():
            raise FileNotFoundError(
                f"{directory} holds no collection (no {META_FILE}): run "
                "gsae-browse first, or leave out --collection"
            )
        meta = json.loads((directory / META_FILE).read_text())
        saes = {name: load_file(str(directory / f"{name}.safetensors")) for name in meta["saes"]}
        return cls(meta, saes)

    # ---- derived views

    def layers(self, name: str) -> list[int]:
        return [int(x) for x in self.saes[name]["layers"].tolist()]

    def distribution(self, name: str):
        """The Appendix F distribution of each latent over the group's layers."""
        return feature_distribution(self.saes[name]["fired"], self.layers(name))

    def frequency(self, name: str) -> torch.Tensor:
        """Per latent, the fraction of (token, layer) pairs of its group where it fired."""
        t = self.saes[name]
        return t["fired"].sum(0).double() / max(1, int(t["tokens"].sum()))

    def spread(self, name: str) -> torch.Tensor:
        """Effective number of layers a latent fires on: exp(entropy of its layer shares),
        1 for a latent of one layer, L_g for one spread evenly (NaN if it never fired)."""
        share = self.distribution(name).share
        ent = -(share * share.clamp_min(1e-300).log()).sum(0)
        out = ent.exp()
        out[self.saes[name]["fired"].sum(0) == 0] = float("nan")
        return out


def collect(
    run_dir: str | Path,
    *,
    tokens: int = 1_000_000,
    baseline: str | Path | None = None,
    config: CollectConfig | None = None,
    jaccard_memory: int = 4 << 30,
    model: str | None = None,
    progress: Callable[[int], None] | None = None,
    **data,
) -> Collection:
    """Stream ``tokens`` tokens of the run's text (or ``dataset``) through its model and SAEs
    and gather every SAE's :class:`SaeCollector` statistics. ``data``: the fields of
    :class:`~gsae.run.RunData` (``dataset``, ``ctx_len``, ``batch_tokens``, ``device``, ...).

    ``baseline``: a per-layer gsae-train run of the same model; each latent's best-matching
    baseline latent by decoder cosine at every layer of its group, and by Jaccard of their
    firing (co-occurrence counts of ``m x m_base`` int32 per layer, up to ``jaccard_memory``
    bytes in all: the layers beyond it get the cosine match only, with a note)."""
    cfg = (config or CollectConfig()).validate()
    data = RunData(**data)
    if tokens <= 0:
        raise ValueError(f"--tokens must be > 0, got {tokens}")
    plan = _Plan.make(run_dir, baseline, data, model)
    if cfg.window > plan.ctx_len:  # windows lie inside one sequence: a longer one cannot
        raise ValueError(
            f"--window {cfg.window} is longer than the {plan.ctx_len}-token "
            f"sequences the text is read in; pass --window {plan.ctx_len} or less "
            "(or a longer --ctx-len)"
        )
    if data.batch_tokens < 1:
        raise ValueError(f"--batch-tokens {data.batch_tokens}: need at least 1 token per forward")
    device = resolve_device(data.device)
    loaded = load_model(plan.model, data.model_dtype, device)  # bf16 on a GPU, fp32 on a CPU
    check_model(
        [plan.run] + ([plan.base] if plan.base else []),
        loaded.num_layers,
        loaded.d_model,
        loaded.name,
    )
    context_length(loaded, plan.ctx_len)  # refuses one longer than the model's positions
    generator = torch.Generator(device).manual_seed(cfg.seed)
    collectors, notes = _collectors(plan, cfg, device, generator, jaccard_memory)
    seen = _stream(plan, loaded, collectors, cfg, tokens, data.batch_tokens, progress)
    if seen == 0:
        raise ValueError(f"the text holds no tokens: {plan.dataset!r} (split {plan.split!r})")
    if seen < tokens:
        notes.append(f"the text ran out after {seen:,} of {tokens:,} tokens")
    meta = {
        "run": str(plan.run.path.resolve()),
        "run_name": plan.run.name,
        "model": plan.model,
        "dataset": plan.dataset,
        "split": plan.split,
        "column": plan.column,
        "ctx_len": plan.ctx_len,
        "tokens": seen,
        "baseline": str(plan.base.path.resolve()) if plan.base else None,
        "baseline_name": plan.base.name if plan.base else None,
        "config": cfg.__dict__,
        "notes": notes,
        "saes": {c.name: {"layers": c.layers, "m": c.sae.m, "k": c.sae.k} for c in collectors},
        "hist": {"log10_low": HIST_LOW, "log10_high": HIST_HIGH, "bins": HIST_BINS},
    }
    return Collection(meta, {c.name: c.result() for c in collectors})


@dataclass
class _Plan:
    run: FinishedRun
    base: FinishedRun | None
    model: str
    dataset: str
    split: str
    column: str
    ctx_len: int
    texts: TextSource

    @classmethod
    def make(cls, run_dir, baseline, data: RunData, model) -> _Plan:
        run = load_run(run_dir)
        base = load_run(baseline) if baseline is not None else None
        if base is not None:
            check_runs([run], base, model)
        dataset, split, column, ctx_len = run.data_settings(
            data.dataset, data.split, data.column, data.ctx_len
        )
        if ctx_len < 2:
            raise ValueError(f"--ctx-len must be >= 2, got {ctx_len}")
        texts = open_texts(dataset, split, column)  # fails now if it cannot be opened
        return cls(run, base, model or run.model, dataset, split, column, ctx_len, texts)


def _collectors(plan: _Plan, cfg: CollectConfig, device, generator, jaccard_memory: int):
    notes: list[str] = []
    base_saes: dict[int, Sae] = {}
    if plan.base is not None:
        loaded = {}
        for entry in plan.base.saes:
            loaded[entry.name] = entry.load(device)
            for layer in entry.layers:
                base_saes[layer] = loaded[entry.name]
    collectors, budget = [], jaccard_memory
    for entry in plan.run.saes:
        sae = entry.load(device)
        mine = {layer: base_saes[layer] for layer in sae.layers if layer in base_saes}
        collector = SaeCollector(entry.name, sae, cfg, device, generator, mine)
        for layer in list(collector.cooc):
            size = CoOccurrence.nbytes(sae.m, mine[layer].m)
            if size > budget:
                del collector.cooc[layer]
                notes.append(
                    f"{entry.name}, layer {layer}: no Jaccard match (its co-occurrence "
                    f"counts, {size / 2**20:.0f} MiB, exceed what is left of "
                    "--jaccard-memory)"
                )
            else:
                budget -= size
        collectors.append(collector)
    return collectors, notes


@torch.no_grad()
def _stream(
    plan: _Plan,
    loaded: LoadedModel,
    collectors: list[SaeCollector],
    cfg: CollectConfig,
    budget: int,
    batch_tokens: int,
    progress,
) -> int:
    layers = sorted({layer for c in collectors for layer in c.layers})
    reader = ActivationReader(loaded, layers)
    device = next(loaded.model.parameters()).device
    stream = TokenStream(
        plan.texts,
        loaded.tokenizer,
        ctx_len=plan.ctx_len,
        batch_size=max(1, batch_tokens // plan.ctx_len),
        position=StreamPosition(),
    )
    seen = sequences = 0
    try:
        for batch in stream:
            if seen >= budget:
                break
            mask = trim_mask(batch.attention_mask, budget - seen)
            n = int(mask.sum())
            if n == 0:
                break
            ids, mask = batch.input_ids.to(device), mask.to(device)
            hidden = dict(zip(layers, reader(ids, mask), strict=True))  # {layer: [N, d]}
            view = _Batch.make(ids, mask, sequences, cfg.window)
            for collector in collectors:
                for layer in collector.layers:
                    collector.update(layer, hidden[layer], view)
            seen += n
            sequences += ids.shape[0]
            if progress is not None:
                progress(n)
    finally:
        stream.close()
    return seen


def log_bin_edges() -> list[float]:
    """The histogram's bin edges (activation values), ``HIST_BINS + 1`` of them."""
    return [10 ** (HIST_LOW + (HIST_HIGH - HIST_LOW) * i / HIST_BINS) for i in range(HIST_BINS + 1)]


__all__ = ["CollectConfig", "Collection", "SaeCollector", "collect", "log_bin_edges"]
