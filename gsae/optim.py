"""Schedule-free sign-SGD ("signum"), the optimiser EleutherAI's sparsify trains SAEs with.

Schedule-free SGD (Defazio et al. 2024, "The Road Less Scheduled") keeps two sequences per
parameter and evaluates the gradient at a third point between them:

    z_{t+1} = z_t - lr * sign(g(y_t))              the base (sign-SGD) iterate
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}  a running average, c_{t+1} = 1 / (t + 1)
    y_{t+1} = (1 - beta) z_{t+1} + beta x_{t+1}    where the next gradient is taken (beta = 0.95)

x is the plain mean of the z's, which replaces a learning-rate schedule (the package's weights
lr_max^2 are all equal at the constant learning rate used here). As in the `schedulefree`
package's memory-saving wrapper (the one sparsify uses), the parameters hold y while training
and only z is stored; x is derived, ``x = (y - (1 - beta) z) / beta``. **The model to evaluate
and save is x**, the average: :meth:`ScheduleFreeSignSGD.averaged` swaps it in and restores y
bit-exactly afterwards (so an evaluation in the middle of a run does not change how it goes on).

Unlike the wrapper, a step can be skipped on the device without a host sync: set
``found_inf`` (a 0/1 tensor) before :meth:`step`, as with torch's fused Adam, and a non-finite
step changes neither z, x, y nor the step count of the average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    """Schedule-free sign-SGD with momentum ``beta`` (the interpolation weight of y)."""

    def __init__(self, params, lr: float, momentum: float = 0.95):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 < momentum < 1:
            raise ValueError(f"momentum must be in (0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.found_inf: torch.Tensor | None = None  # set by the caller, as for fused Adam

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ScheduleFreeSignSGD does not take a closure")
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, lr, beta)
        return None

    def _update(self, p: torch.Tensor, lr: float, beta: float) -> None:
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
        c = ok / step.clamp_min(1)  # c_t = 1/t with a constant lr; 0 for a skipped step
        x = p.lerp(z, 1 - 1 / beta)  # y -> x
        # sign(NaN) is NaN: zero it (the step is then skipped through `ok` anyway)
        z.sub_(p.grad.sign().nan_to_num_(0.0).mul_(lr * ok))
        x.lerp_(z, c.to(x.dtype))
        p.copy_(x.lerp_(z, 1 - beta))  # x -> y

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
