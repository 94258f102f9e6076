"""The latent browser: a static, self-contained HTML site written from a :class:`Collection`.

No server: open ``index.html`` from the file system. Files:

- ``index.html``: every latent of every SAE of the run in one table (group, latent, firing
  frequency, peak layer, layer spread, mean layer, largest activation), sortable by clicking a
  column head, filtered by group, 100 rows a page; its data is embedded in the page;
- ``latent.html#<group>/<latent>``: one latent, drawn by a small script from the data files:
  its top-activating and random activating windows (tokens shaded by the latent's activation,
  value on hover, the layer each window came from), firing frequency and activation histogram,
  how its firing spreads over the layers of its group with the peak marked, its nearest latents
  by decoder cosine, and, with a baseline, its best-matching per-layer latent at each layer
  (decoder cosine and Jaccard of their firing);
- ``data/<g>/<shard>.js``: the latents of SAE g, 256 per file, loaded by ``<script>`` tags
  (which browsers allow on ``file://``), each window as its tokens' text
  (:class:`gsae.activations.TokenText`).

Activations are gsae's (the SAE's normalised input, comparable across the layers of a group).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import torch

from ..hf.tokens import TokenText
from ..io import atomic_dir
from ..outdir import write_marker
from .collect import HIST_BINS, Collection, log_bin_edges

SHARD = 256


def _r(x: float, digits: int = 4) -> float | None:
    """A float for JSON: rounded to ``digits`` significant digits, None for NaN/inf."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _examples(
    t: dict, prefix: str, layers: list[int], latent: int, m: int, n: int, text: TokenText
) -> list[list]:
    """The ``n`` windows of ``latent`` with the largest keys over every layer of its group:
    ``[layer, value, where, token texts, activations]``, best first (for random keys, a uniform
    sample of the group's windows: each layer's heap holds its top keys of i.i.d. keys). A
    window that several layers hold is shown once, from the layer with the largest key."""
    rows = [pos * m + latent for pos in range(len(layers))]
    keys = t[f"{prefix}.keys"][rows]  # [L, n]
    width = keys.shape[1]
    flat = keys.flatten()
    order = [i for i in torch.argsort(flat, descending=True).tolist() if flat[i] > -math.inf]
    if not order:
        return []
    wheres = t[f"{prefix}.where"][rows].flatten().tolist()
    values = t[f"{prefix}.value"][rows].flatten().tolist()
    tokens = t[f"{prefix}.tokens"][rows].flatten(0, 1)  # [L * n, W]
    acts = t[f"{prefix}.acts"][rows].flatten(0, 1).float()
    out, seen = [], set()
    for idx in order:
        if wheres[idx] in seen:
            continue
        seen.add(wheres[idx])
        ids, a = tokens[idx].tolist(), acts[idx].tolist()
        real = [j for j, i in enumerate(ids) if i >= 0]
        words = [w.replace("\n", "↵") for w in text([ids[j] for j in real])]  # one line each
        out.append(
            [
                layers[idx // width],
                _r(values[idx]),
                wheres[idx],
                words,
                [_r(a[j], 3) if a[j] else 0 for j in real],
            ]
        )
        if len(out) == n:
            break
    return out


def latent_records(col: Collection, name: str, text: TokenText) -> tuple[list[dict], list[list]]:
    """Per latent of SAE ``name``: the record its page draws, and its index row."""
    t = col.saes[name]
    layers = col.layers(name)
    m = col.meta["saes"][name]["m"]
    dist = col.distribution(name)
    freq = col.frequency(name)
    spread = col.spread(name)
    fired = t["fired"]  # [L, m]
    tokens = t["tokens"].tolist()
    total = fired.sum(0)
    mean_act = t["act_sum"].sum(0) / total.clamp_min(1).double()
    peak_pos = fired.argmax(0)  # ties: the first layer
    cfg = col.meta["config"]
    base_layers = sorted({int(k.split(".")[1]) for k in t if k.startswith("baseline.")})
    records, rows = [], []
    for i in range(m):
        fired_i = int(total[i])
        peak = layers[int(peak_pos[i])] if fired_i else None
        top = _examples(t, "top", layers, i, m, cfg["top"], text) if fired_i else []
        rec = {
            "i": i,
            "g": name,
            "layers": layers,
            "fired": fired_i,
            "freq": _r(freq[i]),
            "per_layer": fired[:, i].tolist(),
            "tokens": tokens,
            "peak": peak,
            "mean_layer": _r(dist.mean_layer[i]),
            "spread": _r(spread[i]),
            "mean_act": _r(mean_act[i]) if fired_i else None,
            "max_act": top[0][1] if top else None,
            "hist": t["hist"][i].tolist(),
            "top": top,
            "random": _examples(t, "random", layers, i, m, cfg["random"], text) if fired_i else [],
            "neighbours": [
                [int(j), _r(c, 3)]
                for j, c in zip(
                    t["neighbours.index"][i].tolist(),
                    t["neighbours.cosine"][i].tolist(),
                    strict=True,
                )
            ],
            "baseline": [
                [
                    x,
                    int(t[f"baseline.{x}.cosine_index"][i]),
                    _r(t[f"baseline.{x}.cosine"][i], 3),
                    int(t[f"baseline.{x}.jaccard_index"][i])
                    if f"baseline.{x}.jaccard" in t
                    else None,
                    _r(t[f"baseline.{x}.jaccard"][i], 3) if f"baseline.{x}.jaccard" in t else None,
                ]
                for x in base_layers
            ],
        }
        records.append(rec)
        rows.append([name, i, rec["freq"], peak, rec["spread"], rec["mean_layer"], rec["max_act"]])
    return records, rows


def write_site(col: Collection, tokenizer, out: str | Path) -> list[Path]:
    """Write the browser for ``col`` and ``col`` itself (``out/collection``, for
    gsae-autointerp) into ``out``, replaced as a whole. Returns the pages."""
    out = Path(out)
    groups = list(col.saes)
    index_rows = []
    text = TokenText(tokenizer)
    with atomic_dir(out) as tmp:
        data = tmp / "data"
        data.mkdir()
        for g, name in enumerate(groups):
            records, rows = latent_records(col, name, text)
            index_rows += rows
            (data / str(g)).mkdir()
            for start in range(0, len(records), SHARD):
                shard = {r["i"]: r for r in records[start : start + SHARD]}
                (data / str(g) / f"{start // SHARD}.js").write_text(
                    f"gsaeShard({json.dumps(name)}, {json.dumps(shard, separators=(',', ':'))});\n"
                )
        site = {
            "run": col.meta["run_name"],
            "model": col.meta["model"],
            "dataset": col.meta["dataset"],
            "tokens": col.meta["tokens"],
            "groups": groups,
            "shard": SHARD,
            "window": col.meta["config"]["window"],
            "baseline": col.meta.get("baseline_name"),
            "notes": col.meta.get("notes", []),
            "hist_edges": [_r(e, 3) for e in log_bin_edges()],
            "hist_bins": HIST_BINS,
        }
        (tmp / "index.html").write_text(_page("index", site, index_rows))
        (tmp / "latent.html").write_text(_page("latent", site, None))
        (tmp / "collection").mkdir()
        col.save_files(tmp / "collection")
        write_marker(tmp, "gsae-browse")
    return [out / "index.html", out / "latent.html"]


# --------------------------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------------------------


ASSETS = Path(__file__).resolve().parent / "assets"


def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def _page(kind: str, site: dict, rows) -> str:
    title = f"gsae-browse: {site['run']}"
    head = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_asset('style.css')}</style></head><body>"
    )
    data = json.dumps({"site": site, "rows": rows}, separators=(",", ":")).replace("</", "<\\/")
    script = f"<script>const DATA = {data};</script>"
    about = (
        f"<p class='note'>{html.escape(site['model'])}, {site['tokens']:,} tokens of "
        f"{html.escape(str(site['dataset']))}; windows of {site['window']} tokens"
        f"{'; baseline ' + html.escape(site['baseline']) if site['baseline'] else ''}.</p>"
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in site["notes"])
    if kind == "index":
        body = (
            f"<h1>{html.escape(site['run'])}</h1>{about}<ul class='note'>{notes}</ul>"
            "<p>SAE <select id='group'><option value=''>all</option></select> "
            "<span class='pager'><button id='prev'>◀</button><span id='page'></span>"
            "<button id='next'>▶</button></span></p><table id='table'></table>"
            f"{script}<script>{_asset('index.js')}</script>"
        )
    else:
        body = (
            "<p><a href='index.html'>all latents</a></p><h1 id='title'></h1><div id='main'>"
            f"{about}<table class='stats' id='stats'></table><div id='layers'></div>"
            "<div id='hist'></div><h2>Top activations</h2><div id='top'></div>"
            "<h2>Random activations</h2><div id='random'></div>"
            "<h2>Nearest latents (decoder cosine)</h2><ul id='neighbours'></ul>"
            "<h2>Best match in the per-layer baseline</h2><table id='baseline'></table>"
            f"</div>{script}<script>{_asset('latent.js')}</script>"
        )
    return head + body + "</body></html>\n"
