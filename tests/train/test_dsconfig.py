"""prunext/train/dsconfig.py and the shipped ds_configs/*.json."""

import json
from pathlib import Path

import pytest

from prunext.errors import UserError
from prunext.train import dsconfig

CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero3_cpu.json"])
def test_shipped_config_parses_and_names_its_command(name):
    path = CONFIGS / name
    first = path.read_text().splitlines()[0]
    assert first.startswith("//") and "launch/train.py" in first and f"ds_configs/{name}" in first
    config = dsconfig.load_config(path)
    assert dsconfig.zero_stage(config) == 3
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    resolved = dsconfig.resolve_config(config, 2, 4, None, world_size=8)  # fills without contradiction
    assert resolved["train_batch_size"] == 64
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())  # the comment makes it hjson, which DeepSpeed and prunext read


def test_shipped_configs_are_the_builtin_defaults():
    assert dsconfig.load_config(CONFIGS / "zero3.json") == dsconfig.default_config(on_gpu=True)
    assert dsconfig.load_config(CONFIGS / "zero3_cpu.json") == dsconfig.default_config(on_gpu=False)
    offload = dsconfig.load_config(CONFIGS / "zero3_offload.json")
    assert dsconfig.offloads_optimizer(offload) and offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert dsconfig.config_dtype(offload) == "bfloat16" and dsconfig.config_dtype(dsconfig.ZERO3_CPU) == "float32"


def test_fill_from_cli_and_defaults():
    c = dsconfig.resolve_config({"zero_optimization": {"stage": 3}}, micro_batch=None, grad_accum=3, max_grad_norm=None, world_size=2)
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (1, 3, 6)
    assert c["gradient_clipping"] == 1.0 and c["zero_allow_untested_optimizer"] is True
    auto = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}
    c = dsconfig.resolve_config(auto, 4, None, 0.0, world_size=2)
    assert (c["train_micro_batch_size_per_gpu"], c["train_batch_size"], c["gradient_clipping"]) == (4, 8, 0.0)
    c = dsconfig.resolve_config({"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5}, None, None, None, 1)
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_clipping"]) == (4, 0.5)


@pytest.mark.parametrize(
    ("config", "cli", "message"),
    [
        ({"train_batch_size": 7}, (2, 1, None), "train_batch_size 7 is not"),
        ({"train_micro_batch_size_per_gpu": 8}, (4, None, None), "--micro-batch 4 contradicts"),
        ({"gradient_accumulation_steps": 2}, (None, 3, None), "--grad-accum 3 contradicts"),
        ({"gradient_clipping": 1.0}, (None, None, 0.5), "--max-grad-norm 0.5 contradicts"),
        ({"optimizer": {"type": "AdamW"}}, (None, None, None), "'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, (None, None, None), "'scheduler' section"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, (None, None, None), "both bf16 and fp16"),
        ({"train_micro_batch_size_per_gpu": 0}, (None, None, None), "positive integer"),
    ],
)
def test_contradictions_refused(config, cli, message):
    with pytest.raises(UserError, match=message):
        dsconfig.resolve_config(config, *cli, world_size=2)


@pytest.mark.parametrize("text", ['{"zero_optimization": {', "[1, 2]", '{"a": 1, "a": 2}', "{} }"])
def test_bad_files_refused(tmp_path, text):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(UserError, match="--deepspeed"):
        dsconfig.load_config(path)


def test_missing_file_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        dsconfig.load_config(tmp_path / "nope.json")
