"""prunext/train/trainable.py: what --trainable trains, and the counts MFU uses."""

import sys
from pathlib import Path

import pytest

from prunext.core.checkpoint import build_from_hf
from prunext.core.plan import Plan
from prunext.errors import UserError
from prunext.train.trainable import check_plan, executed_params, freeze, wants

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_plan  # noqa: E402


@pytest.mark.parametrize(
    ("name", "replacement", "adapters"),
    [
        ("model.layers.2.self_attn.q_proj.lora_A", True, True),
        ("model.layers.2.mlp.down_proj.lora_B", True, True),
        ("model.layers.2.attn_out_norm.weight", True, False),
        ("model.layers.2.mlp_out_norm.bias", True, False),
        ("model.layers.2.self_attn.q_proj.weight", False, False),
        ("model.layers.1.input_layernorm.weight", False, False),
        ("model.embed_tokens.weight", False, False),
    ],
)
def test_wants(name, replacement, adapters):
    assert wants(name, "replacement") is replacement
    assert wants(name, "adapters") is adapters
    assert wants(name, "all") is True


def test_freeze_counts_shared_tensors_once(tiny_hf):
    model = build_from_hf(tiny_hf(layers=4), tiny_plan())
    trainable, total = freeze(model, "replacement")
    owned = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert owned and all(".lora_" in n or "_out_norm." in n for n in owned)
    assert trainable == sum(p.numel() for p in owned.values())
    assert total == sum(p.numel() for p in model.parameters())  # deduplicated
    shared = model.model.layers[2].self_attn.q_proj.weight
    assert shared is model.model.layers[1].self_attn.q_proj.weight and not shared.requires_grad
    trainable_all, _ = freeze(model, "all")
    assert trainable_all == total and shared.requires_grad


def test_executed_params_count_each_position(tiny_hf):
    model = build_from_hf(tiny_hf(layers=4), tiny_plan())
    block = sum(p.numel() for n, p in model.model.layers[0].named_parameters())
    extra = sum(p.numel() for n, p in model.model.layers[2].named_parameters() if ".lora_" in n or "_out_norm." in n)
    head = model.lm_head.weight.numel()
    assert executed_params(model) == 4 * block + extra + model.model.norm.weight.numel() + head


def test_check_plan(tmp_path):
    check_plan(tiny_plan(), "replacement")
    check_plan(None, "all")
    with pytest.raises(UserError, match="nothing to train: the model has no adapters or output norms; use --trainable all"):
        check_plan(None, "replacement")
    with pytest.raises(UserError, match="no LoRA adapters"):
        check_plan(Plan.identity(3), "adapters")


def test_read_plan_reads_config_only(tmp_path, tiny_hf):
    from prunext.core.checkpoint import read_plan, save_native

    save_native(build_from_hf(tiny_hf(layers=4), tiny_plan()), tmp_path / "m")
    assert read_plan(tmp_path / "m") == tiny_plan()
    tiny_hf(layers=2).save_pretrained(tmp_path / "hf")
    assert read_plan(tmp_path / "hf") is None
