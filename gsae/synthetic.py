"""Synthetic activations with known features, and a short training run on them.

``python -m gsae.synthetic`` trains a small SAE on sparse combinations of known directions and
prints FVU falling and how many of the directions the decoder has found: a quick check that an
install works, with no model or data set needed.
"""

from __future__ import annotations

import argparse
import time

import torch

from .init import activation_scale
from .sae import Sae, SaeConfig
from .train.step import SaeTrainer


class SparseFeatures:
    """Activations ``x = scale * (sum of `active` known unit directions with magnitudes in
    [0.5, 1.5] + noise) + offset``: the ground truth an SAE should recover."""

    def __init__(self, d: int = 32, n_features: int = 64, active: int = 4, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        dirs = torch.randn(n_features, d, generator=self.generator)
        self.directions = dirs / dirs.norm(dim=1, keepdim=True)  # [n_features, d]
        self.d, self.n_features, self.active = d, n_features, active

    def batch(self, n: int) -> torch.Tensor:
        g = self.generator
        chosen = torch.rand(n, self.n_features, generator=g).argsort(1)[:, : self.active]
        mags = torch.rand(n, self.active, generator=g) + 0.5  # [n, active]
        x = torch.einsum("na,nad->nd", mags, self.directions[chosen])
        return 3.0 * (x + 0.01 * torch.randn(n, self.d, generator=g)) + 1.0

    def recovered(self, sae: Sae, threshold: float = 0.9) -> float:
        """Fraction of the true directions with a decoder row at cosine > threshold."""
        best = (self.directions @ sae.W_dec.detach().T).max(dim=1).values
        return float((best > threshold).float().mean())


def train(steps: int = 1200, batch: int = 512, log_every: int = 100, seed: int = 0) -> float:
    # distinct streams: from one seed the decoder's random init would *be* the true directions
    data = SparseFeatures(seed=seed + 1000)
    sae = Sae(SaeConfig(d=data.d, num_latents=128, k=4, dead_threshold=20_000, seed=seed))
    sae.set_scale(0, activation_scale([data.batch(4096)], 4096))
    trainer = SaeTrainer(sae)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        out = trainer.step(data.batch(batch))
        if step % log_every == 0 or step == 1:
            print(
                f"step {step:5d}  FVU {float(out.fvu):.4f}  AuxK {float(out.auxk):.4f}  "
                f"dead {float(out.dead_fraction):.2f}  features found {data.recovered(sae):.0%}"
                f"  ({time.perf_counter() - start:.1f}s)"
            )
    with torch.no_grad():
        fvu = float(sae(data.batch(4096)).loss.fvu)
    print(f"held-out FVU {fvu:.4f}; {data.recovered(sae):.0%} of {data.n_features} features found")
    return fvu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args(argv)
    train(args.steps, args.batch)


if __name__ == "__main__":
    main()
