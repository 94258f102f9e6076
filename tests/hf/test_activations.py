"""Activations from real (tiny, offline) transformers models, and the token stream."""

import gzip
import json
import time

import pytest
import torch
from tiny import build_family

from gsae.hf.hooks import ActivationReader
from gsae.hf.hub import hub_id
from gsae.hf.models import ModelLoadError, find_layers, load_model
from gsae.hf.texts import DatasetLoadError, iter_texts, open_texts
from gsae.hf.tokens import StreamPosition, TokenStream


def test_short_names_map_to_pythia():
    assert hub_id("pythia-160m") == "EleutherAI/pythia-160m"
    assert hub_id("pythia-1b") == "EleutherAI/pythia-1b"
    assert hub_id("pythia-410m-deduped") == "EleutherAI/pythia-410m-deduped"
    assert hub_id("gpt2") == "gpt2"


def test_offline_model_fails_fast_naming_what_was_tried(offline):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_model("pythia-1b")
    message = str(err.value)
    assert "EleutherAI/pythia-1b" in message and "not in the Hugging Face cache" in message
    assert "unreachable" in message and "--model" in message and "local directory" in message
    assert time.perf_counter() - start < 30


def test_offline_dataset_fails_naming_what_was_tried(offline, tmp_path):
    with pytest.raises(DatasetLoadError, match=r"no local file .*unreachable.*--dataset"):
        iter_texts("monology/pile-uncopyrighted")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetLoadError, match="expected .txt, .jsonl or .parquet"):
        iter_texts(str(tmp_path / "x.csv"))


