"""Parameter accounting: hand-computed counts on the tiny Llama of conftest (4 blocks, hidden 32)."""

import math

import pytest

from prunext.errors import UserError
from prunext.prune.ratio import ModelSizes, plan_budget, smallest_count

# The tiny Llama: hidden 32, intermediate 64, 4 heads of 8, 2 KV heads, vocab 128, tied embeddings.
Q = O = 32 * 32  # 1024
K = V = 16 * 32  # 512 (2 KV heads x 8)
MLP = 3 * 64 * 32  # gate, up, down: 6144
NORMS = 2 * 32  # input + post-attention RMSNorm weights
BLOCK = Q + K + V + O + MLP + NORMS  # 9280
OTHER = 128 * 32 + 32  # tied embedding + final norm: 4128
LORA_PER_RANK = (32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 64)  # sum(in + out) = 512
OUT_NORMS = 2 * 2 * 32  # two LayerNorms, weight + bias: 128


def test_sizes_from_a_tiny_model_match_hand_counts(tiny_hf):
    sizes = ModelSizes.from_model(tiny_hf("llama", layers=4))
    assert (sizes.num_blocks, sizes.hidden_size, sizes.block_params, sizes.other_params) == (4, 32, BLOCK, OTHER)
    assert sizes.lora_params_per_rank == LORA_PER_RANK
    assert sizes.adapter_params(2) == 2 * 512
    assert sizes.out_norm_params == OUT_NORMS
    assert sizes.linear_shapes["k_proj"] == (16, 32) and sizes.linear_shapes["down_proj"] == (32, 64)
    assert sizes.max_rank == 16


def test_untied_head_counts_in_other_params(tiny_hf):
    sizes = ModelSizes.from_model(tiny_hf("llama", layers=4, tie=False))
    assert sizes.other_params == OTHER + 128 * 32


def test_flexigpt_counts_adapters_and_norms(tiny_hf):
    sizes = ModelSizes.from_model(tiny_hf("llama", layers=4))
    b = plan_budget("flexigpt", sizes, 0.3, adapter_rank=2, out_norm=True)
    # each replacement saves 9280 - 1024 - 128 = 8128; 0.3 * 37120 = 11136 -> k = 2 (1 saves only 8128)
    assert (b.count, b.removed_blocks, b.adapter_rank, b.adapted_positions, b.norm_positions) == (2, 2, 2, 2, 2)
    assert b.adapter_params == 2 * 1024 and b.norm_params == 2 * OUT_NORMS
    assert b.block_params_before == 4 * BLOCK
    assert b.block_params_after == 2 * BLOCK + 2 * 1024 + 2 * OUT_NORMS  # 20864
    assert b.net_removed == 2 * (BLOCK - 1024 - OUT_NORMS)  # 16256
    assert b.total_params_after == OTHER + b.block_params_after
    assert b.block_fraction == pytest.approx(16256 / 37120)
    assert b.total_fraction == pytest.approx(16256 / (37120 + OTHER))
    no_norm = plan_budget("flexigpt", sizes, 0.3, adapter_rank=2, out_norm=False)
    assert no_norm.norm_params == 0 and no_norm.net_removed == 2 * (BLOCK - 1024)


def test_shortgpt_angular_streamline_counts(tiny_hf):
    sizes = ModelSizes.from_model(tiny_hf("llama", layers=4))
    short = plan_budget("shortgpt", sizes, 0.3, adapter_rank=2)
    assert (short.count, short.removed_blocks, short.overhead_params) == (2, 2, 0)
    assert short.block_params_after == 2 * BLOCK
    angular = plan_budget("angular", sizes, 0.2, adapter_rank=2)
    assert (angular.count, angular.removed_blocks) == (1, 1)  # 0.2 * 4 blocks -> 1 block (0.25 >= 0.2)
    streamline = plan_budget("streamline", sizes, 0.3, adapter_rank=2)
    assert (streamline.count, streamline.removed_blocks) == (3, 2)  # a window of 3 becomes 1 block
    assert streamline.block_params_after == 2 * BLOCK


def test_shortgpt_lora_spends_flexigpts_adapter_budget(tiny_hf):
    sizes = ModelSizes.from_model(tiny_hf("llama", layers=4))
    b = plan_budget("shortgpt-lora", sizes, 0.3, adapter_rank=2)
    # flexigpt at 0.3 adds 2 x 1024 LoRA parameters; spread over 2 kept blocks at 512 per rank -> rank 2
    assert (b.count, b.adapter_rank, b.adapted_positions, b.adapter_params) == (2, 2, 2, 2048)
    assert b.norm_params == 0
    assert b.net_removed == 2 * BLOCK - 2048


def test_at_least_ratio_is_exact_at_the_boundary():
    # 25 equal blocks at 0.28: exactly 7 (7 * P == 0.28 * 25 P); binary floats would say 8
    assert math.ceil(0.28 * 25) == 8  # the trap: 0.28 * 25 = 7.000000000000001 in floats
    sizes = ModelSizes(25, 32, 1000, 0, {"q_proj": (32, 32)})
    assert plan_budget("shortgpt", sizes, 0.28, adapter_rank=1).count == 7
    assert plan_budget("shortgpt", sizes, 0.281, adapter_rank=1).count == 8
    assert smallest_count(0.28, 1000, 25_000) == 7


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_open_interval_is_refused(ratio):
    sizes = ModelSizes(4, 32, BLOCK, OTHER, {"q_proj": (32, 32)})
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        plan_budget("shortgpt", sizes, ratio, adapter_rank=1)


@pytest.mark.parametrize("method", ["flexigpt", "shortgpt", "shortgpt-lora", "angular", "streamline"])
def test_ratio_that_prunes_everything_is_refused(tiny_hf, method):
    sizes = ModelSizes.from_model(tiny_hf("llama", layers=4))
    with pytest.raises(UserError, match=r"ratio 0\.9 would prune all 4 blocks; use a smaller --ratio"):
        plan_budget(method, sizes, 0.9, adapter_rank=2)


def test_flexigpt_needs_a_kept_block_to_share(tiny_hf):
    # 0.7 leaves one plain block for shortgpt (3 pruned) but flexigpt's overhead needs 4 replacements
    sizes = ModelSizes.from_model(tiny_hf("llama", layers=4))
    assert plan_budget("shortgpt", sizes, 0.7, adapter_rank=2).count == 3
    with pytest.raises(UserError, match="would prune all 4 blocks"):
        plan_budget("flexigpt", sizes, 0.7, adapter_rank=2)


def test_adapter_as_large_as_a_block_is_refused(tiny_hf):
    sizes = ModelSizes.from_model(tiny_hf("llama", layers=4))
    with pytest.raises(UserError, match="--adapter-rank"):
        plan_budget("flexigpt", sizes, 0.3, adapter_rank=BLOCK // LORA_PER_RANK + 1)
