"""Build the deepened model for each extend method from an :class:`~prunext.extend.plans.Expansion`.

- ``flexigpt`` (FlexiGPT Sec. 3.4): added positions *reuse* their source
  block's stored weights (one ``nn.Parameter`` each) and own a LoRA adapter
  (B = 0) and output norms (scale small). Only adapters and norms are new
  parameters. The model keeps a non-identity plan.
- ``llama-pro`` (Wu et al. 2024, "LLaMA Pro", Sec. 3.1): added positions are
  independent copies of their source block with ``o_proj`` and ``down_proj``
  zeroed, so each copy adds exactly 0 to the residual stream and the deepened
  model computes the same function at init. A plain dense model.
- ``solar`` (Kim et al. 2023, "SOLAR 10.7B", Sec. 2.1, depth up-scaling):
  independent copies, nothing zeroed. A plain dense model.

The dense methods build an N-block plain state dict and wrap it with the
identity plan, so their output converts back to a plain HF model.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from prunext.core.checkpoint import build_from_hf, stored_state_dict
from prunext.core.mapping import split_layer_key
from prunext.core.model import DEFAULT_OUT_NORM_INIT, PrunextForCausalLM
from prunext.core.families import family_of
from prunext.core.plan import Plan
from prunext.errors import UserError
from prunext.extend.plans import Expansion

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("flexigpt", "llama-pro", "solar")

#: The linears LLaMA Pro zeroes in each copy: the two that write into the residual stream.
ZEROED_LINEARS: tuple[str, ...] = ("o_proj", "down_proj")


def check_plan(plan: Plan) -> None:
    """Refuse a source whose plan is not the identity (already pruned or extended).

    Raises:
        UserError: when the model shares blocks or owns adapters or norms.
    """
    if not plan.is_identity:
        raise UserError(
            "the model already has a pruned or extended plan; extend a plain model "
            "(or a native model with the identity plan), e.g. convert the merged model to HF first"
        )


def _plain_hf(config, state: dict[str, torch.Tensor], generation_config=None) -> nn.Module:
    """A plain HF causal LM of ``config``'s family holding exactly ``state``'s tensors (no copy).

    Raises:
        RuntimeError: when ``state`` does not fit the family layout (a bug, not a user error).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        hf = AutoModelForCausalLM.from_config(config)
    hf.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        hf.lm_head.weight = hf.model.embed_tokens.weight
    if generation_config is not None:
        hf.generation_config = copy.deepcopy(generation_config)
    return hf.eval()


# ------------------------------------------------------------- flexigpt
def build_flexigpt(
    model: PrunextForCausalLM, plan: Plan, out_norm_init: float = DEFAULT_OUT_NORM_INIT
) -> PrunextForCausalLM:
    """The FlexiGPT-extended model: ``plan`` over the source's blocks, sharing their weights.

    Adapters start at LoRA's usual init (A Kaiming-uniform, B = 0; draw from
    torch's global RNG, so seed it for reproducible A) and output norms at
    ``out_norm_init``. With ``out_norm_init = 0`` every added position adds
    exactly 0 to the residual stream and the logits equal the source's.

    Args:
        model: the source, with the identity plan.
        plan: from :func:`prunext.extend.plans.flexigpt_plan`, over the source's blocks.
        out_norm_init: initial scale gamma of the output norms.

    Raises:
        UserError: when the source does not have the identity plan.
    """
    check_plan(model.plan)
    hf = _plain_hf(model.config.base_config(), model.state_dict(), model.generation_config)
    return build_from_hf(hf, plan, out_norm_init=out_norm_init)


# --------------------------------------------------------- dense methods
def dense_state(
    state: dict[str, torch.Tensor], expansion: Expansion, zero_residual_writes: bool, config=None
) -> dict[str, torch.Tensor]:
    """A plain L-block state dict -> a plain N-block one laid out as ``expansion``.

    Original positions keep the source tensors (no copy); added positions get
    clones, with ``o_proj`` and ``down_proj`` (weights and any biases) zeroed
    when ``zero_residual_writes`` (LLaMA Pro).

    ``config`` is the family's config (where ``o_proj`` and ``down_proj`` are); None: Llama's layout.

    Raises:
        KeyError: on a key that is neither global nor a block tensor.
    """
    slots = family_of("llama" if config is None else config.model_type).slots(config)
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = split_layer_key(key)
        if parts is None:
            out[key] = tensor
        else:
            blocks.setdefault(parts[0], {})[parts[1]] = tensor
    zeroed = tuple(slots[name].path + "." for name in ZEROED_LINEARS)  # never fused in a family here
    for pos, (source, is_new) in enumerate(zip(expansion.sources, expansion.new)):
        for rest, tensor in blocks[source].items():
            if is_new:
                tensor = torch.zeros_like(tensor) if zero_residual_writes and rest.startswith(zeroed) else tensor.clone()
            out[f"model.layers.{pos}.{rest}"] = tensor
    return out


def build_dense(model: PrunextForCausalLM, expansion: Expansion, zero_residual_writes: bool) -> PrunextForCausalLM:
    """LLaMA Pro (``zero_residual_writes=True``) or SOLAR: a plain N-block model with independent copies.

    Returns:
        A model with the identity plan over N blocks.

    Raises:
        UserError: when the source does not have the identity plan.
    """
    check_plan(model.plan)
    base = model.config.base_config()
    config = copy.deepcopy(base)
    for key, value in family_of(base.model_type).position_fields(base, expansion.sources).items():
        setattr(config, key, value)  # num_hidden_layers and layer_types together
    state = dense_state(model.state_dict(), expansion, zero_residual_writes, base)
    hf = _plain_hf(config, state, model.generation_config)
    return build_from_hf(hf, Plan.identity(len(expansion)))


def extend_model(
    model: PrunextForCausalLM,
    method: str,
    expansion: Expansion,
    plan: Plan | None = None,
    out_norm_init: float = DEFAULT_OUT_NORM_INIT,
) -> PrunextForCausalLM:
    """Dispatch to the method's builder.

    Args:
        model: the source, with the identity plan.
        method: one of :data:`METHODS`.
        expansion: where the added positions go.
        plan: the FlexiGPT plan (only for ``flexigpt``).
        out_norm_init: initial output-norm scale (only for ``flexigpt``).
    """
    if method == "flexigpt":
        if plan is None:
            raise ValueError("flexigpt needs a plan")
        return build_flexigpt(model, plan, out_norm_init)
    if method == "llama-pro":
        return build_dense(model, expansion, zero_residual_writes=True)
    if method == "solar":
        return build_dense(model, expansion, zero_residual_writes=False)
    raise ValueError(f"unknown extend method {method!r}; expected one of {METHODS}")


# -------------------------------------------------------------- counting
def stored_params(model: PrunextForCausalLM) -> int:
    """Parameters a native checkpoint of ``model`` stores: each shared tensor once."""
    return sum(t.numel() for t in stored_state_dict(model).values())


def executed_params(model: PrunextForCausalLM) -> int:
    """Parameters a dense model running the same positions would hold (shared tensors counted per position)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return sum(t.numel() for t in state.values())
