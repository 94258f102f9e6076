"""The latent browser: the streamed heaps against brute force, fixed memory, the collection of a
real run against a direct count, and the pages in a real headless Chromium."""

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from gsae.browse.collect import HIST_BINS, CollectConfig, Collection, collect
from gsae.browse.heap import WindowHeap, window_candidates
from gsae.cli.browse import main
from gsae.hf.hooks import ActivationReader
from gsae.hf.models import load_model, load_tokenizer
from gsae.hf.texts import iter_texts
from gsae.hf.tokens import TokenStream, TokenText
from gsae.run import load_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


# --------------------------------------------------------------------------------------------
# Heaps against brute force
# --------------------------------------------------------------------------------------------


def synthetic_batches(batches=6, b=3, t=10, m=16, k=3, layers=2, seed=0):
    """Per batch: token ids [b, t], a mask (the last row cut short) and, per layer, each real
    token's top-k (distinct latents; about a third of the values 0, i.e. not firing)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, 50, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[-1, t - 3 :] = 0
        n = int(mask.sum())
        per_layer = []
        for _ in range(layers):
            idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
            val = torch.rand(n, k, generator=g) * 2 - 0.6
            per_layer.append((idx, val.clamp_min(0)))
        out.append((ids, mask, per_layer))
    return out


def brute_force(batches, m, window, t):
    """{row: {window id: (max value, tokens, acts)}} by plain loops."""
    n_windows = -(-t // window)
    table = defaultdict(dict)
    sequences = 0
    for ids, mask, per_layer in batches:
        pos = mask.flatten().nonzero().squeeze(1).tolist()
        for layer, (idx, val) in enumerate(per_layer):
            for r, p in enumerate(pos):
                b, tt = divmod(p, t)
                where = (sequences + b) * n_windows + tt // window
                start = (tt // window) * window
                for latent, v in zip(idx[r].tolist(), val[r].tolist(), strict=True):
                    if v <= 0:
                        continue
                    row = layer * m + latent
                    entry = table[row].setdefault(where, [0.0, None, [0.0] * window])
                    entry[0] = max(entry[0], v)
                    entry[2][tt - start] = v
                    tokens = [
                        int(ids[b, j]) if j < t and mask[b, j] else -1
                        for j in range(start, start + window)
                    ]
                    entry[1] = tokens
        sequences += ids.shape[0]
    return table


def stream_into(heap, batches, m, window, t, layers=2):
    from gsae.browse.collect import _Batch

    sequences = 0
    for ids, mask, per_layer in batches:
        view = _Batch.make(ids, mask, sequences, window)
        for layer in range(layers):
            idx, val = per_layer[layer]
            cand = window_candidates(val, idx, view.token_pos, layer * m, layers * m, window, t)
            heap.update(cand, view.windows, view.where)
        sequences += ids.shape[0]


@pytest.mark.parametrize("window", [4, 5, 10])
def test_top_heap_holds_the_top_windows_with_their_tokens_and_activations(window):
    m, t, n = 16, 10, 3
    batches = synthetic_batches(m=m, t=t)
    truth = brute_force(batches, m, window, t)
    heap = WindowHeap(2 * m, n, window)
    stream_into(heap, batches, m, window, t)
    for row in range(2 * m):
        entries = sorted(truth[row].items(), key=lambda kv: -kv[1][0])[:n]
        filled = int(torch.isfinite(heap.keys[row]).sum())
        assert filled == len(entries)
        assert heap.keys[row].tolist()[:filled] == sorted(
            heap.keys[row].tolist()[:filled], reverse=True
        )
        for slot, (where, (value, tokens, acts)) in enumerate(entries):
            assert int(heap.where[row, slot]) == where
            assert float(heap.value[row, slot]) == pytest.approx(value)
            assert heap.tokens[row, slot].tolist() == tokens
            torch.testing.assert_close(
                heap.acts[row, slot].float(), torch.tensor(acts).half().float()
            )


def test_random_heap_is_a_uniform_sample_of_the_activating_windows():
    m, t, window, n = 16, 10, 5, 3
    batches = synthetic_batches(m=m, t=t, batches=4)
    truth = brute_force(batches, m, window, t)
    row = max(truth, key=lambda r: len(truth[r]))
    windows = sorted(truth[row])
    counts = dict.fromkeys(windows, 0)
    trials = 60
    for seed in range(trials):
        heap = WindowHeap(
            2 * m, n, window, random=True, generator=torch.Generator().manual_seed(seed)
        )
        stream_into(heap, batches, m, window, t)
        picked = heap.where[row].tolist()
        assert len(set(picked)) == n and set(picked) <= set(windows)  # distinct, activating
        for r in range(2 * m):  # every row: valid payloads, as many as it has windows
            filled = int(torch.isfinite(heap.keys[r]).sum())
            assert filled == min(n, len(truth[r]))
            for slot in range(filled):
                value, tokens, _ = truth[r][int(heap.where[r, slot])]
                assert heap.tokens[r, slot].tolist() == tokens
                assert float(heap.value[r, slot]) == pytest.approx(value)
        for where in picked:
            counts[where] += 1
    expected = trials * n / len(windows)
    # every window of the row is drawn, none far from its share (a loose check of uniformity)
    assert all(0.3 * expected < c < 2.0 * expected for c in counts.values()), counts


def test_heap_memory_is_fixed_whatever_the_tokens():
    m, t, window = 16, 10, 5
    heap = WindowHeap(2 * m, 4, window)
    before = {k: (v.shape, v.dtype) for k, v in heap.state("x").items()}
    size = heap.nbytes
    stream_into(heap, synthetic_batches(m=m, t=t, batches=20), m, window, t)
    assert heap.nbytes == size
    assert {k: (v.shape, v.dtype) for k, v in heap.state("x").items()} == before


def test_token_text_keeps_characters_that_span_tokens():
    """The demo's byte-level BPE splits box-drawing characters over tokens: decoded one by one
    they break; TokenText gives each token the characters it completes, losing none."""
    tokenizer = load_tokenizer("demo")
    text = "│1993  │ ├───────┼──────┤ naïve café — done"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    one_by_one = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in one_by_one)  # the case is real
    pieces = TokenText(tokenizer)(ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    plain = tokenizer("the hacker wrote", add_special_tokens=False).input_ids
    assert TokenText(tokenizer)(plain) == [tokenizer.decode([i]) for i in plain]


# --------------------------------------------------------------------------------------------
# The collection of a real run
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collection(trained_runs, one_thread):
    return collect(
        trained_runs["grouped"],
        tokens=1536,
        batch_tokens=512,
        device="cpu",
        config=CollectConfig(window=16, top=5, random=3, pool=16),
    )


def direct_counts(trained_runs, tokens=1536):
    """Per layer, every latent's firing count, activation sum and largest value over the same
    tokens, with the run's SAEs applied to one plain pass of activations."""
    run = load_run(trained_runs["grouped"])
    loaded = load_model(str(trained_runs["model"]), "fp32", "cpu")
    reader = ActivationReader(loaded, [0, 1, 2, 3])
    fired, sums, best = {}, {}, {}
    seen = 0
    with TokenStream(
        lambda: iter_texts(str(trained_runs["corpus"])), loaded.tokenizer, ctx_len=64, batch_size=8
    ) as stream:
        for batch in stream:
            hidden = reader(batch.input_ids, batch.attention_mask)
            for layer in range(4):
                sae = run.sae_for(layer).load()
                enc = sae.encode(hidden[layer], layer=layer)
                on = enc.values > 0
                counts = torch.bincount(enc.indices[on], minlength=sae.m)
                fired[layer] = fired.get(layer, 0) + counts
                act = torch.zeros(sae.m, dtype=torch.float64).index_add_(
                    0, enc.indices.flatten(), enc.values.flatten().double()
                )
                sums[layer] = sums.get(layer, 0) + act
                top = torch.zeros(sae.m).scatter_reduce(
                    0, enc.indices.flatten(), enc.values.flatten(), "amax"
                )
                best[layer] = torch.maximum(best.get(layer, top), top)
            seen += batch.num_tokens
            if seen >= tokens:
                break
    assert seen == tokens
    return fired, sums, best


