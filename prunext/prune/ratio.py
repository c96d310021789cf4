"""How many blocks a ``--ratio`` prunes, with every added parameter counted.

``--ratio r`` is the NET fraction of transformer-block parameters removed
(docs/method.md, "The prune path", item 2): what a method adds back (LoRA
adapters, output norms) is subtracted from what it removes. With L blocks of
``P`` parameters each, ``T = L * P``::

    method         removed base blocks   added                                 net removed
    flexigpt       k                     k positions x (LoRA r_a on 7 linears  k * (P - a(r_a) - n)
                                                        + 2 output LayerNorms)
    shortgpt       k                     -                                     k * P
    angular        n (one window)        -                                     n * P
    streamline     n - 1 (window of n    - (the new block is the window's      (n - 1) * P
                   -> one new block)        first block, trained in place)
    shortgpt-lora  k                     LoRA on every kept block, spending    k * P - (L - k) * a(r)
                                         flexigpt's adapter budget at the same
                                         ratio: r = floor(k_flexigpt * a(r_a) /
                                         ((L - k) * a(1))), at least 1

    a(r) = r * sum over the 7 linears of (in + out)     LoRA parameters at rank r (a fused
                                                        linear's parts count as the 7 linears)
    n    = 2 * 2 * hidden                               two LayerNorms, weight + bias (pre-norm
                                                        blocks); 2 * hidden, two RMSNorm gains,
                                                        where they replace the post-branch norms

The count is the SMALLEST one whose net removal is AT LEAST ``r * T``
(compared exactly in integers: ``r`` is read from its decimal text, so
``--ratio 0.3`` on 30 equal blocks prunes exactly 9 plain blocks, not 10).
shortgpt-lora's adapters count too: it drops blocks until ``k * P - (L - k) * a(r)``
reaches ``r * T``, so at one ratio it and flexigpt store about the same
parameters and the same adapter budget (equal terms for the comparison the
paper makes). Both fractions are
reported: of the block parameters, and of all stored parameters (embeddings,
final norm and an untied LM head included).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

from prunext.core.families import family_of
from prunext.errors import UserError

METHODS = ("flexigpt", "shortgpt", "shortgpt-lora", "streamline", "angular")


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of a model of L equal blocks.

    Attributes:
        num_blocks: L.
        hidden_size: width of the residual stream.
        block_params: parameters of one block (7 linears, their biases, the block norms, any q/k norms).
        other_params: stored parameters outside the blocks (embeddings, final norm,
            LM head when untied); a tied LM head is counted once.
        linear_shapes: ``{linear name: (out_features, in_features)}``, a fused linear's parts each on its own.
        out_norm_params_each: parameters of one output norm (0: a LayerNorm over ``hidden_size``).
    """

    num_blocks: int
    hidden_size: int
    block_params: int
    other_params: int
    linear_shapes: dict[str, tuple[int, int]]
    out_norm_params_each: int = 0

    @classmethod
    def from_model(cls, model) -> ModelSizes:
        """Count a plain HF causal LM, or a :class:`~prunext.core.model.PrunextForCausalLM` with an identity plan.

        Raises:
            ValueError: when the blocks differ in size (every supported family has equal blocks).
        """
        layers = model.model.layers
        sizes = {sum(p.numel() for p in layer.parameters()) for layer in layers}
        if len(sizes) != 1:
            raise ValueError(f"blocks of different sizes {sorted(sizes)}; ratio accounting assumes equal blocks")
        block = layers[0]
        config = model.config.base_config() if hasattr(model.config, "base_config") else model.config
        family = family_of(config.model_type)
        shapes = {}
        for name, slot in family.slots(config).items():  # a fused linear's parts count as the linears they are
            linear = block.get_submodule(slot.path)
            shapes[name] = (slot.rows if slot.fused else linear.out_features, linear.in_features)
        params = dict(model.named_parameters())  # a shared Parameter once
        if getattr(model.config, "tie_word_embeddings", False):
            params.pop("lm_head.weight", None)  # tied: the embedding (a meta-device skeleton may not be tied yet)
        total = sum(p.numel() for p in params.values())
        block_params = sizes.pop()
        norm_params = (2 if family.out_norm_kind == "layernorm" else 1) * model.config.hidden_size
        return cls(len(layers), model.config.hidden_size, block_params, total - len(layers) * block_params, shapes,
                   out_norm_params_each=norm_params)

    @property
    def total_block_params(self) -> int:
        return self.num_blocks * self.block_params

    @property
    def total_params(self) -> int:
        return self.total_block_params + self.other_params

    @property
    def lora_params_per_rank(self) -> int:
        """LoRA parameters per unit of rank on all 7 linears: ``sum(in + out)``."""
        return sum(out + inp for out, inp in self.linear_shapes.values())

    def adapter_params(self, rank: int) -> int:
        """LoRA parameters of one position with rank ``rank`` on all 7 linears (A: rank x in, B: out x rank)."""
        return rank * self.lora_params_per_rank

    @property
    def max_rank(self) -> int:
        """The largest useful LoRA rank: the smallest dimension of any of the 7 linears."""
        return min(min(shape) for shape in self.linear_shapes.values())

    @property
    def out_norm_params(self) -> int:
        """Output-norm parameters of one position: two norms over the hidden size.

        LayerNorms (weight + bias) on a pre-norm block; the position's own RMSNorm gains
        (weight only) on a sandwich or post-norm block. 0 in ``out_norm_params_each`` means
        LayerNorms (sizes built by hand).
        """
        return 2 * (self.out_norm_params_each or 2 * self.hidden_size)


