"""prunext/train/estimate.py: memory per rank from the config alone, and the refusal of a model that cannot fit."""

import json
import sys
import time
from pathlib import Path

import pytest

from prunext.cli import main
from prunext.train.estimate import GIB, Estimate, Sizes, estimate, sizes_of

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


def test_sizes_from_the_config_are_the_loaded_models(tmp_path):
    """Built on the meta device from config.json: the counts of the real model, each shared tensor once."""
    from prunext.core.loading import load_model
    from prunext.core.checkpoint import read_config
    from prunext.train.trainable import wants

    folder = tiny.build_tiny_pruned(tmp_path / "model")
    model, _ = load_model(str(folder))
    sizes = sizes_of(read_config(folder), "replacement")
    assert sizes.total == sum(p.numel() for p in model.parameters())
    assert sizes.trainable == sum(p.numel() for n, p in model.named_parameters() if wants(n, "replacement"))
    assert 0 < sizes.trainable < sizes.total
    assert sizes.largest_module == max([*(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers),
                                        model.get_input_embeddings().weight.numel()])


def test_estimate_follows_the_formula_and_falls_with_the_world_size():
    student, teacher = Sizes(total=1000, trainable=100, largest_module=50), Sizes(total=1200, trainable=0, largest_module=60)
    one = estimate(student, teacher, world=1, ranks_per_node=1, dtype="bfloat16")
    # (1000 + 1200) x 2 working + 100 x 2 grads + 100 x 12 optimizer + 2 x 2 x 60 gathered
    assert one == Estimate(device_per_rank=4400 + 200 + 1200 + 240, host_per_node=0)
    four = estimate(student, teacher, world=4, ranks_per_node=4, dtype="bfloat16")
    assert four.device_per_rank == 4400 // 4 + 200 // 4 + 1200 // 4 + 240
    offloaded = estimate(student, teacher, world=4, ranks_per_node=4, dtype="bfloat16", offload_optimizer=True)
    assert offloaded.device_per_rank == four.device_per_rank - 1200 // 4
    assert offloaded.host_per_node == 1200 // 4 * 4 * 1.5


def test_seven_billion_as_deepspeed_estimates_it():
    """Llama-2-7B trained whole on 8 GPUs in bf16: DeepSpeed's own estimator says 18 bytes a parameter / 8 + one layer."""
    from transformers import AutoConfig

    from prunext.core.config import PrunextConfig
    from prunext.core.plan import Plan

    config = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    sizes = sizes_of(PrunextConfig.from_base(config, Plan.identity(32)), "all")
    assert sizes.total == 6_738_415_616  # Llama-2-7B's published count
    need = estimate(sizes, None, world=8, ranks_per_node=8, dtype="bfloat16").device_per_rank
    deepspeed = 18 * sizes.total / 8 + 4 * sizes.largest_module
    assert need == pytest.approx(deepspeed, rel=0.15)


def test_a_model_that_cannot_fit_is_refused_from_its_config(tmp_path, capsys):
    """A 70B config with no weights at all: refused in one line, before any weight could be read."""
    from transformers import AutoConfig

    big = tmp_path / "llama-70b"
    AutoConfig.for_model("llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=128256).save_pretrained(big)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\n" * 50)
    start = time.perf_counter()
    code = main(["train", "--model", str(big), "--data", str(text), "--out", str(tmp_path / "run"), "--trainable", "all",
                 "--tokens", "1000", "--seq-len", "32", "--deepspeed", str(tiny.CPU_CONFIG)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("prunext train: error: the model will not fit: it needs about ")
    assert "GiB of host memory" in err[0] and "zero3_offload.json" in err[0]
    needed = float(err[0].split("needs about ")[1].split(" GiB")[0])
    assert needed > 70e9 * 16 / GIB  # fp32 weights, grads and Adam of 70B parameters on one rank
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "run").exists()
    assert json.loads((big / "config.json").read_text())["num_hidden_layers"] == 80  # the user's folder untouched
