"""The block graph: identity equals HF, sharing is one Parameter, the KV cache works per position."""

import pytest
import torch

from prunext.core.families import FAMILIES as REGISTRY
from prunext.core.checkpoint import build_from_hf, stored_state_dict
from prunext.core.model import PrunextForCausalLM
from prunext.core.modules import LoRALinear, OutputNorm
from prunext.core.plan import LINEAR_NAMES, Plan, Position

FAMILIES = tuple(REGISTRY)


def _linear(model, layer, name: str):
    """The module holding logical linear ``name`` (Phi-3: the fused one) in a position."""
    config = model.config.base_config()
    return layer.get_submodule(REGISTRY[config.model_type].slots(config)[name].path)


def shared_plan(out_norm: bool = True) -> Plan:
    """Five positions over a 4-block model: block 1 and 3 run twice, block 2 pruned."""
    return Plan(
        (
            Position(0),
            Position(1),
            Position(1, lora_rank=3, lora_targets=LINEAR_NAMES, out_norm=out_norm),
            Position(3),
            Position(3, lora_rank=2, lora_targets=("q_proj", "down_proj")),
        ),
        num_source_blocks=4,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_plan_logits_equal_hf(tiny_hf, family):
    hf = tiny_hf(family)
    model = build_from_hf(hf, Plan.identity(4))
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x).logits, hf(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_repeated_sources_share_one_parameter(tiny_hf, family):
    model = build_from_hf(tiny_hf(family), shared_plan())
    layers = model.model.layers
    for home, reuse in ((1, 2), (3, 4)):
        for name, p in layers[home].named_parameters():
            q = layers[reuse].get_parameter(name)
            assert q is p and q.data_ptr() == p.data_ptr(), name
    # every position has its own attention module and layer_idx for the KV cache
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3, 4]
    assert layers[2].self_attn is not layers[1].self_attn
    # owned parts exist only where the plan says
    assert isinstance(_linear(model, layers[2], "q_proj"), LoRALinear) and isinstance(layers[2].mlp_out_norm, OutputNorm)
    assert not isinstance(_linear(model, layers[1], "q_proj"), LoRALinear) and layers[1].attn_out_norm is None
    assert isinstance(_linear(model, layers[4], "down_proj"), LoRALinear) and not isinstance(_linear(model, layers[4], "up_proj"), LoRALinear)
    # a unique-parameter count: the shared blocks count once
    unique = {p.data_ptr() for p in model.parameters()}
    assert len(unique) == len(list(model.parameters()))  # nn.Module.parameters() already dedupes
    assert len(stored_state_dict(model)) < len(model.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_generation_equals_uncached(tiny_hf, family):
    model = build_from_hf(tiny_hf(family), shared_plan())
    with torch.no_grad():  # give the adapters and norms a visible effect
        for name, p in model.named_parameters():
            if "lora_B" in name or "out_norm" in name:
                p.normal_(0, 0.5)
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == 16


def test_gradient_of_shared_weight_is_sum_over_positions(tiny_hf):
    """A shared block's gradient equals the sum of the gradients its positions would get as separate copies."""
    import copy

    from torch import nn

    hf = tiny_hf("llama")
    model = build_from_hf(hf, shared_plan(out_norm=False)).train()
    # the same network with untied copies: blocks 0, 1, 1', 3, 3' (adapters start at B = 0, so they add nothing)
    untied = copy.deepcopy(hf).train()
    layers = [untied.model.layers[i] for i in (0, 1)] + [copy.deepcopy(untied.model.layers[1])]
    layers += [untied.model.layers[3], copy.deepcopy(untied.model.layers[3])]
    for idx, layer in enumerate(layers):
        layer.self_attn.layer_idx = idx
    untied.model.layers = nn.ModuleList(layers)
    untied.config.num_hidden_layers = 5
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    loss = model(x, labels=x).loss
    reference = untied(x, labels=x).loss
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
    loss.backward()
    reference.backward()
    for home, reuse in ((1, 2), (3, 4)):
        for name in ("mlp.up_proj.weight", "self_attn.q_proj.weight", "input_layernorm.weight"):
            shared = model.model.layers[home].get_parameter(name)
            assert model.model.layers[reuse].get_parameter(name) is shared  # one Parameter, one .grad
            expected = untied.model.layers[home].get_parameter(name).grad + untied.model.layers[reuse].get_parameter(name).grad
            torch.testing.assert_close(shared.grad, expected, rtol=1e-5, atol=1e-7, msg=name)
            # and each position really contributes: neither copy's gradient alone is the sum
            assert not torch.allclose(shared.grad, untied.model.layers[home].get_parameter(name).grad, rtol=1e-3, atol=0)


def test_output_hidden_states_cover_every_position(tiny_hf):
    model = build_from_hf(tiny_hf("llama"), shared_plan())
    out = model(torch.randint(0, 128, (1, 5)), output_hidden_states=True)
    assert len(out.hidden_states) == len(model.plan) + 1


def test_random_init_model_from_config_shares(tiny_hf):
    config = build_from_hf(tiny_hf("qwen2"), shared_plan()).config
    fresh = PrunextForCausalLM(config)
    assert fresh.model.layers[2].self_attn.q_proj.weight is fresh.model.layers[1].self_attn.q_proj.weight
    assert torch.all(fresh.model.layers[2].self_attn.q_proj.lora_B == 0)
    assert torch.all(fresh.model.layers[2].attn_out_norm.weight == fresh.model.layers[2].attn_out_norm.init_scale)


def test_build_from_an_identity_native_model_equals_build_from_hf(tiny_hf):
    hf = tiny_hf("mistral")
    native = build_from_hf(hf, Plan.identity(4))
    from_native = build_from_hf(native, shared_plan(out_norm=False))
    from_hf = build_from_hf(hf, shared_plan(out_norm=False))
    x = torch.randint(0, 128, (1, 7))
    assert torch.equal(from_native(x).logits, from_hf(x).logits)
    with pytest.raises(Exception, match="not over another plan"):
        build_from_hf(from_hf, Plan.identity(5))
