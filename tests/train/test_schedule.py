"""prunext/train/schedule.py: warmup and decay of the learning rate."""

import math

import pytest
import torch

from prunext.train.schedule import lr_factor, make_scheduler, warmup_steps


def test_warmup_then_cosine_to_min():
    f = [lr_factor(i, total=10, warmup=2, kind="cosine", min_ratio=0.1) for i in range(10)]
    assert f[:2] == [0.5, 1.0]
    assert f[2] == 1.0 and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))  # non-increasing after warmup
    mid = lr_factor(2 + 7 // 2, 10, 2, "cosine", 0.1)  # halfway through the decay
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7)))


def test_linear_and_constant():
    assert [lr_factor(i, 5, 0, "linear", 0.0) for i in range(5)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    assert {lr_factor(i, 5, 1, "constant") for i in range(1, 5)} == {1.0}


def test_warmup_fraction_or_steps():
    assert warmup_steps(0.05, 100) == 5 and warmup_steps(0.05, 10) == 1 and warmup_steps(7, 100) == 7 and warmup_steps(0, 9) == 0


def test_scheduler_drives_the_optimizer():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make_scheduler(opt, total=4, warmup=0, kind="linear", min_ratio=0.5)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0, 5 / 3, 4 / 3, 1.0])
