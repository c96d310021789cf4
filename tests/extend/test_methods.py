"""The extend methods on tiny models of each family: function at init, sharing, stored parameters, generation."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from prunext.core.families import FAMILIES as REGISTRY
from prunext.core.checkpoint import build_from_hf, load_native, save_native
from prunext.core.model import is_owned
from prunext.core.modules import LoRALinear
from prunext.core.plan import LINEAR_NAMES, Plan
from prunext.errors import UserError
from prunext.extend import methods, plans

FAMILIES = tuple(REGISTRY)


def _source(tiny_hf, family: str, layers: int = 4):
    hf = tiny_hf(family=family, layers=layers)
    return hf, build_from_hf(hf, Plan.identity(layers))


def _ids(seed: int = 1, batch: int = 2, seq: int = 12) -> torch.LongTensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _linear(model, pos: int, name: str):
    """The module holding logical linear ``name`` at a position (Phi-3: the fused one)."""
    config = model.config.base_config() if hasattr(model.config, "base_config") else model.config
    return model.model.layers[pos].get_submodule(REGISTRY[config.model_type].slots(config)[name].path)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_flexigpt_with_zero_norm_scale_leaves_logits_unchanged(tiny_hf, family):
    hf, source = _source(tiny_hf, family)
    plan = plans.flexigpt_plan(plans.block_expansion(4, 7, (1, 2, 2)), 4, LINEAR_NAMES, out_norm=True)
    model = methods.build_flexigpt(source, plan, out_norm_init=0.0)
    ids = _ids()
    # B = 0 and gamma = 0: every added position adds exactly 0 to the residual stream
    assert all(torch.count_nonzero(m.lora_B) == 0 for m in model.modules() if isinstance(m, LoRALinear))
    assert torch.equal(model(ids).logits, hf(ids).logits)


@torch.no_grad()
def test_flexigpt_norm_scale_controls_how_far_logits_move(tiny_hf):
    hf, source = _source(tiny_hf, "llama")
    plan = plans.flexigpt_plan(plans.block_expansion(4, 6, (1, 2)), 2, LINEAR_NAMES, out_norm=True)
    ids = _ids()
    ref = hf(ids).logits
    moved = {g: (methods.build_flexigpt(source, plan, g)(ids).logits - ref).norm() for g in (1e-2, 1e-3)}
    assert moved[1e-2] > 0  # the added positions are in the forward path
    # each added branch contributes gamma * LayerNorm(branch): about linear in gamma near 0
    assert moved[1e-3] < 0.2 * moved[1e-2]


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_pro_leaves_logits_unchanged_with_independent_copies(tiny_hf, family):
    hf, source = _source(tiny_hf, family)
    expansion = plans.block_expansion(4, 6, (1, 3))
    model = methods.build_dense(source, expansion, zero_residual_writes=True)
    ids = _ids()
    assert torch.equal(model(ids).logits, hf(ids).logits)
    assert model.plan == Plan.identity(6)
    copy, original = 2, 1  # position 2 is the copy of block 1
    for name in LINEAR_NAMES:
        w_copy, w_orig = _linear(model, copy, name).weight, _linear(model, original, name).weight
        assert w_copy.data_ptr() != w_orig.data_ptr()
        if name in ("o_proj", "down_proj"):
            assert torch.count_nonzero(w_copy) == 0
        else:
            assert torch.equal(w_copy, w_orig)
    # the first occurrence still holds the source block's weights
    assert torch.equal(_linear(model, original, "o_proj").weight, hf.model.layers[1].self_attn.o_proj.weight)


def test_llama_pro_zeroes_residual_biases_too():
    state = {
        "model.embed_tokens.weight": torch.ones(8, 2),
        "model.layers.0.self_attn.o_proj.weight": torch.ones(2, 2),
        "model.layers.0.self_attn.o_proj.bias": torch.ones(2),
        "model.layers.0.self_attn.q_proj.bias": torch.ones(2),
        "model.layers.0.mlp.down_proj.bias": torch.ones(2),
    }
    out = methods.dense_state(state, plans.block_expansion(1, 2, (0,)), zero_residual_writes=True)
    assert torch.count_nonzero(out["model.layers.1.self_attn.o_proj.bias"]) == 0
    assert torch.count_nonzero(out["model.layers.1.mlp.down_proj.bias"]) == 0
    assert torch.equal(out["model.layers.1.self_attn.q_proj.bias"], torch.ones(2))
    assert out["model.layers.0.self_attn.o_proj.bias"] is state["model.layers.0.self_attn.o_proj.bias"]
    assert torch.equal(out["model.layers.0.self_attn.o_proj.bias"], torch.ones(2))


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_solar_stacks_two_trimmed_copies(tiny_hf, family):
    hf, source = _source(tiny_hf, family, layers=4)
    expansion = plans.solar_expansion(4, 6)  # m = 1: blocks 0 1 2 | 1 2 3
    model = methods.build_dense(source, expansion, zero_residual_writes=False)
    assert model.plan == Plan.identity(6)
    assert model.config.num_hidden_layers == 6
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 6
    for pos, block in enumerate((0, 1, 2, 1, 2, 3)):
        for name in LINEAR_NAMES:
            assert torch.equal(_linear(model, pos, name).weight, _linear(hf, block, name).weight)
    assert _linear(model, 3, "q_proj").weight.data_ptr() != _linear(model, 1, "q_proj").weight.data_ptr()
    # a deeper function, not the same one
    ids = _ids()
    assert not torch.allclose(model(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_flexigpt_shares_base_weights_and_owns_only_adapters_and_norms(tiny_hf, family):
    hf, source = _source(tiny_hf, family)
    plan = plans.flexigpt_plan(plans.block_expansion(4, 6, (1, 1)), 2, LINEAR_NAMES, out_norm=True)
    model = methods.build_flexigpt(source, plan)
    for pos in (2, 3):  # the two repeats of block 1
        for name in LINEAR_NAMES:
            assert _linear(model, pos, name).weight is _linear(model, 1, name).weight
            assert isinstance(_linear(model, pos, name), LoRALinear)
        assert model.model.layers[pos].attn_out_norm is not None
    # the first occurrence keeps no extra parts
    assert not isinstance(_linear(model, 1, "q_proj"), LoRALinear)
    assert model.model.layers[1].attn_out_norm is None


@pytest.mark.parametrize("family", FAMILIES)
def test_flexigpt_saved_file_stores_base_once_plus_adapters_and_norms(tiny_hf, tmp_path, family):
    hf, source = _source(tiny_hf, family)
    rank, new_positions = 3, 3
    plan = plans.flexigpt_plan(plans.block_expansion(4, 7, (0, 2, 2)), rank, LINEAR_NAMES, out_norm=True)
    save_native(methods.build_flexigpt(source, plan), tmp_path / "m")

    owned = base = 0
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            n = f.get_slice(key).get_shape()
            numel = int(torch.tensor(n).prod())
            if is_owned(key):
                owned += numel
            else:
                base += numel
    assert base == sum(p.numel() for p in hf.parameters())  # parameters() counts the tied embedding once

    cfg = hf.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_out, kv_out = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    shapes = {  # (in, out) of each linear
        "q_proj": (cfg.hidden_size, q_out),
        "k_proj": (cfg.hidden_size, kv_out),
        "v_proj": (cfg.hidden_size, kv_out),
        "o_proj": (q_out, cfg.hidden_size),
        "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }
    lora = sum(rank * (i + o) for i, o in shapes.values())  # A (rank, in) + B (out, rank)
    # two LayerNorms (weight and bias) on a pre-norm block, two RMSNorm gains where they replace the post-norms
    norms = (2 if REGISTRY[cfg.model_type].out_norm_kind == "layernorm" else 1) * 2 * cfg.hidden_size
    assert owned == new_positions * (lora + norms)
    assert methods.stored_params(load_native(tmp_path / "m")) == base + owned


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", methods.METHODS)
def test_cached_greedy_generation_equals_uncached(tiny_hf, tmp_path, family, method):
    hf, source = _source(tiny_hf, family)
    if method == "solar":
        expansion, plan = plans.solar_expansion(4, 6), None
    else:
        expansion = plans.span_expansion(4, 6, (1, 3))
        plan = plans.flexigpt_plan(expansion, 2, LINEAR_NAMES, out_norm=True) if method == "flexigpt" else None
    model = methods.extend_model(source, method, expansion, plan, out_norm_init=0.5)
    for m in model.modules():  # as after training: adapters and copies that really act
        if isinstance(m, LoRALinear):
            m.lora_B.normal_(0, 0.2)
    if method == "llama-pro":
        for pos in expansion.new_positions:
            _linear(model, pos, "o_proj").weight.normal_(0, 0.2)
    save_native(model, tmp_path / "m")
    model = load_native(tmp_path / "m")

    prompt = _ids(seed=3, batch=1, seq=6)
    kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, 16)
    assert torch.equal(cached, uncached)


def test_sources_with_a_non_identity_plan_are_refused(tiny_hf):
    hf, source = _source(tiny_hf, "llama")
    plan = plans.flexigpt_plan(plans.block_expansion(4, 5, (1,)), 2, LINEAR_NAMES, out_norm=True)
    extended = methods.build_flexigpt(source, plan)
    with pytest.raises(UserError, match="already has a pruned or extended plan"):
        methods.build_flexigpt(extended, plan)
    with pytest.raises(UserError, match="already has a pruned or extended plan"):
        methods.build_dense(extended, plans.block_expansion(5, 6, (1,)), zero_residual_writes=True)


def test_executed_params_count_shared_blocks_per_position(tiny_hf):
    hf, source = _source(tiny_hf, "llama")
    plan = plans.flexigpt_plan(plans.block_expansion(4, 5, (1,)), 0, LINEAR_NAMES, out_norm=False)
    model = methods.build_flexigpt(source, plan)
    block = sum(p.numel() for p in hf.model.layers[1].parameters())
    assert methods.stored_params(model) == methods.stored_params(source)
    assert methods.executed_params(model) == methods.stored_params(source) + block
