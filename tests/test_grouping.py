"""Layer grouping: complete linkage, AMAD, G_hat, savings, the accumulator and groups.json."""

import itertools
import json

import numpy as np
import pytest
import torch

from gsae import grouping as gp


def random_distances(n, seed):
    rng = np.random.default_rng(seed)
    points = np.cumsum(rng.normal(size=(n, 3)), axis=0)  # layers drift, as residual streams do
    d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    return d / d.max() * 0.6


def naive_complete_linkage(dist):
    """Brute force: at every step recompute every inter-group distance from the members."""
    n = len(dist)
    groups = [[i] for i in range(n)]
    result = {n: [frozenset(g) for g in groups]}
    while len(groups) > 1:
        best = None
        for a, b in itertools.combinations(range(len(groups)), 2):
            link = max(dist[i][j] for i in groups[a] for j in groups[b])
            key = (link, min(groups[a]), min(groups[b]))
            if best is None or key < best[0]:
                best = (key, a, b)
        _, a, b = best
        groups[a] = groups[a] + groups[b]
        del groups[b]
        result[len(groups)] = [frozenset(g) for g in groups]
    return result


def as_sets(labels):
    return {frozenset(i for i, x in enumerate(labels) if x == g) for g in set(labels)}


@pytest.mark.parametrize("n,seed", [(3, 0), (5, 1), (8, 2), (11, 3), (16, 4)])
def test_complete_linkage_matches_brute_force(n, seed):
    dist = random_distances(n, seed)
    got = gp.complete_linkage(dist)
    want = naive_complete_linkage(dist)
    for g in range(1, n + 1):
        assert as_sets(got[g]) == set(want[g]), g


def test_complete_linkage_matches_scipy():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    from scipy.spatial.distance import squareform

    for seed in range(5):
        dist = random_distances(12, seed)
        z = hierarchy.linkage(squareform(dist, checks=False), method="complete")
        got = gp.complete_linkage(dist)
        for g in range(1, 12):
            assert as_sets(got[g]) == as_sets(list(hierarchy.fcluster(z, g, "maxclust"))), g


def test_amad_and_g_hat_by_hand():
    # layers 0,1 close (0.05); 2,3 close (0.1); the two pairs far apart (0.4 .. 0.6)
    dist = np.array(
        [
            [0.00, 0.05, 0.40, 0.50],
            [0.05, 0.00, 0.45, 0.60],
            [0.40, 0.45, 0.00, 0.10],
            [0.50, 0.60, 0.10, 0.00],
        ]
    )
    g = gp.group_layers(dist, layers=[0, 1, 2, 3], threshold=0.2)
    assert g.partitions[3].labels == [0, 0, 1, 2]  # first merge: the closest pair, 0.05
    assert g.partitions[3].amad == pytest.approx((0.05 + 0 + 0) / 3)
    assert g.partitions[2].labels == [0, 0, 1, 1]
    assert g.partitions[2].amad == pytest.approx((0.05 + 0.10) / 2)
    assert g.partitions[1].amad == pytest.approx(0.60)
    assert g.g_hat == 2  # AMAD(1) = 0.6 >= 0.2, AMAD(2) = 0.075 < 0.2
    assert sorted(g.partitions) == [1, 2, 3]  # G = 1 .. L-1
    assert g.groups() == [[0, 1], [2, 3]]


def test_no_g_below_threshold_falls_back_to_l_minus_1_with_a_warning():
    dist = np.full((4, 4), 0.7) - np.eye(4) * 0.7  # even G = 3 has AMAD 0.7 / 3 > 0.2
    with pytest.warns(RuntimeWarning, match="no G has AMAD below 0.2"):
        g = gp.group_layers(dist, threshold=0.2)
    assert g.g_hat == 3


def test_labels_are_numbered_in_order_of_first_layer():
    assert gp.canonical_labels([2, 2, 0, 1, 0]) == [0, 0, 1, 2, 1]
    for labels in gp.complete_linkage(random_distances(9, 7)).values():
        firsts = [labels.index(g) for g in range(max(labels) + 1)]
        assert firsts == sorted(firsts)


