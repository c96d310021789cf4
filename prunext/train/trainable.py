"""What ``--trainable`` trains, decided before DeepSpeed sees the model.

- ``replacement``: what prune/extend added to the positions, the LoRA adapters
  and the output norms (FlexiGPT heals only these by default; docs/method.md prune path 6);
  :func:`prunext.core.model.is_owned` is the one place that says which they are.
- ``adapters``: only ``lora_A``/``lora_B``.
- ``all``: every parameter, shared base blocks included (a shared tensor gets
  one gradient: the sum over the positions that run it).

Freezing happens with ``requires_grad=False`` before ``deepspeed.initialize``,
so ZeRO-3 builds optimizer partitions for the trainable tensors only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunext.core.plan import Plan
from prunext.errors import UserError

if TYPE_CHECKING:  # kept out of module import so `prunext --help` stays fast
    from torch import nn

TRAINABLE = ("replacement", "adapters", "all")
#: Optimizer parameter groups, each with its own learning rate and warm-up (``--norm-lr``, ``--adapter-lr``).
GROUPS = ("norms", "adapters", "base")


def wants(name: str, mode: str) -> bool:
    """Whether parameter ``name`` trains under ``--trainable mode``."""
    from prunext.core.model import is_owned

    if mode == "all":
        return True
    if mode == "replacement":
        return is_owned(name)
    if mode == "adapters":
        return is_owned(name) and name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")
    raise ValueError(f"unknown --trainable {mode!r}")


def group_of(name: str) -> str:
    """The optimizer group of parameter ``name``: ``norms`` (output norms), ``adapters`` (LoRA) or ``base``."""
    from prunext.core.model import is_owned

    if not is_owned(name):
        return "base"
    return "adapters" if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") else "norms"


def param_groups(model: nn.Module) -> dict[str, list]:
    """The trainable parameters split into :data:`GROUPS` (empty groups left out), each shared tensor once."""
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(group_of(name), []).append(param)
    return {g: groups[g] for g in GROUPS if g in groups}


def check_plan(plan: Plan | None, mode: str) -> None:
    """Refuse a mode that would train nothing (``plan`` None = a plain model: the identity plan).

    Raises:
        UserError: ``replacement`` with no adapters or output norms, ``adapters`` with no adapters.
    """
    has_lora = plan is not None and any(p.has_lora for p in plan.positions)
    has_norm = plan is not None and any(p.out_norm for p in plan.positions)
    if mode == "replacement" and not (has_lora or has_norm):
        raise UserError("nothing to train: the model has no adapters or output norms; use --trainable all")
    if mode == "adapters" and not has_lora:
        raise UserError("nothing to train: the model has no LoRA adapters; use --trainable replacement or all")


def freeze(model: nn.Module, mode: str) -> tuple[int, int]:
    """Set ``requires_grad`` by ``mode``; return (trainable, total) stored parameter counts.

    Raises:
        UserError: no parameter is left trainable.
    """
    from prunext.train.partitioned import numel

    trainable = total = 0
    for name, param in model.named_parameters():  # each shared Parameter once
        param.requires_grad_(wants(name, mode))
        total += numel(param)  # the whole tensor's count, also when ZeRO-3 has partitioned it
        trainable += numel(param) if param.requires_grad else 0
    if trainable == 0:
        raise UserError(f"nothing to train with --trainable {mode}; use --trainable all")
    return trainable, total


def executed_params(model: nn.Module) -> int:
    """Parameters the forward pass multiplies with, counting a shared block once per position.

    The embedding lookup is not a matmul; a tied ``lm_head`` is (counted once).
    Used for the 6 * N * tokens model-FLOPs estimate.
    """
    from prunext.train.partitioned import numel

    total = sum(numel(p) for _, p in model.named_parameters(remove_duplicate=False))
    embed = model.get_input_embeddings().weight
    return total - numel(embed)
