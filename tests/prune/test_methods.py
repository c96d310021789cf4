"""Plans and initialised models of each method, against hand-built references, on tiny models."""

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

import prunext  # noqa: F401  (registers the native format with AutoModelForCausalLM)
from prunext.core.checkpoint import save_native
from prunext.core.families import UNFUSED_PATHS
from prunext.core.plan import LINEAR_NAMES, Position
from prunext.errors import UserError
from prunext.prune import methods
from prunext.prune.importance import BlockScores
from prunext.prune.ratio import ModelSizes, plan_budget

# BI per block for a 6-block model: blocks 1 and 4 are the least important, then 3.
BI = [0.9, 0.1, 0.5, 0.3, 0.2, 0.8]


def _bi() -> BlockScores:
    return BlockScores(metric="bi", window=1, scores=list(BI), tokens=1000)


def _x() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    parent, leaf = UNFUSED_PATHS[name].split(".")  # these tests use unfused families
    return getattr(getattr(layer, parent), leaf)


def _flexigpt(hf, ratio=0.25, out_norm_init=0.01, svd=True, out_norm=True, kept_lora=0.0, adapter_rank=2):
    sizes = ModelSizes.from_model(hf)
    budget = plan_budget("flexigpt", sizes, ratio, adapter_rank=adapter_rank, out_norm=out_norm)
    weights = methods.block_weights(hf, range(sizes.num_blocks))
    pruning = methods.decide(_bi(), budget, weights, filter_rank=2, out_norm=out_norm, kept_lora=kept_lora)
    torch.manual_seed(0)
    model = methods.build_model(hf, pruning, out_norm_init)
    if svd:
        methods.init_adapters_svd(model, pruning, weights)
    return model, pruning, budget, weights


def _drop_by_hand(hf, drop):
    """An HF model of the same family with ``drop`` layers deleted and layer_idx renumbered."""
    dropped = copy.deepcopy(hf)
    kept = [layer for i, layer in enumerate(dropped.model.layers) if i not in set(drop)]
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx
    dropped.model.layers = nn.ModuleList(kept)
    dropped.config.num_hidden_layers = len(kept)
    if getattr(dropped.config, "layer_types", None) is not None:
        dropped.config.layer_types = [t for i, t in enumerate(dropped.config.layer_types) if i not in set(drop)]
    return dropped.eval()


def test_flexigpt_replaces_pruned_blocks_in_place_with_shared_weights(tiny_hf):
    hf = tiny_hf("llama", layers=6)
    model, pruning, budget, _ = _flexigpt(hf)
    assert budget.count == 2 and pruning.pruned == [1, 4] and pruning.kept == [0, 2, 3, 5]
    plan = model.plan
    assert len(plan) == 6  # same depth
    for i, p in enumerate(plan.positions):
        if i in pruning.pruned:
            assert p == Position(pruning.sources[i], lora_rank=2, lora_targets=LINEAR_NAMES, out_norm=True)
        else:
            assert p == Position(i)
    # the replacement runs the very same Parameter as the kept block's own position
    for i, j in pruning.sources.items():
        home = plan.homes[j]
        assert _linear(model.model.layers[i], "up_proj").weight is _linear(model.model.layers[home], "up_proj").weight
    assert methods.stored_params(model) == budget.total_params_after
    assert pruning.distances.shape == (2, 4)
    assert pruning.sources == {i: pruning.kept[int(pruning.distances[r].argmin())] for r, i in enumerate(pruning.pruned)}


def test_svd_init_gives_the_best_rank_r_approximation_of_the_pruned_weight(tiny_hf):
    hf = tiny_hf("llama", layers=6)
    originals = {i: {n: _linear(hf.model.layers[i], n).weight.detach().clone() for n in LINEAR_NAMES} for i in range(6)}
    model, pruning, _, _ = _flexigpt(hf)
    for i, j in pruning.sources.items():
        for name in LINEAR_NAMES:
            w_i, w_j = originals[i][name], originals[j][name]
            merged = _linear(model.model.layers[i], name).merged_weight()
            u, s, vh = torch.linalg.svd((w_i - w_j).double(), full_matrices=False)
            best = w_j.double() + u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
            torch.testing.assert_close(merged.double(), best, rtol=0, atol=1e-5)
            residual = torch.linalg.matrix_norm(w_i - merged, ord="fro").double() ** 2
            torch.testing.assert_close(residual, (s[2:] ** 2).sum(), rtol=1e-5, atol=0)


