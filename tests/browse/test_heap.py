"""The browser's streamed heaps (:mod:`gsae.browse.heap`) against brute force: the top
windows with their tokens and activations, a uniform random sample, fixed memory."""

from collections import defaultdict

import pytest
import torch

from gsae.browse.heap import WindowHeap, window_candidates


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
