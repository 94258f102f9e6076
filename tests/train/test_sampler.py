"""The layer sampler: each row is its drawn layer's activation with that layer's scale; draws
uniform per token, independent across groups, set by the seed and step alone."""

import torch

from gsae.sae import Sae, SaeConfig
from gsae.train.sampler import LayerSampler

GROUPS = [[0, 1, 2], [3, 4], [5]]


def coded(n, layers=6):
    """[L, n, 2] activations whose row says where it came from: (layer, token)."""
    layer = torch.arange(layers, dtype=torch.float32)[:, None].expand(layers, n)
    token = torch.arange(n, dtype=torch.float32)[None, :].expand(layers, n)
    return torch.stack([layer, token], dim=2)


def test_each_row_is_the_drawn_layers_activation_and_gets_its_scale():
    hidden = coded(500)
    sampler = LayerSampler(GROUPS, list(range(6)), seed=1, device="cpu")
    sae = Sae(SaeConfig(d=2, num_latents=4, k=1), GROUPS[0])
    for layer, scale in zip(GROUPS[0], (0.5, 2.0, 7.0), strict=True):
        sae.set_scale(layer, scale)
    for step in range(3):
        for group, batch in zip(GROUPS, sampler.draw(hidden, step), strict=True):
            layer = torch.as_tensor(batch.layer).expand(batch.x.shape[0])
            assert batch.tokens == 500 and batch.x.shape == (500, 2)
            assert torch.equal(batch.x[:, 0].long(), layer)  # row <-> layer id
            assert torch.equal(batch.x[:, 1].long(), torch.arange(500))  # every token, in order
            assert set(layer.tolist()) <= set(group)
        first = sampler.draw(hidden, step)[0]
        scales = {0: 0.5, 1: 2.0, 2: 7.0}
        want = torch.tensor([scales[int(x)] for x in first.layer])[:, None] * first.x
        torch.testing.assert_close(sae.normalize(first.x, first.layer), want)  # layer <-> scale


def test_layers_are_uniform_per_token_and_independent_across_groups():
    from scipy.stats import chi2_contingency, chisquare

    hidden = coded(2000)
    sampler = LayerSampler(GROUPS, list(range(6)), seed=0, device="cpu")
    joint = torch.zeros(3, 2)
    for step in range(10):
        a, b, _ = sampler.draw(hidden, step)
        joint.index_put_((a.layer, b.layer - 3), torch.ones(2000), accumulate=True)
    assert chisquare(joint.sum(1).numpy()).pvalue > 1e-3  # uniform over the group's 3 layers
    assert chisquare(joint.sum(0).numpy()).pvalue > 1e-3
    assert chi2_contingency(joint.numpy()).pvalue > 1e-3  # group A's draw says nothing of B's
    # and each token draws anew: consecutive tokens agree as often as chance says (1/3)
    a = sampler.draw(hidden, 11)[0].layer
    same = float((a[1:] == a[:-1]).float().mean())
    assert abs(same - 1 / 3) < 0.05, same


def test_draws_depend_on_the_seed_and_step_alone():
    hidden = coded(300)
    one = LayerSampler(GROUPS, list(range(6)), seed=5, device="cpu")
    for step in range(4):
        one.draw(hidden, step)
    fresh = LayerSampler(GROUPS, list(range(6)), seed=5, device="cpu")  # a resumed run
    assert torch.equal(one.draw(hidden, 4)[0].layer, fresh.draw(hidden, 4)[0].layer)
    assert not torch.equal(fresh.draw(hidden, 4)[0].layer, fresh.draw(hidden, 5)[0].layer)
    other = LayerSampler(GROUPS, list(range(6)), seed=6, device="cpu")
    assert not torch.equal(other.draw(hidden, 4)[0].layer, fresh.draw(hidden, 4)[0].layer)


def test_every_layer_mode_stacks_the_group_and_counts_tokens():
    hidden = coded(50)
    sampler = LayerSampler(GROUPS, list(range(6)), seed=0, device="cpu", every_layer=True)
    a, b, c = sampler.draw(hidden, 0)
    assert a.x.shape == (150, 2) and a.tokens == 50
    assert (
        torch.equal(a.x[:, 0].long(), a.layer)
        and a.layer.tolist() == [0] * 50 + [1] * 50 + [2] * 50
    )
    assert c.x.shape == (50, 2) and c.layer == 5
    assert b.layer.tolist() == [3] * 50 + [4] * 50