def test_local_text_formats(tmp_path):
    docs = ["first document\nwith two lines", "second one", "third"]
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n")
    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write("\n\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    import datasets

    data = datasets.Dataset.from_dict({"text": docs})
    data.to_parquet(str(tmp_path / "a.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    for name in ("a.txt", "a.txt.gz", "a.jsonl", "a.parquet", "saved"):
        assert list(iter_texts(str(tmp_path / name))) == docs, name
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DatasetLoadError, match="has no 'text' field"):
        list(iter_texts(str(tmp_path / "b.jsonl")))


class FakeTokenizer:
    """One token per character: makes packing easy to check by eye."""

    eos_token_id, pad_token_id, sep_token_id = 0, None, None

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def collect(stream, limit=None):
    out = []
    for batch in stream:
        out.append(batch)
        if limit and len(out) == limit:
            break
    stream.close()
    return out


def test_token_stream_packs_documents_with_eos_and_no_bos():
    docs = ["abc", "defgh", "ij"]
    stream = TokenStream(lambda: iter(docs), FakeTokenizer(), ctx_len=4, batch_size=2)
    batches = collect(stream)
    rows = torch.cat([b.input_ids for b in batches]).tolist()
    flat = [t for row in rows for t in row]
    want = (
        [ord(c) for c in "abc"]
        + [0]
        + [ord(c) for c in "defgh"]
        + [0]
        + [ord(c) for c in "ij"]
        + [0]
    )
    assert flat[: len(want)] == want  # documents joined by EOS (0), nothing before the first
    masks = torch.cat([b.attention_mask for b in batches])
    assert int(masks.sum()) == len(want)  # the padded tail is masked out
    assert all(b.input_ids.shape[1] == 4 for b in batches)


def test_token_stream_resumes_exactly_from_a_saved_position():
    docs = [f"document number {i} " * (i % 5 + 1) for i in range(40)]
    texts = lambda: iter(docs)
    full = collect(TokenStream(texts, FakeTokenizer(), ctx_len=16, batch_size=3))
    head = collect(TokenStream(texts, FakeTokenizer(), ctx_len=16, batch_size=3), limit=4)
    saved = StreamPosition.from_dict(json.loads(json.dumps(head[-1].position.to_dict())))
    rest = collect(TokenStream(texts, FakeTokenizer(), ctx_len=16, batch_size=3, position=saved))
    resumed = torch.cat([b.input_ids for b in head + rest])
    assert torch.equal(resumed, torch.cat([b.input_ids for b in full]))


def test_token_stream_repeat_cycles_a_small_corpus():
    stream = TokenStream(
        lambda: iter(["abcdefg"]), FakeTokenizer(), ctx_len=4, batch_size=1, repeat=True
    )
    batches = collect(stream, limit=5)
    assert len(batches) == 5 and batches[-1].position.epoch >= 2


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


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_other_model_families(kind, tiny_model_dir, tmp_path):
    path = build_family(kind, tmp_path / kind, tiny_model_dir)
    loaded = load_model(str(path), dtype="fp32")
    assert len(find_layers(loaded.model)) == 3
    ids = torch.randint(0, 300, (2, 8))
    acts = ActivationReader(loaded, [0, 2])(ids, torch.ones_like(ids))
    assert acts.shape == (2, 16, 32) and torch.isfinite(acts).all()


# ---- streaming resume, bounded positions, the hub probe


def test_a_position_stays_small_inside_a_long_document():
    """The saved position of a chunk deep inside a 200k-token document is a few numbers, not the
    rest of the document (which the packer also must not copy for every chunk)."""
    long_doc = "x" * 200_000
    stream = TokenStream(
        lambda: iter([long_doc, "tail"]), FakeTokenizer(), ctx_len=64, batch_size=4
    )
    batches = collect(stream, limit=10)
    size = len(json.dumps(batches[-1].position.to_dict()))
    assert size < 400, size


def test_resuming_a_file_reads_no_document_before_the_position(tmp_path, monkeypatch):
    import gsae.hf.texts as acts

    docs = [f"document {i} " + "words " * (i % 7) for i in range(400)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    texts = open_texts(str(path))
    head = collect(TokenStream(texts, FakeTokenizer(), ctx_len=16, batch_size=3), limit=150)
    saved = head[-1].position
    parsed = []
    loads = acts.json.loads
    monkeypatch.setattr(acts.json, "loads", lambda s: parsed.append(1) or loads(s))
    rest = collect(
        TokenStream(texts, FakeTokenizer(), ctx_len=16, batch_size=3, position=saved), limit=1
    )
    assert saved.documents > 200
    assert len(parsed) < 150, f"{len(parsed)} records parsed to resume at document {saved}"
    whole = collect(TokenStream(texts, FakeTokenizer(), ctx_len=16, batch_size=3), limit=151)
    assert torch.equal(rest[0].input_ids, whole[-1].input_ids)  # and exactly where it stopped


def test_the_hub_probe_asks_the_configured_endpoint_through_the_proxy(monkeypatch):
    """A cluster reaches the hub through HTTPS_PROXY/HTTP_PROXY or a mirror in HF_ENDPOINT: the
    probe must go where huggingface_hub would."""
    import http.server
    import threading

    from huggingface_hub import close_session, constants

    from gsae.hf.hub import hub_reachable

    asked = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for var in ("HF_HUB_OFFLINE", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read when first imported
        monkeypatch.setenv("HF_ENDPOINT", "http://hub-mirror.invalid")
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_port}")
        close_session()  # huggingface_hub reads the proxy settings when it makes its client
        assert hub_reachable(timeout=5)
        assert asked and "hub-mirror.invalid" in asked[0], asked
    finally:
        server.shutdown()
        close_session()


def test_a_streamed_dataset_resumes_from_its_own_state(monkeypatch):
    """The hub path: the streaming dataset's state_dict() is the position, so resuming starts at
    its shard and offset (here a local dataset streamed in 4 shards, as a hub one would be)."""
    import datasets

    from gsae.hf.texts import _HubStream

    docs = [f"streamed document {i} " + "more " * (i % 5) for i in range(300)]
    stream = datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset(num_shards=4)
    texts = _HubStream("local/streamed", stream, "text")
    assert list(texts.texts()) == docs  # every document, in order, read again from the start
    whole = collect(TokenStream(texts, FakeTokenizer(), ctx_len=16, batch_size=3))
    head = collect(TokenStream(texts, FakeTokenizer(), ctx_len=16, batch_size=3), limit=200)
    saved = StreamPosition.from_dict(json.loads(json.dumps(head[-1].position.to_dict())))
    assert saved.source["hub"]["examples_iterable"]  # the dataset's own state, JSON and back
    yielded = []
    state_dict = type(stream).state_dict
    monkeypatch.setattr(
        type(stream), "state_dict", lambda self: yielded.append(1) or state_dict(self)
    )
    rest = collect(TokenStream(texts, FakeTokenizer(), ctx_len=16, batch_size=3, position=saved))
    assert torch.equal(
        torch.cat([b.input_ids for b in head + rest]), torch.cat([b.input_ids for b in whole])
    )
    assert len(yielded) <= len(docs) - saved.documents + 1  # nothing before it was yielded
