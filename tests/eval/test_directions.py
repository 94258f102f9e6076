"""gsae-eval against a --baseline of another width: MMCS (Eq. 18) and MMCO (Eq. 17) are taken
from each baseline latent to the group SAE's latents (the paper's direction). With SAEs of one
width a swapped direction can go unnoticed; with different widths it cannot."""

import pytest
from tiny import RUN_BUDGET, flags

from gsae.cli.train import main as train_main
from gsae.eval import CoOccurrence, evaluate_runs, mmcs, prepare
from gsae.eval.evaluate import trim_mask
from gsae.hf.hooks import ActivationReader
from gsae.run import load_run

TOKENS = 384


@pytest.fixture(scope="module")
def wide(trained_runs, tmp_path_factory, one_thread):
    """A G=2 run of SAEs twice as wide as the per-layer baseline's (m = 256 against 128)."""
    out = tmp_path_factory.mktemp("wide") / "wide"
    argv = flags(
        model=trained_runs["model"],
        dataset=trained_runs["corpus"],
        out=out,
        groups="2",
        tokens="2k",
        **RUN_BUDGET | dict(expansion_factor="8"),
    )
    assert train_main(argv) == 0
    return out


def saes(run_dir):
    return {entry.name: entry.load() for entry in load_run(run_dir).saes}


def test_mmcs_goes_from_the_baseline_to_the_group_sae(trained_runs, wide, one_thread):
    base, run = saes(trained_runs["per-layer"]), saes(wide)
    assert {s.m for s in base.values()} == {128} and {s.m for s in run.values()} == {256}
    result, _ = evaluate_runs(
        [wide], baseline=trained_runs["per-layer"], tokens=TOKENS, downstream=False, device="cpu"
    )
    rows = result.for_run("wide")
    assert len(rows) == 4
    for row in rows:
        b = next(s for s in base.values() if row.layer in s.layers).W_dec
        g = run[row.group].W_dec
        forward, backward = mmcs(b, g).mean, mmcs(g, b).mean
        assert abs(forward - backward) > 1e-3  # the two directions differ here
        assert row.mmcs == pytest.approx(forward, abs=1e-6)


def test_mmco_goes_from_the_baseline_to_the_group_sae(trained_runs, wide, one_thread):
    base, run = saes(trained_runs["per-layer"]), saes(wide)
    kwargs = {
        "baseline": trained_runs["per-layer"],
        "tokens": TOKENS,
        "downstream": False,
        "device": "cpu",
        "pairs": "diagonal",
    }
    result, _ = evaluate_runs([wide], **kwargs)
    # the same held-out tokens, counted here in both directions
    plan = prepare([wide], **kwargs)
    layers = list(range(4))
    forward = {x: CoOccurrence(128, 256) for x in layers}
    backward = {x: CoOccurrence(256, 128) for x in layers}
    reader, seen = ActivationReader(plan.loaded, layers), 0
    for batch in plan.batches():
        if seen >= TOKENS:
            break
        mask = trim_mask(batch.attention_mask, TOKENS - seen)
        seen += int(mask.sum())
        hidden = reader(batch.input_ids, mask)  # [L, N, d]
        for x in layers:
            b = next(s for s in base.values() if x in s.layers).encode(hidden[x], layer=x)
            g = next(s for s in run.values() if x in s.layers).encode(hidden[x], layer=x)
            forward[x].update(b.indices, b.values > 0, g.indices, g.values > 0)
            backward[x].update(g.indices, g.values > 0, b.indices, b.values > 0)
    assert seen == result.tokens == TOKENS
    for x in layers:
        measured = result.mmco["wide"][(x, x)].mmco
        assert abs(forward[x].mmco().mmco - backward[x].mmco().mmco) > 1e-3
        assert measured == pytest.approx(forward[x].mmco().mmco, abs=1e-9)
