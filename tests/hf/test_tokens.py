"""The token stream (:mod:`gsae.hf.tokens`): packing, positions that stay small, exact resume
from a file or a streamed dataset, and token text for the browser."""

import json

import torch

from gsae.hf.models import load_tokenizer
from gsae.hf.texts import open_texts
from gsae.hf.tokens import StreamPosition, TokenStream, TokenText


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


# ---- streaming resume, bounded positions


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
