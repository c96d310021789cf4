"""Turn importance scores and weights into a plan and an initialised model, for each method.

docs/method.md, "The prune path" and "Baselines carried as methods". Positions
keep depth order; ``Bj'`` runs block j's stored weights plus its own parts::

    original      B0  B1  B2  B3  B4  B5      (BI lowest: B3, B5)
    flexigpt      B0  B1  B2  B1' B4  B2'     each pruned block replaced IN PLACE by the
                                              closest kept block (replace.distance_matrix)
                                              + LoRA r_a on 7 linears (SVD init) + out-norms
    shortgpt      B0  B1  B2      B4          lowest-BI blocks dropped
    shortgpt-lora B0' B1' B2'     B4'         dropped, LoRA (B = 0) on every kept block at
                                              the rank that spends flexigpt's budget
    angular       B0          B3  B4  B5      the n-block window (here 1..2) whose input and
                                              output are closest in angle, dropped (Gromov et al.)
    streamline    B0  N1          B4  B5      the window (here 1..3) with the highest input/output
                                              cosine -> ONE new block N1, initialised from the
                                              window's first block, trained (LLM-Streamline)

In plan terms streamline's new block is the window's first block (its
weights are used nowhere else, so they are the new block's own); it differs
from dropping the rest of the window in what training updates, which the
report names (``trainable_positions``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from prunext.core.families import Slot, family_of
from prunext.core.plan import LINEAR_NAMES, Plan, Position
from prunext.errors import UserError
from prunext.prune.ratio import Budget
from prunext.prune.collective import merge_over_ranks, rank_and_world
from prunext.prune.replace import choose_sources, distance_matrix, svd_adapter

#: Importance metric each method ranks blocks by (the window length comes from the budget).
METRIC_OF = {
    "flexigpt": "bi",
    "shortgpt": "bi",
    "shortgpt-lora": "bi",
    "angular": "angular",
    "streamline": "streamline",
}


@dataclass
class Pruning:
    """What a method decided: which blocks go, what runs in their place, the resulting plan.

    Attributes:
        method: the method.
        num_blocks: L of the source model.
        pruned: blocks whose weights the pruned model no longer stores, ascending.
        kept: the other blocks, ascending.
        plan: positions of the pruned model over the source's block numbering.
        sources: flexigpt: ``{pruned block i: kept block j}`` that runs at i's position.
        window: angular/streamline: ``(first, last)`` block of the removed window, inclusive.
        distances: flexigpt: ``d(i, j)``, (len(pruned), len(kept)) float64, rows ``pruned``, columns ``kept``.
        trainable_positions: positions whose parameters are new and meant to be trained
            (flexigpt: adapters + norms of the replacements; shortgpt-lora: adapters;
            streamline: the new block); empty for shortgpt and angular.
    """

    method: str
    num_blocks: int
    pruned: list[int]
    kept: list[int]
    plan: Plan
    sources: dict[int, int] = field(default_factory=dict)
    window: tuple[int, int] | None = None
    distances: torch.Tensor | None = None
    trainable_positions: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "num_blocks": self.num_blocks,
            "pruned": self.pruned,
            "kept": self.kept,
            "sources": {str(i): j for i, j in self.sources.items()},
            "window": list(self.window) if self.window is not None else None,
            "trainable_positions": self.trainable_positions,
            "plan": self.plan.to_dict(),
        }


def metric_for(budget: Budget) -> tuple[str, int]:
    """``(metric, window)`` to score with: BI per block, or windows of the budget's n blocks."""
    metric = METRIC_OF[budget.method]
    return metric, (1 if metric == "bi" else budget.count)


def linear_slots(model: nn.Module) -> dict[str, Slot]:
    """Where each of the 7 logical linears is in a block of ``model`` (plain HF or native)."""
    config = model.config.base_config() if hasattr(model.config, "base_config") else model.config
    return family_of(config.model_type).slots(config)


def block_weights(model: nn.Module, blocks) -> dict[int, dict[str, torch.Tensor]]:
    """``{block: {linear name: weight (out, in)}}`` of a plain HF or identity-plan model (no copies).

    A fused linear's parts are views of their rows of the fused weight (Phi-3's ``qkv_proj``).
    """
    slots = linear_slots(model)
    out = {}
    for b in blocks:
        layer = model.model.layers[b]
        out[b] = {}
        for name, slot in slots.items():
            weight = layer.get_submodule(slot.path).weight.detach()
            out[b][name] = weight[slot.start : slot.start + slot.rows] if slot.fused else weight
    return out


