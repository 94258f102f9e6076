"""Export to sparsify and SAELens, loaded back by the real packages on real activations of every
layer of a group SAE; the files against the formats' documented keys; hookpoint names per
model family against sparsify's own; import of sparsify SAEs; bad input."""

import json
import os

import pytest
import torch
from gsae_kernels import reference
from safetensors.torch import load_file

from gsae.cli.export import main
from gsae.export import MANIFEST, export_run, fold_scale
from gsae.hf.hooks import ActivationReader
from gsae.hf.models import layer_prefix, load_model, load_structure
from gsae.run import load_run
from gsae.sae import Sae, SaeConfig

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU

SPARSIFY_CFG = {
    "activation",
    "expansion_factor",
    "normalize_decoder",
    "num_latents",
    "k",
    "multi_topk",
    "skip_connection",
    "transcode",
    "d_in",
}
SAELENS_CFG = {
    "architecture",
    "d_in",
    "d_sae",
    "k",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "rescale_acts_by_decoder_norm",
    "metadata",
}


@pytest.fixture(scope="module")
def activations(trained_runs, one_thread):
    """The residual stream of every layer of the tiny model on 6 x 64 tokens of the corpus:
    ``{layer: [N, d]}`` in model units."""
    loaded = load_model(str(trained_runs["model"]), "fp32", "cpu")
    text = trained_runs["corpus"].read_text()[:4000]
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, : 6 * 64].view(6, 64)
    hidden = ActivationReader(loaded, [0, 1, 2, 3])(ids)
    return dict(enumerate(hidden))


@torch.no_grad()
def gsae_latents(sae: Sae, x: torch.Tensor, layer: int):
    enc = sae.encode(x, layer=layer)
    return enc, sae.decode(enc.values, enc.indices, layer=layer)


def active(indices: torch.Tensor, values: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Per row, the (latent, value) pairs with value > 0, sorted by latent."""
    rows = zip(indices.tolist(), values.detach().tolist(), strict=True)
    return [sorted((i, v) for i, v in zip(ir, vr, strict=True) if v > 0) for ir, vr in rows]


def assert_same_latents(ours, theirs_idx, theirs_val, scale: float):
    """The same latents fire on every row, with values divided by the layer's scale."""
    a, b = active(ours.indices, ours.values), active(theirs_idx, theirs_val)
    assert [[i for i, _ in row] for row in a] == [[i for i, _ in row] for row in b]
    mine = torch.tensor([v / scale for row in a for _, v in row])
    other = torch.tensor([v for row in b for _, v in row])
    torch.testing.assert_close(other, mine, rtol=1e-5, atol=1e-6)


def test_fold_scale_is_exact_algebra():
    """On a random SAE with biases and a scale far from 1, the folded weights used in the plain
    TopK formula on x select gsae's latents, with values / s, and reconstruct gsae's x_hat."""
    sae = Sae(SaeConfig(d=24, num_latents=96, k=6, seed=3), layers=[4, 7])
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.5)
    sae.set_scale(4, 0.05)
    sae.set_scale(7, 3.0)
    for layer, s in ((4, 0.05), (7, 3.0)):
        x = torch.randn(300, 24) / s + 0.7 / s
        ours, x_hat = gsae_latents(sae, x, layer)
        w = fold_scale(sae, layer)
        torch.testing.assert_close(w.W_dec, sae.W_dec.detach())  # unit rows kept
        values, indices, _, _ = reference.topk_encode(x, w.W_enc, w.b_enc, w.b_dec, sae.k)
        assert_same_latents(ours, indices, values, s)
        out = reference.sparse_decode(values, indices, w.W_dec, w.b_dec)
        torch.testing.assert_close(out, x_hat, rtol=1e-5, atol=1e-5 * float(x_hat.abs().max()))