def test_rows_cluster_space_and_even_groups():
    dist = random_distances(10, 5)
    g = gp.group_layers(dist, cluster_space="rows")
    want = gp.complete_linkage(gp.euclidean_rows(dist))
    assert all(g.partitions[k].labels == want[k] for k in g.partitions)
    assert g.partitions[4].amad == pytest.approx(gp.amad(dist, want[4]))  # AMAD: angular
    assert gp.even_groups(11, 3) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]  # sizes 4, 4, 3
    assert gp.even_groups(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        gp.even_groups(3, 4)


def test_savings_formula():
    # Eq. 5: Delta = (A + G T) / (A + L T) - 1; the paper's Table 2, Pythia-1B: -53.7%
    assert gp.compute_savings(6, 16, 1.74, 0.671) == pytest.approx(5.766 / 12.476 - 1, rel=1e-3)
    assert gp.compute_savings(16, 16, 1.0, 1.0) == 0.0
    assert gp.compute_savings(3, 5, 2.0, 1.0, extra_saes=1) == pytest.approx(6 / 8 - 1)
    # the dense convention reproduces the paper's T for Pythia-1B (d 2048, m 32768, 1B tokens)
    assert gp.sae_flops_per_token(2048, 32768, 128, "dense") * 1e9 == pytest.approx(
        0.671e18, rel=0.01
    )
    assert gp.sae_flops_per_token(2048, 32768, 128, "sparse") < 0.21 * gp.sae_flops_per_token(
        2048, 32768, 128, "dense"
    )


def test_accumulator_merges_and_streams():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 300, 16, generator=g).cumsum(0)
    whole = gp.AngularDistances(4)
    whole.update(hidden)
    parts = [gp.AngularDistances(4), gp.AngularDistances(4)]
    parts[0].update(hidden[:, :120])
    parts[1].update(hidden[:, 120:])
    merged = parts[0].merge(parts[1])
    np.testing.assert_allclose(merged.matrix(), whole.matrix(), rtol=0, atol=1e-12)
    assert merged.count == 300
    streamed = gp.measure_distances(iter([hidden[:, :200], hidden[:, 200:]]), 4, tokens=250)
    assert streamed.count == 250
    with pytest.raises(ValueError, match=r"expected hidden states \[4, N, d\]"):
        whole.update(hidden[:3])
    with pytest.raises(ValueError, match="no tokens seen"):
        gp.AngularDistances(2).matrix()
    poisoned = hidden.clone()
    poisoned[2, 17, 3] = float("nan")
    whole.update(poisoned)
    with pytest.raises(FloatingPointError, match="NaN inputs"):
        whole.matrix()


def test_centering_subtracts_the_running_mean():
    g = torch.Generator().manual_seed(0)
    shared = 5 * torch.randn(1, 1, 32, generator=g)  # a large common offset makes layers alike
    hidden = torch.randn(3, 400, 32, generator=g) + shared
    plain, centred = gp.AngularDistances(3), gp.AngularDistances(3, center=True)
    plain.update(hidden)
    centred.update(hidden)
    assert centred.matrix()[0, 1] > plain.matrix()[0, 1] + 0.1
    mean = hidden.double().mean(1, keepdim=True)
    manual = gp.AngularDistances(3)
    manual.update((hidden - mean).float())
    np.testing.assert_allclose(centred.matrix(), manual.matrix(), atol=1e-6)