@dataclass(frozen=True)
class Budget:
    """What a method at a ratio removes and adds, in blocks and parameters.

    Attributes:
        method: one of :data:`METHODS`.
        ratio: the requested net fraction of block parameters.
        count: blocks chosen by importance: pruned blocks (flexigpt, shortgpt,
            shortgpt-lora), or the window length n (angular, streamline).
        removed_blocks: base blocks no longer stored.
        adapter_rank: LoRA rank of each adapted position (0: none).
        adapted_positions: positions that carry LoRA.
        norm_positions: positions that carry output norms.
        adapter_params: LoRA parameters added, in total.
        norm_params: output-norm parameters added, in total.
        block_params_before: parameters of all blocks before pruning.
        block_params_after: stored block parameters after, adapters and norms included.
        total_params_before: all stored parameters before.
        total_params_after: all stored parameters after.
    """

    method: str
    ratio: float
    count: int
    removed_blocks: int
    adapter_rank: int
    adapted_positions: int
    norm_positions: int
    adapter_params: int
    norm_params: int
    block_params_before: int
    block_params_after: int
    total_params_before: int
    total_params_after: int

    @property
    def net_removed(self) -> int:
        return self.block_params_before - self.block_params_after

    @property
    def block_fraction(self) -> float:
        """Net removed / all block parameters before."""
        return self.net_removed / self.block_params_before

    @property
    def total_fraction(self) -> float:
        """Net removed / all stored parameters before (embeddings included)."""
        return self.net_removed / self.total_params_before

    @property
    def overhead_params(self) -> int:
        return self.adapter_params + self.norm_params

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            net_removed=self.net_removed,
            block_fraction=self.block_fraction,
            total_fraction=self.total_fraction,
            overhead_params=self.overhead_params,
        )
        return d


def exact_ratio(ratio: float) -> Fraction:
    """The ratio as the user wrote it: ``0.3`` -> ``3/10`` exactly, not the nearest binary float."""
    return Fraction(str(ratio))


def smallest_count(ratio: float, saved_each: int, total: int) -> int:
    """The smallest ``c >= 1`` with ``c * saved_each >= ratio * total``, in exact arithmetic."""
    r = exact_ratio(ratio)
    return max(1, math.ceil(r * total / saved_each))