def test_sparsify_loads_every_layer_of_a_group(trained_runs, activations, tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed")
    out = tmp_path / "sparsify"
    exported = export_run(trained_runs["grouped"], "sparsify", out)
    assert [e.name for e in exported] == [f"layers.{x}" for x in range(4)]  # GPT-NeoX names
    coders = sparsify.SparseCoder.load_many(str(out), local=True)
    assert sorted(coders) == [f"layers.{x}" for x in range(4)]
    run = load_run(trained_runs["grouped"])
    checked = 0
    for entry in run.saes:
        sae = entry.load()
        for layer in sae.layers:  # every layer of the group SAE layers_1-2, and the others
            x = activations[layer]
            ours, x_hat = gsae_latents(sae, x, layer)
            coder = coders[f"layers.{layer}"]
            with torch.no_grad():
                enc = coder.encode(x)
                theirs = coder.decode(enc.top_acts, enc.top_indices)
            assert bool((ours.values > 0).all()), "every slot active: the comparison is full"
            assert_same_latents(ours, enc.top_indices, enc.top_acts, float(sae.scale_for(layer)))
            torch.testing.assert_close(
                theirs, x_hat, rtol=1e-5, atol=1e-5 * float(x_hat.abs().max())
            )
            checked += 1
    assert checked == 4


def test_saelens_loads_every_layer_of_a_group(trained_runs, activations, tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed")
    out = tmp_path / "saelens"
    export_run(trained_runs["grouped"], "saelens", out)
    run = load_run(trained_runs["grouped"])
    for entry in run.saes:
        sae = entry.load()
        for layer in sae.layers:
            x = activations[layer]
            ours, x_hat = gsae_latents(sae, x, layer)
            theirs = sae_lens.SAE.load_from_disk(str(out / f"blocks.{layer}.hook_resid_post"))
            assert type(theirs).__name__ == "TopKSAE"
            assert theirs.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
            with torch.no_grad():
                feats = theirs.encode(x)  # dense [N, m]
                recon = theirs.decode(feats)
            values, indices = feats.topk(sae.k, dim=1)
            assert_same_latents(ours, indices, values, float(sae.scale_for(layer)))
            torch.testing.assert_close(
                recon, x_hat, rtol=1e-5, atol=1e-5 * float(x_hat.abs().max())
            )


def test_files_have_the_formats_documented_keys_and_shapes(trained_runs, activations, tmp_path):
    """Without the packages: the keys, shapes and orientation each format documents, and the
    exported tensors, used in the plain TopK formula, give gsae's latents and reconstruction."""
    run = load_run(trained_runs["grouped"])
    d, m, k = 32, 128, 8
    export_run(trained_runs["grouped"], "sparsify", tmp_path / "sp")
    export_run(trained_runs["grouped"], "saelens", tmp_path / "sl")
    manifest = json.loads((tmp_path / "sp" / MANIFEST).read_text())
    assert manifest["hookpoints"]["layers.2"]["group"] == "layers_1-2"
    for layer in range(4):
        sae = run.sae_for(layer).load()
        ours, x_hat = gsae_latents(sae, activations[layer], layer)
        folder = tmp_path / "sp" / f"layers.{layer}"
        cfg = json.loads((folder / "cfg.json").read_text())
        assert set(cfg) == SPARSIFY_CFG and (cfg["d_in"], cfg["num_latents"], cfg["k"]) == (d, m, k)
        t = load_file(folder / "sae.safetensors")
        shapes = {name: tuple(v.shape) for name, v in t.items()}
        assert shapes == {
            "encoder.weight": (m, d),
            "encoder.bias": (m,),
            "W_dec": (m, d),
            "b_dec": (d,),
        }
        x = activations[layer]
        values, indices, _, _ = reference.topk_encode(
            x, t["encoder.weight"], t["encoder.bias"], t["b_dec"], k
        )
        assert_same_latents(ours, indices, values, float(sae.scale_for(layer)))
        folder = tmp_path / "sl" / f"blocks.{layer}.hook_resid_post"
        cfg = json.loads((folder / "cfg.json").read_text())
        assert SAELENS_CFG <= set(cfg) and cfg["architecture"] == "topk"
        assert (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (d, m, k)
        assert cfg["metadata"]["hook_name"] == f"blocks.{layer}.hook_resid_post"
        t = load_file(folder / "sae_weights.safetensors")
        assert tuple(t["W_enc"].shape) == (d, m) and tuple(t["W_dec"].shape) == (m, d)
        pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]  # SAELens' orientation
        top = pre.topk(k, dim=1)
        out = reference.sparse_decode(top.values.relu(), top.indices, t["W_dec"], t["b_dec"])
        torch.testing.assert_close(out, x_hat, rtol=1e-5, atol=1e-5 * float(x_hat.abs().max()))


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2", "llama", "bert"])
def test_hookpoints_are_sparsifys_for_each_family(family, tmp_path):
    """gsae's hookpoint prefix, read from the config alone, is the one sparsify's trainer
    names (``get_layer_list`` on the real model's ``base_model``)."""
    pytest.importorskip("sparsify", reason="eai-sparsify is not installed")
    from sparsify.utils import get_layer_list
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    small = {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 64,
        "max_position_embeddings": 32,
    }
    if family == "gpt2":
        from transformers import GPT2Config

        config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    else:
        from transformers import AutoConfig

        config = AutoConfig.for_model(family, **small)
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    model = auto.from_config(config)
    model.save_pretrained(tmp_path)
    theirs, _ = get_layer_list(model)
    ours = layer_prefix(load_structure(str(tmp_path)))
    assert (
        ours
        == theirs
        == {"gpt_neox": "layers", "gpt2": "h", "llama": "layers", "bert": "encoder.layer"}[family]
    )


def test_from_sparsify_encodes_as_sparsify(tmp_path):
    """A SparseCoder saved by sparsify itself (random, non-zero biases) loads into gsae's Sae:
    the same latents, values and reconstruction; the layer comes from the hookpoint."""
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed")
    torch.manual_seed(1)
    coder = sparsify.SparseCoder(20, sparsify.SparseCoderConfig(num_latents=72, k=5))
    with torch.no_grad():
        coder.encoder.bias.normal_(0, 0.2)
        coder.b_dec.normal_(0, 0.3)
    coder.save_to_disk(tmp_path / "h.7")
    sae = Sae.from_sparsify(tmp_path / "h.7")
    assert sae.layers == [7] and (sae.d, sae.m, sae.k) == (20, 72, 5)
    x = torch.randn(200, 20)
    with torch.no_grad():
        enc = coder.encode(x)
        theirs = coder.decode(enc.top_acts, enc.top_indices)
    ours, x_hat = gsae_latents(sae, x, 7)
    assert_same_latents(ours, enc.top_indices, enc.top_acts, 1.0)
    torch.testing.assert_close(x_hat, theirs, rtol=1e-5, atol=1e-5)
    assert Sae.from_sparsify(tmp_path / "h.7", layer=2).layers == [2]


def test_from_sparsify_refuses_what_is_not_a_topk_sae(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed")
    for name, cfg in (
        ("transcoder", {"transcode": True}),
        ("skip", {"skip_connection": True}),
        ("groupmax", {"activation": "groupmax"}),
    ):
        coder = sparsify.SparseCoder(8, sparsify.SparseCoderConfig(num_latents=16, k=2, **cfg))
        coder.save_to_disk(tmp_path / name)
        with pytest.raises(ValueError, match="not a TopK SAE"):
            Sae.from_sparsify(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no sparsify SAE"):
        Sae.from_sparsify(tmp_path)


def test_export_command_and_its_refusals(trained_runs, tmp_path, capsys, offline):
    out = tmp_path / "exported"

    def export(fmt, folder, *extra):
        return main([str(trained_runs["grouped"]), "--format", fmt, "--out", str(folder), *extra])

    assert export("sparsify", out) == 0
    printed = capsys.readouterr().out
    assert "layers.2" in printed and "layers_1-2" in printed and "wrote 4 SAEs" in printed
    # a second export replaces the first as a whole
    assert export("saelens", out) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        f"blocks.{x}.hook_resid_post" for x in range(4)
    ]
    assert export("sparsify", out, "--hookpoint-prefix", "gpt_neox.layers") == 0
    assert (out / "gpt_neox.layers.3" / "cfg.json").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [
        ([str(trained_runs["grouped"]), "--out", str(trained_runs["per-layer"])], "gsae-train run"),
        ([str(trained_runs["grouped"]), "--out", str(foreign)], "did not write"),
        ([str(tmp_path), "--out", str(tmp_path / "x")], "not a gsae-train output"),
        (
            [
                str(trained_runs["grouped"]),
                "--out",
                str(tmp_path / "y"),
                "--model",
                "no-such-model-anywhere",
            ],
            "could not load model",
        ),
    ]
    for argv, message in cases:
        assert main([*argv, "--format", "sparsify"]) == 2
        assert message in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
    assert export("sparsify", foreign, "--overwrite") == 0


def test_gsae_eval_takes_a_sparsify_trained_baseline(trained_runs, tmp_path, offline):
    """A folder written by sparsify itself (its SparseCoder.save_to_disk and its trainer's
    config.json), holding the per-layer run's SAEs, is a --baseline of gsae-eval: its metrics
    are those of the gsae run it came from, evaluated in the same command."""
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed")
    from sparsify.__main__ import RunConfig

    from gsae.cli.eval import main as eval_main

    export_run(trained_runs["per-layer"], "sparsify", tmp_path / "exported")
    folder = tmp_path / "sparsify-run"
    for layer in range(4):
        coder = sparsify.SparseCoder.load_from_disk(tmp_path / "exported" / f"layers.{layer}")
        coder.save_to_disk(folder / f"layers.{layer}")
    RunConfig(
        sparsify.SparseCoderConfig(),
        model=str(trained_runs["model"]),
        dataset=str(trained_runs["corpus"]),
        ctx_len=64,
    ).save_json(folder / "config.json")
    foreign = load_run(folder)
    assert foreign.per_layer and foreign.layers == [0, 1, 2, 3] and foreign.foreign
    argv = [
        str(trained_runs["grouped"]),
        str(trained_runs["per-layer"]),
        "--baseline",
        str(folder),
        "--out",
        str(tmp_path / "eval"),
        "--tokens",
        "256",
        "--batch-tokens",
        "256",
        "--mmco-pairs",
        "diagonal",
    ]
    assert eval_main(argv) == 2  # sparsify's training text is the same corpus, position unknown
    assert eval_main([*argv, "--allow-overlap"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    by = {(r["run"], r["layer"]): r for r in rows}
    for layer in range(4):
        ours, theirs = by[("per-layer", layer)], by[("sparsify-run", layer)]
        for key in ("fvu", "delta_ce_pct", "l0"):
            assert theirs[key] == pytest.approx(ours[key], rel=1e-4, abs=1e-6), key
        assert by[("grouped", layer)]["mmco"] is not None  # compared with the sparsify baseline
    assert "Per-layer SAEs (baseline" in (tmp_path / "eval" / "table1.md").read_text()
