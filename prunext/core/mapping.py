"""State-dict conversions between a plain HF model and the native plan layout.

Pure functions: state dict in, state dict out; an unknown key raises. The one
mapping table is the key grammar below::

    model.embed_tokens.weight, model.norm.weight, lm_head.weight   same in both
    model.layers.<n>.<block tensor>        HF: block n     native: position n
    model.layers.<n>.<linear>.lora_A|B     native only: owned by position n
    model.layers.<n>.(attn|mlp)_out_norm.* native only: owned by position n; in a sandwich or
                                           post-norm family HF's post_attention_layernorm /
                                           post_feedforward_layernorm of block n (gain - offset)

In the native layout a base block's tensors are stored under its *home*
position (the first position that runs it) and nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from prunext.core.families import FAMILIES, GLOBAL_PREFIXES
from prunext.core.model import is_owned, lora_modules
from prunext.core.modules import merge_lora
from prunext.core.plan import Plan, PlanError

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LORA_KEY = re.compile(r"^(.+)\.lora_([AB])$")


def split_layer_key(key: str) -> tuple[int, str] | None:
    """``model.layers.7.mlp.up_proj.weight`` -> ``(7, "mlp.up_proj.weight")``; None for global keys."""
    m = _LAYER_KEY.match(key)
    if m is None:
        if not key.startswith(GLOBAL_PREFIXES):
            raise KeyError(f"unknown tensor '{key}': not an embedding, final norm, lm_head or block tensor")
        return None
    return int(m[1]), m[2]


def stored_keys(plan: Plan, keys: Iterable[str], tie_word_embeddings: bool) -> list[str]:
    """The keys a native checkpoint stores, out of all a built model's state-dict keys.

    Drops every base tensor of a position that is not its block's home, and
    ``lm_head.weight`` when it is tied to the embedding.
    """
    kept = []
    for key in keys:
        if tie_word_embeddings and key == "lm_head.weight":
            continue
        parts = split_layer_key(key)
        if parts is not None:
            pos, rest = parts
            if not is_owned(rest) and plan.home_of(pos) != pos:
                continue
        kept.append(key)
    return kept


def hf_to_plan(hf_state: Mapping[str, torch.Tensor], plan: Plan) -> dict[str, torch.Tensor]:
    """A source model's HF state dict -> the native state dict of ``plan``'s base tensors.

    Blocks no position runs are dropped; each kept block moves to its home
    position's keys. Owned parts (adapters, output norms) are not produced:
    their initialisation is the caller's choice.
    """
    homes = plan.homes
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        parts = split_layer_key(key)
        if parts is None:
            out[key] = tensor
            continue
        block, rest = parts
        if is_owned(rest):
            raise KeyError(f"'{key}' is an adapter tensor; a plain HF model has none")
        if block >= plan.num_source_blocks:
            raise PlanError(f"'{key}' is block {block}, but the plan was made for {plan.num_source_blocks} blocks")
        if block in homes:
            out[f"model.layers.{homes[block]}.{rest}"] = tensor
    return out


def plan_to_hf(native_state: Mapping[str, torch.Tensor], plan: Plan, config=None) -> dict[str, torch.Tensor]:
    """A native state dict -> a dense HF state dict with one block per position.

    Each position gets its own copy of its base block's tensors with its LoRA
    adapters merged in (``W + scale * B @ A``; on a fused linear, each part's into
    its rows). In a sandwich or post-norm family a position's output norms become
    its post-branch norms (their gain minus the family's norm offset).

    Args:
        native_state: the stored tensors (:func:`prunext.core.checkpoint.stored_state_dict`).
        plan: the positions.
        config: the base family's config (fused split sizes, where the output norms go);
            None for Llama's layout.

    Raises:
        PlanError: when the plan has output norms that the base family cannot express.
        KeyError: on a key that is neither global nor a block tensor, or an
            adapter tensor the plan does not explain.
    """
    family = FAMILIES["llama" if config is None else config.model_type]
    if plan.has_out_norm and not family.out_norm_replaces_post_norm:
        raise PlanError(
            "this model has output feature normalization, which a plain HF model of its family cannot express; "
            "keep it in the native format (it loads with AutoModelForCausalLM: trust_remote_code=True, or after `import prunext`)"
        )
    slots = family.slots(config)
    base: dict[int, dict[str, torch.Tensor]] = {}
    lora: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    norms: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in native_state.items():
        parts = split_layer_key(key)
        if parts is None:
            out[key] = tensor
            continue
        pos, rest = parts
        m = _LORA_KEY.match(rest)
        if m:
            lora.setdefault((pos, m[1]), {})[m[2]] = tensor
        elif rest in ("attn_out_norm.weight", "mlp_out_norm.weight") and family.out_norm_replaces_post_norm:
            norms.setdefault(pos, {})[family.post_norm(rest.split("_", 1)[0]) + ".weight"] = tensor
        elif is_owned(rest):
            raise KeyError(f"unexpected owned tensor '{key}'")
        else:
            base.setdefault(pos, {})[rest] = tensor

    adapted = {i: lora_modules(slots, p.lora_targets) for i, p in enumerate(plan.positions)}
    for (pos, path), ab in lora.items():
        if pos >= len(plan) or path not in adapted[pos] or set(ab) != {"A", "B"}:
            raise KeyError(f"adapter tensors at model.layers.{pos}.{path} do not match the plan")
    for pos in norms:
        if pos >= len(plan) or not plan.positions[pos].out_norm:
            raise KeyError(f"output norms at model.layers.{pos} do not match the plan")

    for i, position in enumerate(plan.positions):
        missing = [path for path in adapted[i] if (i, path) not in lora]
        if missing:
            raise KeyError(f"position {i} has LoRA on {missing} in its plan but no adapter tensors for them")
        if position.out_norm and len(norms.get(i, {})) != 2:
            raise KeyError(f"position {i} has output norms in its plan but no tensors for them")
        home = plan.home_of(i)
        if home not in base:
            raise KeyError(f"no base tensors stored for position {home} (block {position.source})")
        for rest, tensor in base[home].items():
            module_path = rest.rsplit(".", 1)[0]
            adapter = lora.get((i, module_path)) if rest.endswith(".weight") else None
            if adapter is not None:
                tensor = merge_lora(tensor, adapter["A"], adapter["B"], position.lora_scale, adapted[i][module_path])
            elif rest in norms.get(i, {}):
                own = norms[i][rest]  # the position's gain, in the family's own convention
                tensor = (own.float() - family.norm_offset).to(own.dtype)
            elif home != i:
                tensor = tensor.clone()  # a dense model owns every tensor
            out[f"model.layers.{i}.{rest}"] = tensor
    return out
