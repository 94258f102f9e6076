"""Schedule-free sign-SGD ("signum"), the optimiser EleutherAI's sparsify trains SAEs with.

Schedule-free SGD (Defazio et al. 2024, "The Road Less Scheduled") keeps two sequences per
parameter and evaluates the gradient at a third point between them:

    z_{t+1} = z_t - lr * sign(g(y_t))              the base (sign-SGD) iterate
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}  a running average, c_{t+1} = 1 / (t + 1)
    y_{t+1} = (1 - beta) z_{t+1} + beta x_{t+1}    where the next gradient is taken (beta = 0.95)

x is a weighted mean of the z's, which replaces a learning-rate schedule: step t has weight
t^r, so ``c_{t+1} = (t+1)^r / sum_{s<=t+1} s^r`` (the package's ``r``; its further factor lr_max^2
is the same at every step at the constant learning rate used here). r = 0, the package's default
and sparsify's, is the plain mean; r = 1 (gsae's default, see gsae.sae.SaeConfig) lets the early,
poor iterates fade from the average, which at short budgets is most of what there is.

As in the `schedulefree` package's memory-saving wrapper (the one sparsify uses), the parameters
hold y while training and only z is stored; x is derived, ``x = (y - (1 - beta) z) / beta``.
**The model to evaluate and save is x**, the average: :meth:`ScheduleFreeSignSGD.averaged` swaps
it in and restores y bit-exactly afterwards (so an evaluation in the middle of a run does not
change how it goes on).

Unlike the wrapper, a step can be skipped on the device without a host sync: set
``found_inf`` (a 0/1 tensor) before :meth:`step`, as with torch's fused Adam, and a non-finite
step changes neither z, x, y nor the step count of the average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    """Schedule-free sign-SGD with momentum ``beta`` (the interpolation weight of y) and
    averaging weights t^``average_power``."""

    def __init__(self, params, lr: float, momentum: float = 0.95, average_power: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 < momentum < 1:
            raise ValueError(f"momentum must be in (0, 1), got {momentum}")
        if not average_power >= 0:
            raise ValueError(f"average_power must be >= 0, got {average_power}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "r": average_power})
        self.found_inf: torch.Tensor | None = None  # set by the caller, as for fused Adam

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ScheduleFreeSignSGD does not take a closure")
        for group in self.param_groups:
            lr, beta, r = group["lr"], group["momentum"], group.get("r", 0.0)
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, lr, beta, r)
        return None

    def _update(self, p: torch.Tensor, lr: float, beta: float, r: float) -> None:
        state = self.state[p]
        if "z" not in state:
            state["z"] = p.detach().clone()
            state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
        # an int64 "step" survives load_state_dict uncast, but may arrive on the host
        step, z = state["step"].to(p.device), state["z"]
        ok = torch.ones((), device=p.device)
        if self.found_inf is not None:
            ok = 1 - self.found_inf.to(device=p.device, dtype=torch.float32)
        step += ok.to(torch.int64)  # applied steps only: a skipped one does not dilute x
        state["step"] = step
        c = self._average_weight(state, step, ok, r)  # 0 for a skipped step
        # with s = lr sign(g): z' = z - s, x' = x + c (z' - x) and y' = (1 - beta) z' + beta x'
        # fold, x eliminated, into y' = y + c (z - y) - (1 - beta + beta c) s: no temporary x
        # and three fewer passes over the weights than computing x
        c = c.to(p.dtype)
        s = p.grad.sign().nan_to_num_(0.0).mul_(lr * ok)  # sign(NaN) is NaN: the step is skipped
        p.lerp_(z, c).addcmul_(s, 1 - beta + beta * c, value=-1)
        z.sub_(s)

    @staticmethod
    def _average_weight(state: dict, step: torch.Tensor, ok: torch.Tensor, r: float):
        """c_t = t^r / sum_{s<=t} s^r (a device scalar: no sync)."""
        if r == 0:
            return ok / step.clamp_min(1)  # 1/t, exactly as the plain mean has always been
        # t^r summed in float64: float32 loses the increments once the sum is ~2^24 times larger
        weight = step.to(torch.float64).pow(r) * ok
        if "weight_sum" not in state:
            state["weight_sum"] = torch.zeros((), dtype=torch.float64, device=step.device)
        total = state["weight_sum"].to(step.device) + weight
        state["weight_sum"] = total
        return (weight / total.clamp_min(1e-300)).to(torch.float32)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Parameters hold x (the averaged weights) inside the block, y again after it."""
        saved = []
        with torch.no_grad():
            for group in self.param_groups:
                beta = group["momentum"]
                for p in group["params"]:
                    z = self.state[p].get("z")
                    if z is not None:
                        saved.append((p, p.detach().clone()))
                        p.lerp_(z, 1 - 1 / beta)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, y in saved:
                    p.copy_(y)
