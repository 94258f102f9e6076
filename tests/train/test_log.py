"""The step timer's time split."""

import pytest
import torch

from gsae.train.log import StepTimer


@pytest.mark.gpu
def test_the_gpu_time_split_measures_the_work_not_its_launch():
    timer = StepTimer("cuda")
    timer.waiting()
    timer.mark()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work, launched in microseconds
    timer.mark()
    timer.mark()
    totals = timer.totals()
    assert totals["forward"] > 0.02, totals
