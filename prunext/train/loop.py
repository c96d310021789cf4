"""One optimizer step and one evaluation pass on a DeepSpeed engine (every rank calls both).

Under ZeRO-3 each forward gathers parameters from all ranks, so every rank
must run the same number of forward passes: the data layout
(:mod:`prunext.train.data`) gives every rank ``accum`` micro-batches per step,
and evaluation gives every rank the same number of windows.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from prunext.errors import UserError
from prunext.train.data import BlockOrder


class NonFiniteLoss(UserError):
    """The loss became NaN or inf; the step was not applied."""


def train_step(
    engine, order: BlockOrder, step: int, rank: int, world: int, skips_allowed: bool = False, objective=None, parts: dict | None = None
) -> float:
    """Run 0-based optimizer step ``step``: ``accum`` forward/backward passes, then the update.

    The global mean loss is all-reduced before the last backward, so a
    non-finite loss stops every rank before the optimizer applies the step.
    DeepSpeed itself skips an update whose gradients are not finite (its
    overflow check, global over ranks); without fp16 loss scaling, where a
    skip is routine (``skips_allowed``), that is divergence too, and the
    schedule would silently fall behind, so it stops the run as well.

    Args:
        objective: a :class:`prunext.train.objective.Objective` (None: the model's LM loss).
        parts: when given, filled with the global means of the objective's parts (``lm``, ``kd``).

    Returns:
        The mean loss over the global batch.

    Raises:
        NonFiniteLoss: on every rank, when any rank's loss is NaN or inf.
    """
    blocks = order.step_blocks(step, rank)  # (accum, micro)
    accum = blocks.shape[0]
    losses, sums = [], {}
    for a in range(accum):
        input_ids = order.batch(blocks[a]).to(engine.device)  # (micro, seq)
        if objective is None:
            loss = engine(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        else:
            loss, own = objective(engine, input_ids)
            for key, value in own.items():
                sums[key] = sums.get(key, 0.0) + value
        losses.append(loss.detach().float())
        if a == accum - 1:
            keys = sorted(sums)
            extra = torch.tensor([sums[k] for k in keys], dtype=torch.float32, device=losses[0].device)
            total = torch.cat([torch.stack(losses).sum().reshape(1), extra])
            dist.all_reduce(total)
            mean = total[0].item() / (accum * world)
            if parts is not None:
                parts.update({k: total[1 + i].item() / (accum * world) for i, k in enumerate(keys)})
            if not math.isfinite(mean):
                raise NonFiniteLoss(f"the loss is {mean} at step {step + 1}")
        engine.backward(loss)
        engine.step()  # a no-op for the weights until the accumulation boundary
    if not engine.was_step_applied() and not skips_allowed:
        raise NonFiniteLoss(f"the gradients are not finite at step {step + 1} (loss {mean:.4f}; DeepSpeed skipped the update)")
    return mean


@torch.no_grad()
def evaluate(engine, windows: torch.LongTensor, micro: int, rank: int, world: int) -> float:
    """Mean loss on fixed held-out windows, split evenly over the ranks.

    Args:
        windows: (n, seq) token windows; when n is not a multiple of the world
            size the first ones are reused so every rank runs as many forwards.

    Returns:
        The mean token loss over the windows (same on every rank).
    """
    n = windows.shape[0]
    n_used = max(world, math.ceil(n / world) * world)
    mine = [i % n for i in range(rank, n_used, world)]
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    for start in range(0, len(mine), micro):
        batch = windows[mine[start : start + micro]].to(engine.device)  # (b, seq)
        loss = engine(input_ids=batch, labels=batch, use_cache=False).loss
        total[0] += loss.double() * batch.shape[0]
        total[1] += batch.shape[0]
    engine.train()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()
