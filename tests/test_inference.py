"""GroupSAEs: every SAE of a run by model layer, in model units; its splice and record are
gsae.activations' hooks with the SAEs plugged in; the docs' examples on a demo run."""

import re

import pytest
import torch
from test_docs import code_blocks
from tiny import demo_run

from gsae.cli.train import main as train_main
from gsae.hf.hooks import ActivationReader, lm_logits, record, splice
from gsae.inference import GroupSAEs


@pytest.fixture(scope="module")
def setup(trained_runs, one_thread):
    saes = GroupSAEs.load(trained_runs["grouped"])
    loaded = saes.load_model()
    text = trained_runs["corpus"].read_text()[:2000]
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, :96].view(3, 32)
    return saes, loaded, ids


def test_layers_map_to_their_group_sae(setup):
    saes, _, _ = setup
    assert saes.layers == [0, 1, 2, 3]
    assert [saes.group(x) for x in saes.layers] == [
        "layer_0",
        "layers_1-2",
        "layers_1-2",
        "layer_3",
    ]
    assert saes.sae(1) is saes.sae(2) and saes.sae(1).layers == [1, 2]
    with pytest.raises(KeyError, match="no SAE covers layer 7"):
        saes.sae(7)


def test_encode_decode_layer_in_model_units_any_shape(setup):
    saes, loaded, ids = setup
    hidden = ActivationReader(loaded, [1, 2])(ids)  # [2, 96, d]
    for x, layer in zip(hidden, (1, 2), strict=True):
        sae = saes.sae(layer)
        flat = sae.encode(x, layer=layer)
        enc = saes.encode_layer(x.view(3, 32, -1), layer)  # [B, T, d] in, [B, T, k] out
        assert enc.indices.shape == (3, 32, sae.k)
        torch.testing.assert_close(enc.values.view(96, -1), flat.values)
        assert torch.equal(enc.indices.view(96, -1), flat.indices)
        x_hat = saes.decode_layer(enc.values, enc.indices, layer)
        torch.testing.assert_close(
            x_hat.view(96, -1), sae.decode(flat.values, flat.indices, layer=layer)
        )
        torch.testing.assert_close(saes.reconstruct(x.view(3, 32, -1), layer), x_hat)
    # the scale of each layer is applied: layer 1 and 2 share an SAE but not a scale
    x = hidden[0]
    assert not torch.allclose(saes.reconstruct(x, 1), saes.reconstruct(x, 2))


def test_splice_is_the_activations_splice_with_reconstructions(setup):
    saes, loaded, ids = setup
    clean = lm_logits(loaded, ids)
    with record(loaded, [0, 1, 2]) as before:
        lm_logits(loaded, ids)
    with saes.splice(loaded, [2]), record(loaded, [0, 1, 2]) as seen:
        spliced = lm_logits(loaded, ids)
    expected_fn = {2: lambda h: saes.reconstruct(h, 2)}
    with splice(loaded, expected_fn):
        expected = lm_logits(loaded, ids)
    torch.testing.assert_close(spliced, expected)
    assert not torch.allclose(spliced, clean)
    for layer in (0, 1):  # layers before the splice see the clean activations
        torch.testing.assert_close(seen[layer], before[layer])
    torch.testing.assert_close(seen[2], saes.reconstruct(before[2], 2).to(seen[2].dtype))
    torch.testing.assert_close(lm_logits(loaded, ids), clean)  # hooks removed on exit
    with pytest.raises(KeyError, match="no SAE covers layer 9"):
        with saes.splice(loaded, [9]):
            pass


def test_record_gives_the_latents_of_each_layer(setup):
    saes, loaded, ids = setup
    with record(loaded, saes.layers) as hidden:
        lm_logits(loaded, ids)
    with saes.record(loaded) as latents:
        lm_logits(loaded, ids)
    assert sorted(latents) == [0, 1, 2, 3]
    for layer, enc in latents.items():
        expected = saes.encode_layer(hidden[layer], layer)
        assert torch.equal(enc.indices, expected.indices)
        torch.testing.assert_close(enc.values, expected.values)
    with saes.splice(loaded, [1]), saes.record(loaded, [1]) as spliced:  # recorded as spliced
        lm_logits(loaded, ids)
    recon = saes.reconstruct(hidden[1], 1)
    assert torch.equal(spliced[1].indices, saes.encode_layer(recon, 1).indices)


def test_readme_inference_example_on_a_demo_run(tmp_path, one_thread, monkeypatch, capsys):
    """The docs' examples that use the quick start's run, as written, on a small run of the demo
    model saved where the quick start saves it (``out/demo``, relative to the working directory)."""
    monkeypatch.chdir(tmp_path)
    budget = dict(groups="even:2", scale_tokens="1k", batch_tokens=512, device="cpu")
    argv = demo_run("out/demo", "2k", **budget)
    assert train_main(argv) == 0
    blocks = [(where, code) for where, code in code_blocks("python") if "out/demo" in code]
    assert blocks, "no python example of the README or docs/ uses the quick start's run"
    capsys.readouterr()
    for where, code in blocks:  # tests/test_docs.py runs the others
        exec(compile(code, where, "exec"), {})
    printed = capsys.readouterr().out
    for layer in range(6):
        assert f"layer {layer} (SAE " in printed
    assert re.search(r"'\s?hacker'\s+\[\(\d+, \d+\.\d+\)", printed)
    assert re.search(r"loss \d+\.\d+ clean, \d+\.\d+ with layer 2", printed)