def test_collection_counts_match_a_direct_count(collection, trained_runs):
    fired, sums, best = direct_counts(trained_runs)
    assert collection.meta["tokens"] == 1536
    for name, t in collection.saes.items():
        layers = collection.layers(name)
        m = collection.meta["saes"][name]["m"]
        assert t["tokens"].tolist() == [1536] * len(layers)
        for pos, layer in enumerate(layers):
            assert torch.equal(t["fired"][pos], fired[layer])
            torch.testing.assert_close(t["act_sum"][pos], sums[layer])
            torch.testing.assert_close(t["top.value"][pos * m : (pos + 1) * m, 0], best[layer])
        assert torch.equal(t["hist"].sum(1), t["fired"].sum(0))  # every firing in one bin
        assert t["hist"].shape == (m, HIST_BINS)
        share = collection.distribution(name).share
        fired_any = t["fired"].sum(0) > 0
        torch.testing.assert_close(
            share[:, fired_any].sum(0), torch.ones(int(fired_any.sum()), dtype=share.dtype)
        )
        spread = collection.spread(name)[fired_any]
        assert bool(((spread >= 1 - 1e-9) & (spread <= len(layers) + 1e-9)).all())


def test_collection_memory_does_not_grow_with_tokens(collection, trained_runs):
    more = collect(
        trained_runs["grouped"],
        tokens=4096,
        batch_tokens=512,
        device="cpu",
        config=CollectConfig(window=16, top=5, random=3, pool=16),
    )
    assert more.meta["tokens"] == 4096
    for name in collection.saes:
        small = {k: (tuple(v.shape), v.dtype) for k, v in collection.saes[name].items()}
        large = {k: (tuple(v.shape), v.dtype) for k, v in more.saes[name].items()}
        assert small == large