def check_ratio(ratio: float) -> None:
    """Refuse a ratio outside the open interval (0, 1).

    Raises:
        UserError: ``ratio <= 0``, ``ratio >= 1`` or not finite.
    """
    if not (math.isfinite(ratio) and 0 < ratio < 1):
        raise UserError(f"--ratio {ratio} must be a fraction strictly between 0 and 1, e.g. --ratio 0.3")


def _too_many(ratio: float, num_blocks: int) -> UserError:
    return UserError(f"ratio {ratio} would prune all {num_blocks} blocks; use a smaller --ratio")


def plan_budget(
    method: str,
    sizes: ModelSizes,
    ratio: float,
    adapter_rank: int,
    out_norm: bool = True,
) -> Budget:
    """How many blocks ``method`` prunes at ``ratio`` and what it adds back (see the module docstring).

    Args:
        method: one of :data:`METHODS`.
        sizes: the model's parameter counts.
        ratio: net fraction of block parameters to remove, in (0, 1).
        adapter_rank: flexigpt's LoRA rank r_a (also sets shortgpt-lora's budget).
        out_norm: whether flexigpt's replacement positions carry output norms.

    Raises:
        UserError: ratio outside (0, 1); the ratio would leave no block (no kept
            block to share, for flexigpt); adapters that cost as much as a block.
    """
    check_ratio(ratio)
    if method not in METHODS:
        raise UserError(f"unknown --method {method}; choose one of {', '.join(METHODS)}")
    L, P = sizes.num_blocks, sizes.block_params
    T = sizes.total_block_params
    rank, adapted, normed, count, removed = 0, 0, 0, 0, 0

    if method == "flexigpt":
        per_position = sizes.adapter_params(adapter_rank) + (sizes.out_norm_params if out_norm else 0)
        saved = P - per_position
        if saved <= 0:
            raise UserError(
                f"--adapter-rank {adapter_rank} adds {per_position:,} parameters per replaced block, as many as the "
                f"block's {P:,}; use a smaller --adapter-rank"
            )
        count = removed = smallest_count(ratio, saved, T)
        if count >= L:  # a replacement needs at least one kept block to share
            raise _too_many(ratio, L)
        rank, adapted, normed = adapter_rank, count, count if out_norm else 0
    elif method in ("shortgpt", "angular", "shortgpt-lora"):
        count = removed = smallest_count(ratio, P, T)
        if count >= L:
            raise _too_many(ratio, L)
        if method == "shortgpt-lora":
            # flexigpt's adapter budget at this ratio, spread evenly over the kept blocks; the adapters
            # count against the ratio as flexigpt's do, so drop more blocks until the net removal reaches it
            flexi_saved = P - sizes.adapter_params(adapter_rank) - (sizes.out_norm_params if out_norm else 0)
            flexi_count = smallest_count(ratio, max(flexi_saved, 1), T)
            budget = flexi_count * sizes.adapter_params(adapter_rank)

            def lora_rank(kept: int) -> int:
                return max(1, min(budget // (kept * sizes.lora_params_per_rank), sizes.max_rank))

            target = exact_ratio(ratio) * T
            while count < L and count * P - (L - count) * sizes.adapter_params(lora_rank(L - count)) < target:
                count += 1
            if count >= L:
                raise _too_many(ratio, L)
            removed, rank, adapted = count, lora_rank(L - count), L - count
    elif method == "streamline":
        removed = smallest_count(ratio, P, T)
        count = removed + 1  # a window of n blocks becomes one block
        if count > L:
            raise _too_many(ratio, L)

    adapter_params = adapted * sizes.adapter_params(rank)
    norm_params = normed * sizes.out_norm_params
    after = (L - removed) * P + adapter_params + norm_params
    return Budget(
        method=method,
        ratio=ratio,
        count=count,
        removed_blocks=removed,
        adapter_rank=rank,
        adapted_positions=adapted,
        norm_positions=normed,
        adapter_params=adapter_params,
        norm_params=norm_params,
        block_params_before=T,
        block_params_after=after,
        total_params_before=sizes.total_params,
        total_params_after=sizes.other_params + after,
    )
