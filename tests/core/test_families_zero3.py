"""A 2-rank DeepSpeed ZeRO-3 training run (torchrun, gloo, CPU) for a sandwich-norm and a fused family.

Gemma-2 (its own post-branch norms at the replacement, softcapped logits) and
Phi-3 (adapters on the parts of ``qkv_proj`` and ``gate_up_proj``): the run
finishes, only adapters and output norms move, and ``final/`` keeps the sharing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import prunext  # noqa: F401  (registers the native format with AutoModelForCausalLM)
from prunext.core.model import is_owned
from prunext.train.metrics import read_metrics

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "train"))
import tiny  # noqa: E402

pytestmark = pytest.mark.integration


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_two_rank_zero3_trains_only_the_replacement(tmp_path, tiny_hf, tiny_tokenizer, family):
    from transformers import AutoModelForCausalLM

    from prunext.core.checkpoint import build_from_hf, save_native

    torch.manual_seed(0)
    model = build_from_hf(tiny_hf(family, window=8), tiny.tiny_plan(), out_norm_init=0.1)
    with torch.no_grad():  # a nonzero adapter start, so A and B both get gradients from step 1
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    save_native(model, tmp_path / "model", tokenizer=tiny_tokenizer)
    text = tiny.write_text(tmp_path / "text.txt", chars=3000)
    out = tmp_path / "run"
    args = tiny.train_args(tmp_path / "model", text, out, "--tokens", "384", "--lr", "5e-2",
                           "--trainable", "replacement", "--loss", "lm")  # fmt: skip
    proc = tiny.run(tiny.torchrun(2, *args), timeout=300)
    assert proc.returncode == 0, tiny.tail(proc)

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    before, after = _stored(tmp_path / "model"), _stored(out / "final")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    owned = {k for k in before if is_owned(k)}
    assert owned and changed == owned
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    layers = final.model.layers
    assert layers[2].self_attn.o_proj.weight is layers[1].self_attn.o_proj.weight
    assert torch.isfinite(final(torch.randint(3, 128, (1, 12))).logits).all()
