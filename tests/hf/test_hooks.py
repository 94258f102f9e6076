"""Activations read by the hooks (:mod:`gsae.hf.hooks`) from real (tiny, offline) transformers
models."""

import pytest
import torch

from gsae.hf.hooks import ActivationReader
from gsae.hf.models import load_model


def test_reader_matches_hidden_states_and_stops_early(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="fp32")
    assert loaded.num_layers == 4 and loaded.d_model == 32
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = loaded.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    reader = ActivationReader(loaded, [0, 1, 2])
    ran = []
    handle = loaded.layers[3].register_forward_hook(lambda *_: ran.append(1))
    acts = reader(ids, mask)
    handle.remove()
    assert acts.shape == (3, 24, 32)
    assert not ran, "layer 3 ran although only layers 0-2 were asked for"
    for pos, layer in enumerate([0, 1, 2]):
        torch.testing.assert_close(acts[pos], full.hidden_states[layer + 1].flatten(0, 1))
    # the last layer: the residual stream itself, not transformers' final-layer-normed copy
    last = ActivationReader(loaded, [3])(ids, mask)[0]
    assert not torch.allclose(last, full.hidden_states[4].flatten(0, 1))


def test_reader_drops_padding(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="fp32")
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    acts = ActivationReader(loaded, [1])(ids, mask)
    assert acts.shape == (1, 16, 32)
    alone = ActivationReader(loaded, [1])(ids[1:, :6], mask[1:, :6])
    torch.testing.assert_close(acts[0, 10:], alone[0], atol=1e-5, rtol=1e-5)


def test_reader_rejects_layers_out_of_range(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="fp32")
    with pytest.raises(ValueError, match=r"layers \[4\] out of range: the model has 4 layers"):
        ActivationReader(loaded, [2, 4])