def test_collection_saves_and_loads(collection, tmp_path):
    collection.save(tmp_path / "col")
    back = Collection.load(tmp_path / "col")
    assert back.meta == json.loads(json.dumps(collection.meta))
    for name, tensors in collection.saes.items():
        assert set(back.saes[name]) == set(tensors)
        for key, value in tensors.items():
            assert torch.equal(back.saes[name][key], value), key


def test_a_run_against_itself_as_baseline_matches_every_latent(trained_runs, one_thread):
    """Each latent's best baseline match, by decoder cosine and by Jaccard of firing, is itself
    when the baseline is the run itself (cosine 1, Jaccard 1 for latents that fired)."""
    run = trained_runs["per-layer"]
    col = collect(
        run,
        tokens=1024,
        batch_tokens=512,
        device="cpu",
        baseline=run,
        config=CollectConfig(window=16, top=2, random=2, pool=4),
    )
    for name, t in col.saes.items():
        (layer,) = col.layers(name)
        m = col.meta["saes"][name]["m"]
        assert torch.equal(t[f"baseline.{layer}.cosine_index"], torch.arange(m))
        torch.testing.assert_close(t[f"baseline.{layer}.cosine"], torch.ones(m))
        fired = t["fired"][0] > 0
        assert torch.equal(t[f"baseline.{layer}.jaccard_index"][fired], torch.arange(m)[fired])
        torch.testing.assert_close(
            t[f"baseline.{layer}.jaccard"][fired], torch.ones(int(fired.sum()))
        )
        assert not bool((t["neighbours.index"] == torch.arange(m)[:, None]).any())  # not itself


