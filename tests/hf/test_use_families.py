"""Using trained SAEs on each model family (tiny GPT-2, Llama and BERT, positions limited to
64): a real gsae-train run exported to sparsify under the family's hookpoint names and loaded
back, GroupSAEs' hooks, and the browser's collection and site."""

import os

import pytest
import torch
from tiny import build_family, flags

from gsae.browse import collect, write_site
from gsae.browse.collect import CollectConfig
from gsae.cli.train import main as train_main
from gsae.export import export_run
from gsae.hf.hooks import lm_logits
from gsae.inference import GroupSAEs

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
PREFIX = {"gpt2": "h", "llama": "layers", "bert": "encoder.layer"}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_export_hooks_and_browser_per_family(
    kind, tiny_model_dir, tiny_corpus, tmp_path, one_thread
):
    model = build_family(kind, tmp_path / kind, tiny_model_dir)
    run = tmp_path / "run"
    argv = flags(model=model, dataset=tiny_corpus, out=run, groups="even:2", include_last=True)
    argv += flags(tokens="1k", scale_tokens=512, batch_tokens=256, ctx_len=64, k=4)
    argv += flags(expansion_factor=4, device="cpu")
    assert train_main(argv) == 0
    saes = GroupSAEs.load(run)
    assert saes.layers == [0, 1, 2] and len(saes.saes) == 2

    exported = export_run(run, "sparsify", tmp_path / "sparsify")
    assert [e.name for e in exported] == [f"{PREFIX[kind]}.{x}" for x in range(3)]
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed")
    coders = sparsify.SparseCoder.load_many(str(tmp_path / "sparsify"), local=True)
    loaded = saes.load_model()
    ids = loaded.tokenizer(tiny_corpus.read_text()[:600], return_tensors="pt").input_ids[:, :64]
    with saes.record(loaded) as latents, torch.no_grad():
        loaded.model(input_ids=ids)
    from gsae.hf.hooks import record

    with record(loaded, [0, 1, 2]) as hidden, torch.no_grad():
        loaded.model(input_ids=ids)
    for layer in range(3):
        x = hidden[layer][0]
        enc = coders[f"{PREFIX[kind]}.{layer}"].encode(x)
        ours = latents[layer]
        assert torch.equal(enc.top_indices.sort(1).values, ours.indices[0].sort(1).values)
    if loaded.lm_head:  # GPT-2 and Llama: the reconstruction spliced into the forward
        clean = lm_logits(loaded, ids)
        with saes.splice(loaded, [1]):
            assert not torch.allclose(lm_logits(loaded, ids), clean)
        torch.testing.assert_close(lm_logits(loaded, ids), clean)

    col = collect(
        run,
        tokens=512,
        batch_tokens=256,
        device="cpu",
        config=CollectConfig(window=16, top=3, random=2, pool=8),
    )
    assert col.meta["tokens"] == 512
    pages = write_site(col, loaded.tokenizer, tmp_path / "site")
    assert all(p.exists() for p in pages)
