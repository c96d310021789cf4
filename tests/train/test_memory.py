"""Memory per rank falls with the world size: 4 ZeRO-3 ranks load, distil, train and save a model none of them holds whole.

A random Llama large enough that its weights dwarf the noise of the libraries
(hidden 1024, 8 blocks: ~110M parameters, ~440 MB in fp32), pruned to a shared
plan; the teacher is the unpruned model. Each rank records its own resident
memory at each stage of the run (``train_summary.json``). A rank that loaded
a model whole, even for a moment, would grow by at least that model's bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

pytestmark = pytest.mark.integration


def _model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunext.core.checkpoint import build_from_hf, save_native
    from prunext.core.plan import LINEAR_NAMES, Plan, Position

    sys.path.insert(0, str(tiny.TESTS))
    from conftest import make_tiny_tokenizer

    root = tmp_path_factory.mktemp("memory")
    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    tokenizer = make_tiny_tokenizer()
    hf.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    positions = [Position(i) for i in range(8)]
    positions[5] = Position(4, lora_rank=8, lora_targets=LINEAR_NAMES, out_norm=True)  # block 5 replaced by block 4
    save_native(build_from_hf(hf, Plan(tuple(positions), num_source_blocks=8)), root / "student", tokenizer=tokenizer)
    return root / "student", root / "teacher", tiny.write_text(root / "text.txt"), root


# ZeRO-3 keeps up to stage3_max_live_parameters gathered elements alive between uses (DeepSpeed's default,
# 1e9, is more than this whole model, though little next to a 7B one): bound it to about one block here.
BLOCK_SIZED_GATHERS = {"stage3_max_live_parameters": 10**7, "stage3_max_reuse_distance": 10**7, "stage3_prefetch_bucket_size": 10**7}


def test_four_ranks_each_hold_a_fraction_of_student_and_teacher(models):
    student, teacher, text, root = models
    out, config = root / "run", root / "zero3_block_gathers.json"
    zero = {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, **BLOCK_SIZED_GATHERS}
    config.write_text(json.dumps({"zero_optimization": zero}))
    args = tiny.train_args(student, text, out, "--tokens", "512", "--micro-batch", "1", "--loss", "lm+kd",
                           "--teacher", str(teacher), "--deepspeed", str(config))
    # Freed tensors go back to the OS at once (no heap reuse), so resident memory is what a rank holds.
    proc = tiny.run(tiny.torchrun(4, *args), timeout=600, env={**tiny.env(), "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert proc.returncode == 0, tiny.tail(proc)
    student_mb, teacher_mb = _model_bytes(student) / 2**20, _model_bytes(teacher) / 2**20
    memory = json.loads((out / "train_summary.json").read_text())["memory"]
    assert sorted(m["rank"] for m in memory) == [0, 1, 2, 3]
    for m in memory:  # a quarter of each model, plus the run's fixed costs (tokenizer, buffers, gloo): well under one
        stage = m["rss_mb"]
        assert stage["model_loaded"] - stage["start"] < 0.5 * student_mb, m
        assert stage["engines_started"] - stage["start"] < 0.5 * (student_mb + teacher_mb), m
