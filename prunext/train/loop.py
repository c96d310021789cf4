"""One optimizer step and one evaluation pass on a DeepSpeed engine (every rank calls both).

Under ZeRO-3 each forward gathers parameters from all ranks, so every rank
must run the same number of forward passes: the data layout
(:mod:`prunext.train.data`) gives every rank ``accum`` micro-batches per step,
and evaluation gives every rank the same number of windows.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from prunext.errors import UserError
from prunext.train.data import BlockOrder

log = logging.getLogger(__name__)


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


def run_steps(engine, order: BlockOrder, run, start_step: int, rank: int, world: int, *, objective, held_out, norms,
              facts: dict, out, executed_params: int) -> tuple[int, dict]:
    """The step loop from ``start_step`` to the budget's end or ``--stop-at``: metrics, evaluation, checkpoints.

    Args:
        engine: the student's DeepSpeed engine.
        order: the block order of the run's tokens.
        run: :class:`prunext.train.settings.CheckedRun`.
        start_step: 0, or the step a resumed checkpoint ends at.
        objective: the kd objective, or None for lm.
        held_out: fixed held-out windows for ``--eval-every``, or None.
        norms: the output norms ``--norm-open`` gates, or None.
        facts: the recorded settings (saved with every checkpoint).
        out: the run folder.
        executed_params: parameters one forward runs, for MFU.

    Returns:
        ``(step reached, the last step's metrics record)``.

    Raises:
        NonFiniteLoss: naming the last good checkpoint.
    """
    from tqdm.auto import tqdm

    from prunext.train import checkpoints
    from prunext.train.dist import on_gpu
    from prunext.train.metrics import MetricsLog, Wandb, mfu, peak_flops
    from prunext.train.normopen import gate_at, set_gate

    settings, options, budget = run.settings, run.options, run.budget
    out, ckpt_dir = Path(out), Path(out) / "checkpoints"
    open_steps, factor = settings.norm_open_steps, settings.norm_open_factor
    resumed = run.resume is not None
    peak = peak_flops(torch.cuda.get_device_name() if on_gpu() else "cpu", settings.dtype)
    metrics = MetricsLog(out / "metrics.jsonl", active=rank == 0, resume_step=start_step if resumed else None)
    wandb = Wandb(rank == 0 and options.report_to == "wandb", out, facts, options.wandb_project, resumed)
    bar = tqdm(total=budget.steps, initial=start_step, disable=rank != 0, unit="step", dynamic_ncols=True)
    stop = budget.steps if options.stop_at is None else min(options.stop_at, budget.steps)
    started = time.perf_counter()
    last_saved = start_step if resumed else None
    state = {"settings": facts}
    step, record = start_step, {}
    if open_steps:
        set_gate(norms, gate_at(step, open_steps, factor))
    try:
        while step < stop:
            t0 = time.perf_counter()
            lrs = engine.get_lr()  # one per optimizer group: norms, adapters, base (those present)
            lr = lrs[-1]
            parts: dict = {}
            loss = train_step(engine, order, step, rank, world, skips_allowed=settings.dtype == "float16",
                              objective=objective, parts=parts)
            step += 1
            if open_steps:
                set_gate(norms, gate_at(step, open_steps, factor))
            tok_s = budget.tokens_per_step / (time.perf_counter() - t0)
            grad_norm = engine.get_global_grad_norm()
            record = {
                "step": step,
                "loss": loss,
                "lr": lr,
                **({"group_lrs": lrs} if len(lrs) > 1 else {}),
                **{f"{k}_loss": v for k, v in parts.items()},
                "tokens": step * budget.tokens_per_step,
                "tokens_per_s": tok_s,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "epoch": step * budget.global_batch / order.n_blocks,
                "elapsed_s": time.perf_counter() - started,
                "mfu": mfu(executed_params, tok_s, peak),
                **({"norm_open": gate_at(step, open_steps, factor) * factor} if open_steps else {}),  # in effect after this step
            }
            if held_out is not None and (step % options.eval_every == 0 or step == budget.steps):
                record["eval_loss"] = evaluate(engine, held_out, settings.micro_batch, rank, world)
                record["eval_ppl"] = math.exp(min(record["eval_loss"], 50))
            metrics.write(record)
            wandb.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            if rank == 0 and (step % options.log_every == 0 or step == stop):
                extra = f" eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
                extra += f" mfu {record['mfu']:.1%}" if record["mfu"] is not None else ""
                log.info("step %d/%d loss %.4f lr %.3e tokens/s %s%s", step, budget.steps, loss, lr, f"{tok_s:,.0f}", extra)
            if (options.save_every and step % options.save_every == 0) or step == stop:
                state.update(step=step, tokens=step * budget.tokens_per_step)
                checkpoints.save(engine, ckpt_dir, step, state, rank, options.keep_checkpoints)
                last_saved = step
    except NonFiniteLoss as e:
        good = ckpt_dir / checkpoints.tag_of(last_saved) if last_saved else "none (no checkpoint was saved yet)"
        raise NonFiniteLoss(f"{e}; stopped before applying it. Last good checkpoint: {good}; lower --lr and --resume, or restart") from None
    finally:
        bar.close()
        wandb.finish()
    return step, record
