"""Local reconstruction after pruning (``prune --reconstruct-epochs E``).

Right after pruning, each position's own parameters (its LoRA adapters and
output norms; nothing shared) are fitted so that the position's output matches
what the unpruned model holds at the same depth, block by block, with no
backward through the whole model (LLM-Streamline trains its replacement layer
this way)::

    student position p:  s_{p+1} = block_p(s_p)         s_0 = the embeddings
    target:               t_p     = the source model's hidden state after
                                    source block target(p)  (:func:`targets`)
    loss:                 |s_{p+1} - t_p|^2 / |t_p|^2    over every token but each window's first

Positions are fitted in depth order on the pruned model's *own* inputs ``s_p``
(computed with the earlier positions already fitted), so each fit also
corrects what the positions before it left, and errors do not compound. A
flexigpt model keeps the source's depth, so position p matches source block p;
a model with blocks dropped (shortgpt-lora) matches, after kept block k, the
source's state just before the next kept block runs.

Cost, counted in the token budget it stands for (``token_passes``): one
forward of the source model and of the pruned model to record states, then per
epoch one forward and backward of every position over the tokens, and one
more forward to carry the fitted output on. That is about ``tokens * (epochs +
1)`` tokens of a healing step (whose LM head and second model it does not
need), which is what the report and ``bench/quality.py`` count.

Memory: the targets of every position and two running states, on the CPU:
``(positions + 2) * tokens * hidden * 4`` bytes (141 MB for SmolLM2-135M at
2,048 tokens). The whole pruned and source models are in memory, so
``--offload`` refuses it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from prunext.core.plan import Plan
from prunext.errors import UserError

if TYPE_CHECKING:  # kept out of module import so `prunext prune --help` stays fast
    import torch

log = logging.getLogger(__name__)

#: Defaults of ``prune --reconstruct-tokens`` and ``--reconstruct-lr``.
DEFAULT_TOKENS = 8192
DEFAULT_LR = 1e-3


def targets(plan: Plan, flag: str = "--reconstruct-epochs") -> list[int]:
    """For each position of ``plan``, the source block after which its output should match the source model.

    Raises:
        UserError: a plan that is not the source's depth with blocks replaced or dropped (e.g. an extended one).
    """
    sources = [p.source for p in plan.positions]
    if len(sources) == plan.num_source_blocks:
        return list(range(len(sources)))
    if len(sources) < plan.num_source_blocks and all(a < b for a, b in zip(sources, sources[1:])):
        return [nxt - 1 for nxt in sources[1:]] + [plan.num_source_blocks - 1]
    raise UserError(f"{flag} needs a model that keeps or drops the source's blocks in order; "
                    f"this plan reorders or adds blocks, so drop {flag}")  # fmt: skip


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|out - target|^2 / |target|^2 over all tokens but the first of each window (massive activations sit there)."""
    out, target = out[:, 1:].float(), target[:, 1:].float()
    return (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


def _record(model, batches: list[torch.Tensor], keep: set[int] | None, device) -> tuple[list, list]:
    """Run ``model`` on every batch; return, per batch, each layer's call keywords (masks, rotary) and
    the outputs of the layers in ``keep`` (None: the first layer's input instead), on the CPU."""
    import torch

    from prunext.prune.importance import _block_output

    layers = model.model.layers
    calls: list[dict] = []
    states: list[dict] = []

    def pre(i):
        def hook(module, args, kwargs):
            if keep is None and i == 0:
                states[-1][-1] = (args[0] if args else kwargs["hidden_states"]).detach().cpu()
            calls[-1][i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        return hook

    def post(i):
        def hook(module, args, kwargs, out):
            states[-1][i] = _block_output(out).detach().cpu()

        return hook

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    if keep is not None:
        handles += [layers[i].register_forward_hook(post(i), with_kwargs=True) for i in keep]
    try:
        with torch.no_grad():
            for batch in batches:
                calls.append({})
                states.append({})
                model.model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls, states


def reconstruct(model, source, windows: torch.Tensor, epochs: int, lr: float = DEFAULT_LR, batch_size: int = 1,
                device: str | torch.device = "cpu", seed: int = 0, progress: bool = True) -> dict:  # fmt: skip
    """Fit every position's own parameters to the source model's states, position by position (module docstring).

    Args:
        model: the pruned :class:`~prunext.core.model.PrunextForCausalLM`, adapters initialised.
        source: the unpruned model it was pruned from (``source.model.layers``), same device.
        windows: (n, seq_len) calibration token ids.
        epochs: passes over ``windows`` per position (>= 1).
        lr: peak Adam learning rate; it decays to 0 by a cosine over each position's steps.
        batch_size: windows per step (one by default: a few thousand tokens give only a few windows, and
            each position needs steps more than large batches).
        device: where both models are.
        seed: order of the windows within each epoch.
        progress: show a progress bar over positions.

    Returns:
        The report: tokens, epochs, lr, ``token_passes`` (the healing tokens it stands for), seconds, and per
        fitted position its relative error before and after (``{"3": {"before": .., "after": ..}}``).
    """
    import torch
    from tqdm.auto import tqdm

    from prunext.core.model import is_owned
    from prunext.prune.importance import _block_output

    started = time.perf_counter()
    goal = targets(model.plan)
    batches = [windows[s : s + batch_size] for s in range(0, windows.shape[0], batch_size)]
    was_training, grads = model.training, {p: p.requires_grad for p in model.parameters()}
    model.eval()
    source.eval()
    _, wanted = _record(source, batches, set(goal), device)
    calls, first = _record(model, batches, None, device)
    state = [f[-1] for f in first]  # s_0 per batch: (batch, seq, hidden) on the CPU
    generator = torch.Generator().manual_seed(seed)
    errors: dict[str, dict[str, float]] = {}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for pos in tqdm(range(len(goal)), desc="reconstructing positions", disable=not progress):
            layer = model.model.layers[pos]
            own = [param for name, param in layer.named_parameters() if is_owned(name)]

            def run(b: int) -> torch.Tensor:
                return _block_output(layer(state[b].to(device), **calls[b][pos]))

            def error() -> float:
                with torch.no_grad():
                    return sum(relative_error(run(b), wanted[b][goal[pos]].to(device)).item() for b in range(len(batches))) / len(batches)

            if own:
                before = error()
                for param in own:
                    param.requires_grad_(True)
                optimizer = torch.optim.Adam(own, lr=lr)
                steps, step = epochs * len(batches), 0
                for _ in range(epochs):
                    for b in torch.randperm(len(batches), generator=generator).tolist():
                        for group in optimizer.param_groups:
                            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                        loss = relative_error(run(b), wanted[b][goal[pos]].to(device))
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        step += 1
                for param in own:
                    param.requires_grad_(False)
                errors[str(pos)] = {"before": round(before, 6), "after": round(error(), 6)}
            with torch.no_grad():
                state = [run(b).detach().cpu() for b in range(len(batches))]
            for b in range(len(batches)):
                wanted[b].pop(goal[pos], None)  # each target is used by one position
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
        model.train(was_training)
    tokens = int(windows.numel())
    seconds = time.perf_counter() - started
    log.info("reconstructed %d positions on %d tokens x %d epochs in %.0f s", len(errors), tokens, epochs, seconds)
    return {"tokens": tokens, "epochs": epochs, "lr": lr, "token_passes": tokens * (epochs + 1),
            "seconds": round(seconds, 1), "positions": errors}  # fmt: skip