def test_no_svd_init_keeps_lora_at_b_zero(tiny_hf):
    model, pruning, _, _ = _flexigpt(tiny_hf("llama", layers=6), svd=False)
    for i in pruning.pruned:
        for name in LINEAR_NAMES:
            assert torch.count_nonzero(_linear(model.model.layers[i], name).lora_B) == 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shortgpt_equals_dropping_the_layers_by_hand(tiny_hf, family):
    hf = tiny_hf(family, layers=6)
    budget = plan_budget("shortgpt", ModelSizes.from_model(hf), 0.3, adapter_rank=2)
    pruning = methods.decide(_bi(), budget)
    assert pruning.pruned == [1, 4] and pruning.trainable_positions == []
    model = methods.build_model(hf, pruning, out_norm_init=0.01)
    reference = _drop_by_hand(hf, [1, 4])
    with torch.no_grad():
        assert torch.equal(model(_x()).logits, reference(_x()).logits)
    assert methods.stored_params(model) == budget.total_params_after


def _adapter_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B"))


def test_hybrid_moves_adapter_rank_to_kept_blocks_and_stores_the_same_adapter_parameters(tiny_hf):
    hf = tiny_hf("llama", layers=6)
    pure, pure_pruning, budget, _ = _flexigpt(hf, adapter_rank=4)
    hybrid, pruning, _, _ = _flexigpt(hf, adapter_rank=4, kept_lora=0.5)
    # 2 replacements x rank 4 = 8 rank units; half go to the 4 kept blocks (rank 1 each), half stay (rank 2 each)
    ranks = [p.lora_rank for p in pruning.plan.positions]
    assert ranks == [1, 2, 1, 1, 2, 1] and pruning.pruned == pure_pruning.pruned
    assert [p.lora_rank for p in pure_pruning.plan.positions] == [0, 4, 0, 0, 4, 0]
    assert all(p.out_norm == (i in pruning.sources) for i, p in enumerate(pruning.plan.positions))
    assert pruning.trainable_positions == list(range(6))
    assert _adapter_params(hybrid) == _adapter_params(pure) == budget.adapter_params > 0
    assert methods.stored_params(hybrid) == methods.stored_params(pure) == budget.total_params_after
    # kept blocks' LoRA starts at B = 0: the hybrid's kept positions compute exactly the source block
    for b in pruning.kept:
        for name in LINEAR_NAMES:
            assert torch.count_nonzero(_linear(hybrid.model.layers[b], name).lora_B) == 0
    with pytest.raises(UserError, match="at most"):  # every replacement keeps an adapter
        _flexigpt(hf, adapter_rank=4, kept_lora=0.9)


def test_flexigpt_with_zero_out_norm_is_exactly_the_block_dropped_model(tiny_hf):
    hf = tiny_hf("llama", layers=6)
    reference = _drop_by_hand(hf, [1, 4])
    with torch.no_grad():
        expected = reference(_x()).logits
        model, _, _, _ = _flexigpt(hf, out_norm_init=0.0)
        assert torch.equal(model(_x()).logits, expected)
        # a small initial scale starts close, in proportion to the scale; this random model's residual
        # stream is only ~0.02 per feature (init std), so 1e-2 is not yet small here, 1e-4 is
        scale = expected.abs().max()
        gaps = [(_flexigpt(hf, out_norm_init=s)[0](_x()).logits - expected).abs().max() / scale for s in (1e-2, 1e-4)]
        assert gaps[1] < gaps[0] / 10 and gaps[1] < 1e-2


def test_shortgpt_lora_adapts_every_kept_block_and_starts_as_shortgpt(tiny_hf):
    hf = tiny_hf("llama", layers=6)
    budget = plan_budget("shortgpt-lora", ModelSizes.from_model(hf), 0.3, adapter_rank=2)
    pruning = methods.decide(_bi(), budget)
    # shortgpt alone drops 2 blocks at 0.3; the adapters count against the ratio, so a third goes
    assert budget.count == 3 and budget.block_fraction >= 0.3
    assert pruning.plan.positions == tuple(
        Position(b, lora_rank=budget.adapter_rank, lora_targets=LINEAR_NAMES) for b in [0, 2, 5]
    )
    assert pruning.trainable_positions == [0, 1, 2]
    model = methods.build_model(hf, pruning, out_norm_init=0.01)
    with torch.no_grad():
        assert torch.equal(model(_x()).logits, _drop_by_hand(hf, [1, 3, 4])(_x()).logits)  # B = 0
    assert methods.stored_params(model) == budget.total_params_after


