"""Block importance: one-pass hook sums equal direct computations; offloaded, batched and 2-rank runs agree."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunext.core.checkpoint import build_from_hf, load_native, save_native
from prunext.core.plan import LINEAR_NAMES, Plan, Position
from prunext.prune.importance import METRICS, BlockScores, score_blocks, score_blocks_offloaded

CASES = (("bi", 1), ("angular", 1), ("angular", 2), ("streamline", 1), ("streamline", 2))


def calibration_windows(n: int = 7, seq: int = 16) -> torch.LongTensor:
    """An odd number of windows, so batches and rank shards are uneven."""
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(3))


def reuse_plan(block: int) -> Plan:
    """Four positions over 4 blocks: ``block`` runs twice (the second time with LoRA and output norms)."""
    adapted = Position(block, lora_rank=2, lora_targets=LINEAR_NAMES, out_norm=True)
    kept = [b for b in range(4) if b != block]
    return Plan((Position(kept[0]), Position(block), adapted, Position(kept[-1])), 4)


def f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def block_states(model, windows) -> list[torch.Tensor]:
    """x_0 .. x_L from HF's own ``output_hidden_states``, with x_L taken before the final norm.

    transformers 5 returns L+1 hidden states: ``[0]`` is the embedding output
    and ``[i]`` (i < L) the input of block i, but ``[L]`` is overwritten with
    ``last_hidden_state``, i.e. AFTER the final norm (``capture_outputs``'
    ``tie_last_hidden_states``). Swapping the final norm for an identity makes
    ``[L]`` the last block's raw output; the asserts pin that behaviour down.
    """
    with torch.no_grad():
        normed = model(windows, output_hidden_states=True).hidden_states
        final_norm = model.model.norm
        model.model.norm = nn.Identity()
        try:
            raw = model(windows, output_hidden_states=True).hidden_states
        finally:
            model.model.norm = final_norm
        L = len(model.model.layers)
        assert len(raw) == L + 1
        for i in range(L):
            torch.testing.assert_close(raw[i], normed[i], rtol=0, atol=0)
        torch.testing.assert_close(normed[L], final_norm(raw[L]), rtol=0, atol=0)
        assert not torch.allclose(normed[L], raw[L], atol=1e-3)
    return [h.double() for h in raw]


def direct_scores(states: list[torch.Tensor], metric: str, n: int) -> list[float]:
    """The metric's definition, straight from all hidden states at once, in float64."""
    L = len(states) - 1
    out = []
    for s in range(L - n + 1):
        cos = F.cosine_similarity(states[s], states[s + n], dim=-1)  # (n_windows, seq)
        if metric == "bi":
            out.append(1 - cos.mean().item())
        elif metric == "angular":
            out.append((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item())
        else:
            out.append(cos.mean().item())
    return out


@pytest.mark.parametrize(("metric", "n"), CASES)
def test_one_pass_scores_equal_direct_computation(tiny_hf, metric, n):
    model = tiny_hf("llama", layers=4)
    windows = calibration_windows()
    got = score_blocks(model, windows, metric, n, batch_size=3, progress=False)
    want = direct_scores(block_states(model, windows), metric, n)
    assert (got.metric, got.window, got.tokens) == (metric, n, windows.numel())
    assert len(got.scores) == 4 - n + 1
    torch.testing.assert_close(f64(got.scores), f64(want), rtol=0, atol=1e-6)


def test_scores_are_per_position_for_a_shared_block_model(tiny_hf):
    """A PrunextForCausalLM with a non-identity plan is scored position by position."""
    model = build_from_hf(tiny_hf("qwen2"), reuse_plan(1))
    windows = calibration_windows()
    got = score_blocks(model, windows, "bi", progress=False)
    torch.testing.assert_close(
        f64(got.scores), f64(direct_scores(block_states(model, windows), "bi", 1)), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(("metric", "n"), (("bi", 1), ("angular", 2), ("streamline", 3)))
def test_batch_size_does_not_change_scores(tiny_hf, metric, n):
    model = tiny_hf("mistral", layers=4)
    windows = calibration_windows()
    one = score_blocks(model, windows, metric, n, batch_size=1, progress=False)
    four = score_blocks(model, windows, metric, n, batch_size=4, progress=False)
    assert one.tokens == four.tokens == windows.numel()
    torch.testing.assert_close(f64(one.scores), f64(four.scores), rtol=0, atol=1e-6)


def test_scoring_leaves_the_model_as_it_was(tiny_hf):
    model = tiny_hf("llama").train()
    x = calibration_windows(2)
    with torch.no_grad():
        before = model(x).logits
    score_blocks(model, x, "bi", progress=False)
    assert model.training
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)


def _assert_same(a: BlockScores, b: BlockScores, atol: float) -> None:
    assert (a.metric, a.window, a.tokens) == (b.metric, b.window, b.tokens)
    torch.testing.assert_close(f64(a.scores), f64(b.scores), rtol=0, atol=atol)


@pytest.mark.parametrize("family", ("llama", "mistral", "qwen2"))
def test_offloaded_equals_in_memory(tiny_hf, tmp_path, family):
    model = tiny_hf(family, layers=4)
    model.save_pretrained(tmp_path, max_shard_size="40KB")  # sharded: exercises the index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    windows = calibration_windows()
    for metric, n in (("bi", 1), ("angular", 2), ("streamline", 3)):
        _assert_same(
            score_blocks_offloaded(str(tmp_path), windows, metric, n, batch_size=3, progress=False),
            score_blocks(model, windows, metric, n, batch_size=3, progress=False),
            atol=1e-5,
        )


@pytest.mark.parametrize("family", ("qwen2", "mistral"))
def test_offloaded_uses_sliding_window_masks(tmp_path, family):
    """Sliding-window layers (a window shorter than the sequence) get the sliding mask, as in the family's forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"use_sliding_window": True, "max_window_layers": 2} if family == "qwen2" else {}
    config = AutoConfig.for_model(
        family, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=4, **extra,
    )  # fmt: skip
    if family == "qwen2":
        assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    windows = calibration_windows(seq=12)
    in_memory = score_blocks(model, windows, "bi", progress=False)
    _assert_same(score_blocks_offloaded(str(tmp_path), windows, "bi", progress=False), in_memory, atol=1e-5)
    # the same weights without sliding windows score differently, so a full mask would have been caught
    no_sliding = {"sliding_window": None, "use_sliding_window": False, "layer_types": None}
    full_config = AutoConfig.for_model(**{**config.to_dict(), **no_sliding})
    full = AutoModelForCausalLM.from_config(full_config).eval()
    full.load_state_dict(model.state_dict())
    full_scores = score_blocks(full, windows, "bi", progress=False).scores
    assert max(abs(a - b) for a, b in zip(full_scores, in_memory.scores)) > 1e-4


def test_offloaded_native_folder_with_shared_blocks(tiny_hf, tmp_path):
    """A native folder stores a reused block once, at its home; offloading must find it there."""
    model = build_from_hf(tiny_hf("llama"), reuse_plan(2))
    with torch.no_grad():  # give adapters and output norms a visible effect
        for name, p in model.named_parameters():
            if "lora_B" in name or "out_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    save_native(model, tmp_path / "native")
    loaded = load_native(tmp_path / "native")
    windows = calibration_windows()
    _assert_same(
        score_blocks_offloaded(str(tmp_path / "native"), windows, "streamline", 2, progress=False),
        score_blocks(loaded, windows, "streamline", 2, progress=False),
        atol=1e-5,
    )


def test_direction_of_each_metric():
    bi = BlockScores("bi", 1, [0.3, 0.1, 0.2, 0.1], tokens=10)
    assert bi.ranking() == [1, 3, 2, 0]
    assert bi.least_important(2) == [1, 3] and bi.least_important(3) == [1, 2, 3]
    angular = BlockScores("angular", 2, [0.4, 0.2, 0.3], tokens=10)
    assert angular.best_window() == 1 and angular.least_important(2) == [1, 2]
    streamline = BlockScores("streamline", 2, [0.4, 0.2, 0.9], tokens=10)
    assert streamline.best_window() == 2 and streamline.least_important(2) == [2, 3]
    with pytest.raises(ValueError, match="window=3"):
        streamline.least_important(3)
    assert streamline.num_blocks == 4
    assert json.loads(json.dumps(streamline.to_dict())) == {
        "metric": "streamline", "window": 2, "scores": [0.4, 0.2, 0.9], "tokens": 10, "remove_first": "highest",
    }  # fmt: skip
    assert bi.to_dict()["remove_first"] == "lowest"


@pytest.mark.parametrize(
    ("metric", "n", "message"),
    (
        ("cka", 1, "unknown importance metric"),
        ("bi", 2, "window must be 1"),
        ("angular", 0, "between 1"),
        ("streamline", 5, "between 1"),
    ),
)
def test_bad_arguments_raise_before_work(tiny_hf, tmp_path, metric, n, message):
    model = tiny_hf("llama", layers=4)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        score_blocks(model, calibration_windows(), metric, n, progress=False)
    with pytest.raises(ValueError, match=message):
        score_blocks_offloaded(str(tmp_path), calibration_windows(), metric, n, progress=False)
    assert set(METRICS) == {"bi", "angular", "streamline"}


def test_bad_windows_raise(tiny_hf):
    model = tiny_hf("llama")
    with pytest.raises(ValueError, match="non-empty"):
        score_blocks(model, torch.zeros(0, 8, dtype=torch.long), "bi", progress=False)
    with pytest.raises(ValueError, match="integer token ids"):
        score_blocks(model, torch.zeros(2, 8), "bi", progress=False)


@pytest.mark.integration  # ~20 s, nearly all of it two interpreters importing torch and transformers
def test_two_processes_equal_one(tiny_hf, tmp_path):
    """Two gloo ranks, each on its shard of the windows, return the one-process scores on both ranks."""
    model = tiny_hf("llama", layers=4)
    model.save_pretrained(tmp_path / "model")
    windows = calibration_windows()
    want = {f"{m}-{n}": score_blocks(model, windows, m, n, batch_size=2, progress=False) for m, n in CASES}
    want["offloaded"] = score_blocks_offloaded(str(tmp_path / "model"), windows, "angular", 2, progress=False)

    script = Path(__file__).with_name("_dist_score.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_endpoint", "localhost:0",
           "--rdzv_backend", "c10d", str(script), str(tmp_path), str(tmp_path / "model")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank returns the same thing
    for key, scores in want.items():
        got = BlockScores(**{k: v for k, v in ranks[0][key].items() if k != "remove_first"})
        _assert_same(got, scores, atol=1e-6)
    print(f"two-process scoring took {time.time() - start:.1f} s")
