"""Learning-rate schedules as a multiplier of the peak ``--lr``.

Warmup is linear from ``1/warmup`` to 1 over the first ``warmup`` steps; then
``cosine`` decays to ``min_ratio`` along half a cosine (FlexiGPT heals with
cosine, docs/method.md prune path 6), ``linear`` decays linearly to ``min_ratio``, ``constant``
stays at 1. Step ``i`` is 0-based: the factor used by the (i+1)-th optimizer
step, which is what ``torch.optim.lr_scheduler.LambdaLR`` passes.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(i: int, total: int, warmup: int, kind: str = "cosine", min_ratio: float = 0.1) -> float:
    """The multiplier of the peak learning rate at 0-based step ``i`` of ``total``."""
    if i < warmup:
        return (i + 1) / warmup
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total - warmup - 1)
    progress = min(1.0, (i - warmup) / decay_steps)
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")


def warmup_steps(warmup: float, total: int) -> int:
    """``--warmup`` as steps: a count when >= 1, a fraction of ``total`` when in [0, 1)."""
    return int(warmup) if warmup >= 1 else int(math.ceil(warmup * total))


def make_scheduler(optimizer, total: int, warmup: int | list[int], kind: str, min_ratio: float):
    """A ``LambdaLR`` over ``optimizer`` (DeepSpeed steps it at each accumulation boundary).

    ``warmup``: one count for every parameter group, or one per group (in the optimizer's order).
    """
    from torch.optim.lr_scheduler import LambdaLR

    warmups = warmup if isinstance(warmup, list) else [warmup] * len(optimizer.param_groups)
    return LambdaLR(optimizer, [lambda i, w=w: lr_factor(i, total, w, kind, min_ratio) for w in warmups])
