"""The tolerances the kernel tests compare outputs and gradients in, by compute dtype: one
table for every test file (element-wise ``torch.testing.assert_close`` arguments), and the
relative error allowed over a whole tensor in a low-precision dtype."""

import torch

TOL = {
    torch.float64: dict(rtol=1e-5, atol=1e-7),  # reference.fvu_auxk_loss sums in fp32
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}

# ||got - want|| / ||want|| over a whole tensor computed in bf16 / fp16 against fp32
RELATIVE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
