"""The native format: shared tensors stored once, exact round trips, strict loading."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from prunext.core.checkpoint import INDEX_FILE, SINGLE_FILE, build_from_hf, load_native, save_native
from prunext.core.plan import LINEAR_NAMES, Plan, Position
from prunext.errors import ModelError, UserError


def shared_plan() -> Plan:
    return Plan(
        (Position(0), Position(1), Position(1, lora_rank=3, lora_targets=LINEAR_NAMES, out_norm=True), Position(3)),
        num_source_blocks=4,
    )


def perturbed(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "out_norm" in name:
                p.normal_(0, 0.3)
    return model


def stored_keys_in(folder):
    with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_round_trip_is_exact_and_stores_shared_tensors_once(tiny_hf, tmp_path, family):
    model = perturbed(build_from_hf(tiny_hf(family), shared_plan()))
    save_native(model, tmp_path / "m")
    keys = stored_keys_in(tmp_path / "m")
    assert not any(k.startswith("model.layers.2.") and "lora" not in k and "out_norm" not in k for k in keys)
    assert any(k.startswith("model.layers.2.self_attn.q_proj.lora_A") for k in keys)
    assert "lm_head.weight" not in keys  # tied to the embedding
    block_params = {n for n, _ in model.model.layers[1].named_parameters()}
    assert {f"model.layers.1.{n}" for n in block_params} <= keys

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(loaded) is type(model)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert loaded.model.layers[2].self_attn.q_proj.weight is loaded.model.layers[1].self_attn.q_proj.weight
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = torch.randint(0, 128, (2, 9))
    assert torch.equal(loaded(x).logits, model(x).logits)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "prunext" and config["num_hidden_layers"] == 4
    assert Plan.from_dict(config["prunext_plan"]) == shared_plan()


def test_sharded_save_writes_index_and_loads(tiny_hf, tmp_path):
    model = perturbed(build_from_hf(tiny_hf("llama", tie=False), shared_plan()))
    save_native(model, tmp_path / "m", max_shard_size=20_000)
    index = json.loads((tmp_path / "m" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "m" / SINGLE_FILE).exists()
    loaded = load_native(tmp_path / "m")
    x = torch.randint(0, 128, (1, 7))
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_truncated_weights_are_a_one_line_model_error(tiny_hf, tmp_path):
    save_native(build_from_hf(tiny_hf(), shared_plan()), tmp_path / "m")
    f = tmp_path / "m" / SINGLE_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        load_native(tmp_path / "m")


def test_plan_disagreeing_with_weights_is_refused(tiny_hf, tmp_path):
    save_native(build_from_hf(tiny_hf(), shared_plan()), tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["prunext_plan"]["positions"][2]["lora_rank"] = 5  # shapes no longer fit
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="do not fit"):
        load_native(tmp_path / "m")
    config["prunext_plan"]["positions"][2] = {"source": 2}  # block 2 was never stored
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="disagrees with the stored weights"):
        load_native(tmp_path / "m")


def test_save_refuses_to_clobber_unless_overwrite(tiny_hf, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    model = build_from_hf(tiny_hf(), Plan.identity(4))
    with pytest.raises(UserError, match="not empty"):
        save_native(model, out, overwrite=False)
    assert (out / "precious.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no partial folder left behind


def test_native_folder_takes_transformers_loading_arguments(tiny_hf, tmp_path):
    """dtype, device_map, attn_implementation and low_cpu_mem_usage go through transformers' own loading;
    the shared tensors stay one Parameter, and transformers' own save_pretrained writes the same folder."""
    model = perturbed(build_from_hf(tiny_hf("llama", tie=False), shared_plan()))
    save_native(model, tmp_path / "m")
    x = torch.randint(0, 128, (1, 7))
    for kwargs in ({"dtype": torch.float32, "device_map": "cpu", "attn_implementation": "eager"},
                   {"dtype": "auto", "low_cpu_mem_usage": True, "attn_implementation": "sdpa"},
                   {"device_map": "auto"}):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", **kwargs)
        assert loaded.model.layers[2].self_attn.q_proj.weight is loaded.model.layers[1].self_attn.q_proj.weight, kwargs
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-6, msg=str(kwargs))
    eager = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert half.model.layers[2].self_attn.q_proj.lora_A.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "hf-saved")  # transformers' writer: shared tensors are its tied weights
    assert stored_keys_in(tmp_path / "hf-saved") == stored_keys_in(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-saved")
    assert torch.equal(again(x).logits, model(x).logits)
