"""``prune --offload`` holds a fraction of the model: peak resident memory, measured in a process of its own."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Runs prune in-process after every import; the kernel's high-water mark of resident memory is restarted
# first, so the peak is what pruning itself adds to the libraries.
_MEASURE = """
import json, sys
import accelerate, datasets, matplotlib.pyplot, safetensors, torch, transformers
import prunext.cli, prunext.prune.recipe, prunext.prune.offload
from transformers.models.llama import modeling_llama
from prunext.train.metrics import peak_rss_mb, reset_peak_rss, rss_mb
start = rss_mb()
assert reset_peak_rss()
code = prunext.cli.main(sys.argv[1:])
print(json.dumps({"code": code, "growth_mb": peak_rss_mb() - start}))
"""


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory):
    """A random Llama of ~100M parameters (400 MB in fp32) in 8 shards, with a tiny tokenizer, and calibration text."""
    import torch
    from conftest import make_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("offload")
    config = LlamaConfig(vocab_size=128, hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                         num_key_value_heads=3, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model", max_shard_size="50MB")
    make_tiny_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. Wikipedia is a free encyclopedia.\n" * 200)
    return root


def _growth(root: Path, out: Path, *extra: str) -> float:
    """Peak resident bytes a prune run adds, as a ratio to the model's bytes."""
    model_bytes = sum(f.stat().st_size for f in (root / "model").glob("*.safetensors"))
    args = ["prune", "--model", str(root / "model"), "--calib", str(root / "calib.txt"), "--calib-tokens", "1024",
            "--seq-len", "128", "--batch-size", "4", "--ratio", "0.3", "--kept-lora", "0.5", "--importance", "bi", "--out", str(out), *extra]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "PATH": "/usr/bin:/bin", "HOME": str(root)}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    return result["growth_mb"] * 2**20 / model_bytes


@pytest.mark.integration  # ~1 min: builds a 400 MB model and prunes it twice
def test_offload_holds_a_fraction_of_a_sharded_model(sharded_model, tmp_path):
    offloaded = _growth(sharded_model, tmp_path / "off", "--offload")
    loaded = _growth(sharded_model, tmp_path / "mem")
    print(f"\npeak growth / model bytes: --offload {offloaded:.3f}, loaded {loaded:.3f}")
    assert loaded > 0.9  # the measurement sees a whole copy when there is one (1.3-1.5x measured)
    # 0.32-0.39x measured: 80-150 MB do not grow with the model (calibration data, one block mapped while it
    # runs, factorization workspaces, allocator state), so a 1.3 GB model gives 0.25x (BENCHMARKS.md) and a 7B
    # one less; the bound leaves room for that part to vary between machines
    assert offloaded < 0.5 and offloaded < loaded / 2.5
    assert len(list((tmp_path / "off").glob("*.safetensors"))) == 1
