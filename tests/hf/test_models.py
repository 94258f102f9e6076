"""Loading models (:mod:`gsae.hf.models`): offline, one clear error naming what was tried; tiny
models of each family."""

import time

import pytest
import torch
from tiny import build_family

from gsae.hf.hooks import ActivationReader
from gsae.hf.models import ModelLoadError, find_layers, load_model


def test_offline_model_fails_fast_naming_what_was_tried(offline):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_model("pythia-1b")
    message = str(err.value)
    assert "EleutherAI/pythia-1b" in message and "not in the Hugging Face cache" in message
    assert "unreachable" in message and "--model" in message and "local directory" in message
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_other_model_families(kind, tiny_model_dir, tmp_path):
    path = build_family(kind, tmp_path / kind, tiny_model_dir)
    loaded = load_model(str(path), dtype="fp32")
    assert len(find_layers(loaded.model)) == 3
    ids = torch.randint(0, 300, (2, 8))
    acts = ActivationReader(loaded, [0, 2])(ids, torch.ones_like(ids))
    assert acts.shape == (2, 16, 32) and torch.isfinite(acts).all()
