"""``train --norm-open W --norm-open-factor F``: a schedule that opens the output norms.

A replacement (or new) position's output norms start small (prune's
``--out-norm-init``, 1e-2), so the position first adds little to the residual
stream. The same small scale multiplies the gradient that reaches the
position's adapters, so a short run spends its first steps mostly growing the
scales. This schedule grows every output norm's scale by itself, on top of what
the optimizer learns: a factor that rises linearly from 1 at step 0 to F at step
W, then stays F.

How: before training, each output norm's weight and bias are multiplied by F
and its ``gate`` (a plain float, not a parameter: nothing changes in the
optimizer or the native format) is set to 1/F, so the model computes exactly
what it did; before step t the gate becomes :func:`gate_at` (t), reaching 1 at
step W. From step W on, the stored weights are the model's own: ``final/`` needs
no correction. A checkpoint saved earlier holds the raw weights, and its gate
follows from its step and settings (:func:`checkpoint_gate`; the checkpoint
converter applies it).
"""

from __future__ import annotations

import json
from pathlib import Path


def gate_at(step: int, open_steps: int, factor: float) -> float:
    """The output norms' gate before optimizer step ``step`` (0-based): 1/F at 0, rising linearly to 1 at ``open_steps``."""
    if not open_steps or step >= open_steps:
        return 1.0
    return 1.0 / factor + (1.0 - 1.0 / factor) * step / open_steps


def checkpoint_gate(state_file: Path) -> float:
    """The gate of the model in a checkpoint tag (its ``prunext_state.json``): 1.0 when the run had no schedule."""
    try:
        state = json.loads(Path(state_file).read_text())
        settings = state.get("settings", {})
        return gate_at(int(state["step"]), settings.get("norm_open_steps") or 0, settings.get("norm_open_factor") or 1.0)
    except (OSError, ValueError, KeyError, TypeError):
        return 1.0


def output_norms(model) -> list:
    from prunext.core.modules import OutputNorm

    return [m for m in model.modules() if isinstance(m, OutputNorm)]


def prepare(model, factor: float) -> list:
    """Scale every output norm's weight and bias by ``factor`` and its gate by 1/``factor``; the function is unchanged.

    Call before ``deepspeed.initialize``; the model may already be partitioned (loaded under
    ``deepspeed.zero.Init``). An RMS output norm (sandwich and post-norm families) has no bias.
    Returns the output norms.
    """
    import torch

    from prunext.train.partitioned import modify

    norms = output_norms(model)
    for norm in norms:
        with modify([norm.weight, norm.bias]), torch.no_grad():
            norm.weight.mul_(factor)
            if norm.bias is not None:
                norm.bias.mul_(factor)
        norm.gate = 1.0 / factor
    return norms


def set_gate(norms: list, value: float) -> None:
    for norm in norms:
        norm.gate = value
