"""The browser's site (:mod:`gsae.browse.site`): self-contained files, and the pages in a real
headless Chromium."""

import json
import os
import shutil
from pathlib import Path

import pytest
from tiny import SMALL_COLLECTION, flags

from gsae.cli.browse import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def site(trained_runs, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("browse") / "site"
    argv = [
        str(trained_runs["grouped"]),
        *flags(out=out, baseline=trained_runs["per-layer"], random=3),
        *SMALL_COLLECTION,
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