def decide(
    scores,
    budget: Budget,
    weights: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    filter_rank: int | None = None,
    out_norm: bool = True,
    kept_lora: float = 0.0,
    solver: str = "exact",
) -> Pruning:
    """Choose the blocks to prune from ``scores`` and lay out the pruned model's plan.

    Args:
        scores: :class:`~prunext.prune.importance.BlockScores` of the metric and window
            :func:`metric_for` names for this budget.
        budget: from :func:`prunext.prune.ratio.plan_budget`; its adapter rank is
            flexigpt's r_a and shortgpt-lora's rank. In the flexigpt hybrid each replacement
            gets its share of it (:func:`split_ranks`), and its distance is computed at that rank.
        weights: flexigpt only: :func:`block_weights` of every block.
        filter_rank: flexigpt: k of the low-rank filtering; None = no filtering.
        out_norm: flexigpt: replacement positions carry output norms.
        kept_lora: flexigpt hybrid: the fraction of the adapter rank budget (``len(pruned) * r_a``)
            moved from the replacements onto LoRA on the kept blocks (:func:`split_ranks`); 0 =
            pure replacement. The adapter parameters stored are the same for every value.
        solver: flexigpt: how the filtering's singular triplets are computed
            (:func:`prunext.prune.replace.top_singular`).

    Returns:
        The decision; for flexigpt with the distance matrix.
    """
    method, L = budget.method, scores.num_blocks
    metric, window = metric_for(budget)
    if (scores.metric, scores.window) != (metric, window) and not (metric == "bi" and scores.window == 1):
        raise ValueError(f"{method} needs {metric} scores with window {window}, got {scores.metric} with {scores.window}")
    chosen = scores.least_important(budget.count)  # ascending
    span = (chosen[0], chosen[-1]) if metric != "bi" else None
    pruned = chosen[1:] if method == "streamline" else chosen
    kept = sorted(set(range(L)) - set(pruned))

    if method == "flexigpt":
        if weights is None:
            raise ValueError("flexigpt needs the block weights to choose the shared blocks")
        ranks = split_ranks(budget.adapter_rank, pruned, kept, kept_lora)
        # each replacement is matched at the adapter rank it will really have
        distances = distance_matrix(weights, pruned, kept, {b: ranks[b] for b in pruned}, filter_rank, solver)
        sources = choose_sources(distances, pruned, kept)
        # each pruned position runs its source's weights plus its own adapters and norms;
        # in the hybrid, kept blocks carry LoRA too (B = 0 at init, as shortgpt-lora)
        positions = tuple(
            Position(sources[b], lora_rank=ranks[b], lora_targets=LINEAR_NAMES, out_norm=out_norm)
            if b in sources
            else Position(b, lora_rank=ranks[b], lora_targets=LINEAR_NAMES if ranks[b] else ())
            for b in range(L)
        )
        trainable = [b for b in range(L) if b in sources or ranks[b]]
        return Pruning(
            method, L, pruned, kept, Plan(positions, L), sources=sources, distances=distances,
            trainable_positions=trainable,
        )
    if method == "shortgpt-lora":
        positions = tuple(Position(b, lora_rank=budget.adapter_rank, lora_targets=LINEAR_NAMES) for b in kept)
        return Pruning(method, L, pruned, kept, Plan(positions, L), trainable_positions=list(range(len(kept))))
    plan = Plan(tuple(Position(b) for b in kept), L)
    trainable = [kept.index(span[0])] if method == "streamline" else []
    return Pruning(method, L, pruned, kept, plan, window=span, trainable_positions=trainable)