def test_groups_json_round_trip_has_the_specified_keys(tmp_path):
    dist = random_distances(6, 9)
    g = gp.group_layers(
        dist, layers=[0, 1, 2, 3, 4, 5], model="tiny", tokens=1234, costs=(10.0, 1.0, 1)
    )
    g.save(tmp_path / "groups.json")
    data = json.loads((tmp_path / "groups.json").read_text())
    specified = "model layers distances tokens partitions g_hat threshold savings".split()
    assert set(specified) <= set(data), set(specified) - set(data)
    assert set(data["partitions"]) == {"1", "2", "3", "4", "5"}
    assert set(data["partitions"]["3"]) == {"labels", "amad"}
    assert len(data["distances"]) == 6 and data["tokens"] == 1234
    back = gp.Grouping.load(tmp_path / "groups.json")
    assert back.partitions == g.partitions and back.g_hat == g.g_hat
    assert back.savings == pytest.approx(g.savings)
    (tmp_path / "bad.json").write_text('{"model": "x"}')
    with pytest.raises(ValueError, match="not a groups.json"):
        gp.Grouping.load(tmp_path / "bad.json")


def test_bad_matrices_are_rejected():
    with pytest.raises(ValueError, match="square"):
        gp.group_layers(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="not symmetric"):
        gp.group_layers(np.array([[0, 0.1], [0.2, 0]]))
    with pytest.raises(ValueError, match="non-finite"):
        gp.group_layers(np.array([[0, np.nan], [np.nan, 0]]))


def test_centring_over_several_batches_uses_the_running_mean_of_every_token_so_far():
    """Batch b is centred by the mean of every token of batches 1..b (float64), then measured."""
    g = torch.Generator().manual_seed(1)
    shift = 4 * torch.randn(3, 1, 16, generator=g)
    batches = [
        torch.randn(3, n, 16, generator=g) + shift * (1 + i)  # the mean drifts
        for i, n in enumerate((50, 120, 7, 300))
    ]
    streamed = gp.AngularDistances(3, center=True)
    for b in batches:
        streamed.update(b)
    manual = gp.AngularDistances(3)
    for i, b in enumerate(batches):
        seen = torch.cat(batches[: i + 1], dim=1).double()
        manual.update((b.double() - seen.mean(1, keepdim=True)).float())
    np.testing.assert_allclose(streamed.matrix(), manual.matrix(), atol=1e-6)
    assert streamed.count == 477
    one_batch = gp.AngularDistances(3, center=True)  # one mean over everything is another thing
    one_batch.update(torch.cat(batches, dim=1))
    assert not np.allclose(one_batch.matrix(), streamed.matrix(), atol=1e-3)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"partitions": {"2": {"labels": [0, 2, 1], "amad": 0.1}}}, r"labels \[0, 2, 1\]"),
        ({"partitions": {"2": {"labels": [1, 1, 1], "amad": 0.1}}}, "each of 0..1"),
        ({"partitions": {"2": {"labels": [0, 1], "amad": 0.1}}}, "2 labels for 3 layers"),
        ({"layers": [0, 0, 1]}, "distinct"),
        ({"layers": [0, -1, 2]}, "non-negative integer"),
        ({"partitions": {"2": {"labels": [0, True, 1], "amad": 0.1}}}, "non-negative integer"),
        ({"g_hat": 3}, "g_hat = 3 has no partition"),
        ({"layers": "012"}, "malformed"),
    ],
)
def test_groups_files_that_cannot_be_trained_are_refused_with_a_reason(tmp_path, change, message):
    data = {
        "model": "m",
        "layers": [0, 1, 2],
        "g_hat": 2,
        "partitions": {"2": {"labels": [0, 0, 1], "amad": 0.1}},
        **change,
    }
    (tmp_path / "g.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        gp.Grouping.load(tmp_path / "g.json")


def test_layouts_round_trip_through_strict_json(tmp_path):
    g = gp.Grouping("m", [0, 1, 2], [], 0, {3: gp.Partition([0, 1, 2], float("nan"))}, 3, 0.2)
    g.save(tmp_path / "g.json")

    def refuse(constant):
        raise ValueError(constant)

    data = json.loads((tmp_path / "g.json").read_text(), parse_constant=refuse)
    assert data["partitions"]["3"]["amad"] is None
    back = gp.Grouping.load(tmp_path / "g.json")
    assert np.isnan(back.partitions[3].amad) and back.groups() == [[0], [1], [2]]
