"""Write a model as a plain, dense Hugging Face folder that loads without prunext."""

from __future__ import annotations

from pathlib import Path

import torch

from prunext.core.checkpoint import stored_state_dict, write_safetensors
from prunext.core.mapping import plan_to_hf
from prunext.core.families import FAMILIES, family_of
from prunext.core.model import PrunextForCausalLM
from prunext.core.plan import PlanError


def check_hf_expressible(plan, model_type: str = "llama") -> None:
    """Raise :class:`PlanError` (one line) when the plan cannot be a plain model of its family.

    Output norms can be expressed where they replace the family's post-branch norms (Gemma,
    OLMo-2), not where they are added to a pre-norm block.
    """
    if plan.has_out_norm and not FAMILIES.get(model_type, FAMILIES["llama"]).out_norm_replaces_post_norm:
        positions = [i for i, p in enumerate(plan.positions) if p.out_norm]
        raise PlanError(
            f"--format hf cannot express output feature normalization (positions {positions}); "
            "keep the native format, which loads with AutoModelForCausalLM (trust_remote_code=True, or after `import prunext`)"
        )


def write_dense_hf(model: PrunextForCausalLM, folder: Path, tokenizer=None, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` into ``folder`` as its base family's plain model, one block per position.

    Each position gets its own copy of its base block's tensors with its
    adapters merged in (:func:`prunext.core.mapping.plan_to_hf`).
    """
    plan = model.plan
    check_hf_expressible(plan, model.config.base_model_type)
    config = model.config.base_config()
    state = plan_to_hf(stored_state_dict(model), plan, config)
    if dtype is not None:
        state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    config.architectures = [family_of(config.model_type).causal_lm_class]
    config.dtype = dtype or model.dtype
    config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    write_safetensors(state, folder, max_shard_size="5GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