# --------------------------------------------------------------------------------------------
# The site, in a real browser
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(trained_runs, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("browse") / "site"
    argv = [
        str(trained_runs["grouped"]),
        "--out",
        str(out),
        "--baseline",
        str(trained_runs["per-layer"]),
        "--tokens",
        "1536",
        "--batch-tokens",
        "512",
        "--device",
        "cpu",
        "--window",
        "16",
        "--top",
        "6",
        "--random",
        "3",
    ]
    assert main(argv) == 0
    return out


def shard(site: Path, group: str, latent: int) -> dict:
    index = json.loads((site / "collection" / "collection.json").read_text())
    g = list(index["saes"]).index(group)
    text = (site / "data" / str(g) / f"{latent // 256}.js").read_text()
    body = text[text.index(",") + 1 : text.rindex(")")]
    return json.loads(body)[str(latent)]


def test_site_files_are_self_contained(site):
    assert (site / "index.html").exists() and (site / "latent.html").exists()
    for page in ("index.html", "latent.html"):
        text = (site / page).read_text()
        assert "http://" not in text and "https://" not in text  # nothing fetched from outside
    rec = shard(site, "layers_1-2", 5)
    assert rec["layers"] == [1, 2] and len(rec["per_layer"]) == 2
    assert rec["peak"] in (1, 2) and len(rec["baseline"]) == 2
    assert len(rec["top"]) <= 6 and all(ex[0] in (1, 2) for ex in rec["top"])


def _playwright():
    """Playwright's sync API and the system's Chromium, or a skip with the reason; CI sets
    GSAE_REQUIRE_BROWSER=1 (its .ci/run installs both), where a missing one fails instead."""
    required = os.environ.get("GSAE_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = (
        "no chromium installed (apt-get install chromium)"
        if CHROMIUM is None
        else "playwright is not installed (pip install playwright)"
        if sync_playwright is None
        else None
    )
    if missing:
        (pytest.fail if required else pytest.skip)(missing)
    return sync_playwright


def test_pages_in_headless_chromium(site):
    sync_playwright = _playwright()
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto((site / "index.html").as_uri())
        rows = page.locator("tr.row")
        assert rows.count() == 100  # 3 SAEs x 128 latents, 100 a page
        assert "of 4 (384 latents)" in page.text_content("#page")

        def column(i):
            cells = page.locator(f"tr.row td:nth-child({i + 1})").all_text_contents()
            return [float(x) if x != "–" else None for x in cells]

        freq = column(2)  # sorted by frequency, descending, by default
        assert freq == sorted(freq, reverse=True) and freq[0] > 0
        page.click("th[data-col='2']")  # ascending
        freq = column(2)
        assert freq == sorted(freq)
        page.click("th[data-col='4']")  # layer spread, descending
        spread = [x for x in column(4) if x is not None]
        assert spread == sorted(spread, reverse=True) and spread[0] > 1  # a group SAE's latent
        page.select_option("#group", "layers_1-2")
        assert set(page.locator("tr.row td:nth-child(1)").all_text_contents()) == {"layers_1-2"}
        page.click("#next")
        assert "page 2 of 2 (128 latents)" in page.text_content("#page")
        page.click("#prev")
        link = page.locator("a.latent").first
        group, latent = "layers_1-2", int(link.text_content())
        link.click()
        page.wait_for_selector("#top .ctx")
        rec = shard(site, group, latent)
        assert page.text_content("#title") == f"{group} · latent {latent}"
        contexts = page.locator("#top .ctx")
        assert contexts.count() == len(rec["top"]) > 0
        for i, (layer, _, _, tokens, acts) in enumerate(rec["top"]):
            ctx = contexts.nth(i)
            assert ctx.get_attribute("data-layer") == str(layer)
            assert ctx.locator(".tok").count() == len(tokens)
            lit = ctx.locator(".tok.on")
            assert lit.count() == sum(a > 0 for a in acts)
            assert [float(x) for x in lit.evaluate_all("els => els.map(e => e.title)")] == [
                a for a in acts if a > 0
            ]
        assert page.locator("#random .ctx").count() == len(rec["random"])
        bars = page.locator("#layers rect")
        assert bars.count() == 2 and page.locator("#layers rect.peak").count() == 1
        assert page.locator("#hist rect").count() > 0
        assert page.locator("#baseline tr").count() == 1 + 2  # a head, then layers 1 and 2
        neighbour = page.locator("a.neighbour").first
        other = int(neighbour.text_content().split()[-1])
        neighbour.click()
        page.wait_for_function(f"document.title === '{group} latent {other}'")
        assert page.text_content("#title") == f"{group} · latent {other}"
        browser.close()
    assert errors == []


def test_browse_refuses_bad_input_before_any_work(trained_runs, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    run = str(trained_runs["grouped"])
    cases = [
        ([run, "--out", str(trained_runs["per-layer"])], "gsae-train run"),
        ([run, "--out", str(foreign)], "did not write"),
        ([run, "--out", str(tmp_path / "a"), "--tokens", "0"], "--tokens must be > 0"),
        ([run, "--out", str(tmp_path / "b"), "--baseline", run], "not a per-layer run"),
        ([run, "--out", str(tmp_path / "c"), "--window", "0"], "--window must be >= 1"),
        ([str(tmp_path), "--out", str(tmp_path / "d")], "not a gsae-train output"),
    ]
    for argv, message in cases:
        assert main([*argv, "--device", "cpu"]) == 2
        assert message in capsys.readouterr().err
    assert (foreign / "keep.txt").read_text() == "mine"