def split_ranks(rank: int, pruned: list[int], kept: list[int], kept_lora: float) -> dict[int, int]:
    """LoRA rank of every block position: flexigpt's budget, optionally shared with the kept blocks.

    The budget is ``len(pruned) * rank`` rank units (a LoRA's parameters are linear in its
    rank, so any split of the units stores the same adapter parameters). ``round(kept_lora *
    units)`` go to the kept blocks, the rest to the replacements, each side spread as evenly as
    integers allow (earlier blocks take the remainder). Every replacement keeps rank >= 1.

    Raises:
        UserError: ``kept_lora`` outside [0, 1), or so large that a replacement would get rank 0.
    """
    if not 0 <= kept_lora < 1:
        raise UserError(f"--kept-lora {kept_lora} must be in [0, 1): the fraction of adapter rank moved to kept blocks")
    units = len(pruned) * rank
    to_kept = round(kept_lora * units)
    if units - to_kept < len(pruned):
        most = (units - len(pruned)) / units
        raise UserError(f"--kept-lora {kept_lora} leaves a replacement without an adapter; use at most {most:.2f}")

    def spread(total: int, blocks: list[int]) -> dict[int, int]:
        base, extra = divmod(total, len(blocks)) if blocks else (0, 0)
        return {b: base + (i < extra) for i, b in enumerate(blocks)}

    return {**spread(to_kept, kept), **spread(units - to_kept, pruned)}


def check_source(model: nn.Module) -> None:
    """Refuse a native model that is already pruned or extended (its plan is not the identity).

    Raises:
        UserError: with what to do instead.
    """
    plan = getattr(model, "plan", None)
    if plan is not None and not plan.is_identity:
        raise UserError(
            "the model is already pruned or extended (its plan is not the identity); "
            "prune/extend a plain or identity-plan model"
        )


def build_model(source: nn.Module, pruning: Pruning, out_norm_init: float) -> nn.Module:
    """The pruned :class:`~prunext.core.model.PrunextForCausalLM`, adapters at LoRA's init (B = 0).

    Base tensors are shared with ``source`` (no copies). Seed the RNG first for
    reproducible ``A`` matrices; :func:`init_adapters_svd` overwrites them for flexigpt.
    """
    from prunext.core.checkpoint import build_from_hf

    check_source(source)
    return build_from_hf(source, pruning.plan, out_norm_init=out_norm_init)


@torch.no_grad()
def init_adapters_svd(
    model: nn.Module, pruning: Pruning, weights: Mapping[int, Mapping[str, torch.Tensor]], solver: str = "exact"
) -> None:
    """Start each flexigpt replacement's adapters at the truncated SVD of ``W_i - W_j`` (docs/method.md item 4).

    Position i (= pruned block i, replaced in place) runs kept block j: its
    ``lora_B @ lora_A`` becomes the best rank-r approximation of ``W_i - W_j``
    per linear, so ``W_j + BA`` approximates the pruned block's own weight.
    Under torchrun each rank starts every ``world``-th replacement and the
    adapters are exchanged, so every rank ends with all of them.

    Args:
        model: built by :func:`build_model` from a flexigpt pruning.
        pruning: the decision (``sources``).
        weights: :func:`block_weights` of the SOURCE model (unfiltered), covering every
            pruned block and its source; read one pair of weights at a time.
        solver: see :func:`prunext.prune.replace.top_singular`.
    """
    slots = linear_slots(model)
    rank, world = rank_and_world()
    started = {}
    for i, j in sorted(pruning.sources.items())[rank::world]:
        position = pruning.plan.positions[i]
        if position.lora_scale != 1.0:
            raise ValueError(f"SVD init needs LoRA scale 1 (lora_alpha = rank); position {i} has {position.lora_scale}")
        layer = model.model.layers[i]
        for name in position.lora_targets:
            slot = slots[name]
            linear = layer.get_submodule(slot.path)
            a_rows, b_rows = linear.part_rows(slot.start)  # all rows of an unfused linear
            a, b = svd_adapter(weights[i][name], weights[j][name], position.lora_rank, solver)
            linear.lora_A[a_rows] = a
            linear.lora_B[b_rows] = b
        started[i] = {path: (m.lora_A.cpu(), m.lora_B.cpu()) for path, m in _adapted(layer, position, slots).items()}
    if world > 1:
        for i, adapters in merge_over_ranks(started).items():
            for path, m in _adapted(model.model.layers[i], pruning.plan.positions[i], slots).items():
                m.lora_A.copy_(adapters[path][0])
                m.lora_B.copy_(adapters[path][1])


def _adapted(layer: nn.Module, position, slots) -> dict[str, nn.Module]:
    """``{module path: adapted linear}`` of one position (a fused linear once)."""
    return {slots[name].path: layer.get_submodule(slots[name].path) for name in position.lora_targets}


def stored_params(model: nn.Module) -> int:
    """Parameters a model stores: each shared ``nn.Parameter`` once."""
    return sum(p.numel() for p in model.parameters())
