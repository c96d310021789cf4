"""native -> plain HF: equal logits in a fresh process that never imports prunext."""

import json
import subprocess
import sys

import pytest
import torch

from prunext.cli import main
from prunext.core.checkpoint import build_from_hf, save_native
from prunext.core.plan import LINEAR_NAMES, Plan, Position

FRESH_PROCESS = """
import sys, json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
assert not any(m.startswith("prunext") for m in sys.modules), "prunext was imported"
x = torch.tensor(json.loads(sys.argv[2]))
torch.save({"logits": model(x).logits, "cls": type(model).__name__, "layers": len(model.model.layers)}, sys.argv[3])
"""


def adapted_plan() -> Plan:
    return Plan(
        (Position(0), Position(1), Position(1, lora_rank=3, lora_targets=LINEAR_NAMES), Position(3), Position(0, lora_rank=2, lora_targets=("v_proj",), lora_alpha=4.0)),
        num_source_blocks=4,
    )


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_native_to_hf_equal_logits_without_prunext(tiny_hf, tmp_path, family):
    model = build_from_hf(tiny_hf(family), adapted_plan())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    save_native(model, tmp_path / "native")
    assert main(["convert", "--from", str(tmp_path / "native"), "--to", str(tmp_path / "hf"), "--format", "hf"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == family and config["num_hidden_layers"] == 5

    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    result = tmp_path / "out.pt"
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "hf"), json.dumps(x.tolist()), str(result)], check=True, timeout=300)
    fresh = torch.load(result)
    assert fresh["layers"] == 5 and fresh["cls"].endswith("ForCausalLM")
    torch.testing.assert_close(fresh["logits"], model(x).logits, rtol=1e-5, atol=1e-5)


def test_out_norm_plan_is_refused_and_nothing_is_written(tiny_hf, tmp_path, capsys):
    plan = Plan((Position(0), Position(0, lora_rank=2, lora_targets=LINEAR_NAMES, out_norm=True)), 4)
    plan = Plan(plan.positions + (Position(2),), 4)
    save_native(build_from_hf(tiny_hf(), plan), tmp_path / "native")
    code = main(["convert", "--from", str(tmp_path / "native"), "--to", str(tmp_path / "hf"), "--format", "hf"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "output feature normalization" in err
    assert not (tmp_path / "hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]


def test_convert_native_round_trip_via_cli(tiny_hf, tiny_tokenizer, tmp_path):
    tiny_hf("qwen2").save_pretrained(tmp_path / "plain")
    tiny_tokenizer.save_pretrained(tmp_path / "plain")
    assert main(["convert", "--from", str(tmp_path / "plain"), "--to", str(tmp_path / "native")]) == 0
    from transformers import AutoModelForCausalLM

    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    x = torch.randint(0, 128, (1, 8))
    assert torch.equal(native(x).logits, plain(x).logits)
    assert native.plan.is_identity
