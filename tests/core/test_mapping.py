import pytest
import torch

from prunext.core.mapping import hf_to_plan, plan_to_hf, split_layer_key, stored_keys
from prunext.core.plan import Plan, PlanError, Position


def test_split_layer_key_and_unknown_keys():
    assert split_layer_key("model.layers.7.mlp.up_proj.weight") == (7, "mlp.up_proj.weight")
    assert split_layer_key("lm_head.weight") is None
    with pytest.raises(KeyError, match="unknown tensor"):
        split_layer_key("model.vision_tower.weight")


def test_hf_to_plan_moves_blocks_home_and_drops_pruned():
    hf = {f"model.layers.{i}.mlp.up_proj.weight": torch.full((2, 2), float(i)) for i in range(4)}
    hf["model.embed_tokens.weight"] = torch.zeros(3, 2)
    plan = Plan((Position(0), Position(3), Position(3)), 4)
    out = hf_to_plan(hf, plan)
    assert set(out) == {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"}
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], hf["model.layers.3.mlp.up_proj.weight"])


def test_plan_to_hf_merges_adapters_per_position():
    plan = Plan((Position(0), Position(0, lora_rank=1, lora_targets=("up_proj",), lora_alpha=2.0)), 1)
    w = torch.arange(6.0).reshape(3, 2)
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0], [-1.0]])
    native = {"model.layers.0.mlp.up_proj.weight": w, "model.layers.1.mlp.up_proj.lora_A": a, "model.layers.1.mlp.up_proj.lora_B": b}
    dense = plan_to_hf(native, plan)
    assert torch.equal(dense["model.layers.0.mlp.up_proj.weight"], w)
    assert torch.equal(dense["model.layers.1.mlp.up_proj.weight"], w + 2.0 * b @ a)
    assert dense["model.layers.0.mlp.up_proj.weight"].data_ptr() != dense["model.layers.1.mlp.up_proj.weight"].data_ptr()


def test_plan_to_hf_refuses_out_norm_and_missing_adapters():
    with pytest.raises(PlanError, match="output feature normalization"):
        plan_to_hf({}, Plan((Position(0, out_norm=True),), 1))
    plan = Plan((Position(0, lora_rank=1, lora_targets=("up_proj",)),), 1)
    with pytest.raises(KeyError, match="no adapter tensors"):
        plan_to_hf({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, plan)
    nan = {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2), "model.layers.0.mlp.up_proj.lora_A": torch.full((1, 2), float("nan")), "model.layers.0.mlp.up_proj.lora_B": torch.ones(2, 1)}
    with pytest.raises(ValueError, match="NaN"):
        plan_to_hf(nan, plan)


def test_stored_keys_drop_reused_and_tied():
    plan = Plan((Position(0), Position(0, lora_rank=1, lora_targets=("q_proj",))), 1)
    keys = ["lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.lora_A"]
    assert stored_keys(plan, keys, tie_word_embeddings=True) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.lora_A"]