def test_angular_drops_the_closest_window(tiny_hf):
    hf = tiny_hf("llama", layers=6)
    budget = plan_budget("angular", ModelSizes.from_model(hf), 0.3, adapter_rank=2)
    assert budget.count == 2
    scores = BlockScores(metric="angular", window=2, scores=[0.5, 0.4, 0.1, 0.3, 0.6], tokens=100)
    pruning = methods.decide(scores, budget)
    assert (pruning.window, pruning.pruned) == ((2, 3), [2, 3])
    assert [p.source for p in pruning.plan.positions] == [0, 1, 4, 5]


def test_streamline_replaces_the_most_similar_window_by_its_first_block(tiny_hf):
    hf = tiny_hf("llama", layers=6)
    budget = plan_budget("streamline", ModelSizes.from_model(hf), 0.3, adapter_rank=2)
    assert (budget.count, budget.removed_blocks) == (3, 2)
    scores = BlockScores(metric="streamline", window=3, scores=[0.5, 0.9, 0.7, 0.2], tokens=100)
    pruning = methods.decide(scores, budget)
    assert (pruning.window, pruning.pruned) == ((1, 3), [2, 3])
    assert [p.source for p in pruning.plan.positions] == [0, 1, 4, 5]
    assert pruning.trainable_positions == [1]  # the new block, initialised from block 1
    model = methods.build_model(hf, pruning, out_norm_init=0.01)
    assert methods.stored_params(model) == budget.total_params_after


def test_scores_of_the_wrong_metric_are_refused(tiny_hf):
    budget = plan_budget("angular", ModelSizes.from_model(tiny_hf("llama", layers=6)), 0.3, adapter_rank=2)
    with pytest.raises(ValueError, match="needs angular scores with window 2"):
        methods.decide(_bi(), budget)


def test_saved_flexigpt_model_reloads_with_identical_logits_and_stores_shared_tensors_once(tiny_hf, tmp_path):
    hf = tiny_hf("llama", layers=6)
    model, pruning, _, _ = _flexigpt(hf)
    save_native(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(_x()).logits, model(_x()).logits)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    # 4 stored base blocks of 6 positions; adapters on the 2 replacements only
    assert sum(k.endswith("q_proj.weight") for k in keys) == 4
    assert sum(k.endswith("lora_A") for k in keys) == 2 * 7
    assert sum("out_norm" in k for k in keys) == 2 * 2 * 2
    assert "lm_head.weight" not in keys  # tied


def test_an_already_pruned_model_is_refused_as_a_source(tiny_hf):
    from prunext.core.checkpoint import build_from_hf
    from prunext.core.plan import Plan
    from prunext.errors import UserError

    pruned = build_from_hf(tiny_hf("llama", layers=4), Plan((Position(0), Position(2)), 4))
    with pytest.raises(UserError, match="plain or identity-plan model"):
        methods.check_source(pruned)


def test_hybrid_matches_each_replacement_at_the_rank_it_really_gets(tiny_hf):
    """With --kept-lora 0.5 a replacement gets half the adapter rank, and the distance that picks its
    shared block is computed at that half: here the pick flips between rank 4 and rank 2.

    Singular values of W_j - W_i for the pruned blocks (W_i = 0): block 0 [10, 10, 4] (tail 16 at
    rank 2, 0 at rank 4), block 2 [2, 2, 2, 2, 2] (12 at rank 2, 4 at rank 4), blocks 3, 5 far away.
    """
    from prunext.prune.replace import distance_matrix

    hf = tiny_hf("llama", layers=6)
    budget = plan_budget("flexigpt", ModelSizes.from_model(hf), 0.25, adapter_rank=4, out_norm=True)
    spectra = {0: [10, 10, 4], 2: [2] * 5, 3: [20] * 8, 5: [20] * 8, 1: [], 4: []}
    weights = {b: {"w": torch.diag(torch.tensor(s + [0.0] * (8 - len(s)), dtype=torch.float64))} for b, s in spectra.items()}
    pure = methods.decide(_bi(), budget, weights, filter_rank=None, kept_lora=0.0)
    hybrid = methods.decide(_bi(), budget, weights, filter_rank=None, kept_lora=0.5)
    assert pure.pruned == hybrid.pruned == [1, 4]
    assert [hybrid.plan.positions[b].lora_rank for b in (1, 4)] == [2, 2]
    assert pure.sources == {1: 0, 4: 0}  # at rank 4 block 0 fits exactly
    assert hybrid.sources == {1: 2, 4: 2}  # at the rank 2 they get, block 2 is closer
    torch.testing.assert_close(hybrid.distances, distance_matrix(weights, [1, 4], [0, 2, 3, 5], 2, None), rtol=0, atol=0)
    assert hybrid.distances[0].tolist()[:2] == pytest.approx([16.0, 12.0])
