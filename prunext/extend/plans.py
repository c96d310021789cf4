"""Where the new positions of a deepened model go: pure layout arithmetic.

Every extend method first decides an *expansion*: the execution order of the
source model's blocks after deepening, with the added positions flagged::

    block mode, --blocks 1,2 (L = 4, N = 6)       sequential mode, --span 1:3 (L = 4, N = 6)
    source: 0  1  1'  2  2'  3                      source: 0  1  2  1'  2'  3
    new:    -  -  +   -  +   -                      new:    -  -  -  +   +   -

    solar, m = 1 (L = 4, N = 6): two copies of the model, the first without its
    last m blocks, the second without its first m blocks
    source: 0  1  2  1'  2'  3
    new:    -  -  -  +   +   +

FlexiGPT (Sec. 3.4) turns the expansion into a :class:`~prunext.core.plan.Plan`
whose new positions *reuse* the source block's weights and own a LoRA adapter
and output norms (:func:`flexigpt_plan`). LLaMA Pro and SOLAR turn it into a
dense model with independent copies (:mod:`prunext.extend.methods`).

Default choices (the FlexiGPT paper fixes none of them):

- **Block mode** spreads the N - L repeats evenly over the *interior* blocks,
  skipping the first and last ``edge_blocks(L)`` blocks. ShortGPT (Men et al.
  2024, Block Influence) and Gromov et al. (2024) find the first and last
  blocks change the hidden state the most and are the least redundant, while
  interior blocks have input and output states that are nearly alike; a repeat
  of an interior block therefore perturbs the function least, and spreading
  the repeats (as LLaMA Pro interleaves its copies) avoids piling all new depth
  into one region.
- **Sequential mode** repeats the span of N - L blocks that ends right before
  the last ``edge_blocks(L)`` blocks: the middle-to-late blocks, which those
  studies find the most redundant (Gromov et al. prune exactly such a
  contiguous span with the least loss).
- **LLaMA Pro** (Wu et al. 2024, Sec. 3) inserts one copy after every group of
  L / (N - L) blocks: the copy of the last block of each group.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunext.core.plan import Plan, Position
from prunext.errors import UserError


class ExtendError(UserError):
    """An extension that cannot be built from the given depth and choices."""


@dataclass(frozen=True)
class Expansion:
    """The deepened execution order of source blocks, with the added positions flagged.

    Args:
        sources: the source block each position runs, in execution order.
        new: True where the position is an added one (a repeat or copy).
        num_source_blocks: depth L of the source model.
    """

    sources: tuple[int, ...]
    new: tuple[bool, ...]
    num_source_blocks: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "new", tuple(self.new))
        if len(self.sources) != len(self.new):
            raise ValueError("sources and new must have one entry per position")
        if any(not 0 <= s < self.num_source_blocks for s in self.sources):
            raise ValueError(f"a source block is outside 0..{self.num_source_blocks - 1}: {self.sources}")

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def new_positions(self) -> tuple[int, ...]:
        return tuple(i for i, is_new in enumerate(self.new) if is_new)

    def describe(self, new_label: str = "new") -> str:
        """A table, one row per position: which source block it runs and whether it is added."""
        rows = [f"{'pos':>4}  {'block':>5}  added"]
        for i, (s, is_new) in enumerate(zip(self.sources, self.new)):
            rows.append(f"{i:>4}  {s:>5}  {new_label if is_new else '-'}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"sources": list(self.sources), "new": list(self.new), "num_source_blocks": self.num_source_blocks}


# ---------------------------------------------------------------- defaults
def edge_blocks(num_blocks: int) -> int:
    """How many blocks at each end the defaults never repeat: ``max(1, L // 10)``.

    3 for a 30-32 block model, 2 for TinyLlama's 22, 1 for tiny test models.
    """
    return max(1, num_blocks // 10)


def _check_growth(num_blocks: int, to_layers: int) -> int:
    if to_layers <= num_blocks:
        raise ExtendError(f"--to-layers {to_layers} must exceed the model's current depth of {num_blocks} blocks")
    return to_layers - num_blocks


def default_blocks(num_blocks: int, to_layers: int) -> tuple[int, ...]:
    """Block mode's default: N - L repeats spread evenly over the interior blocks.

    The interior is blocks ``edge .. L - edge - 1`` (:func:`edge_blocks`). Repeat
    j goes to interior block ``floor((j + 0.5) * n / k)`` of the n interior
    blocks, so k <= n repeats land on distinct, evenly spaced blocks and k > n
    repeats some blocks more than once, still evenly.

    Returns:
        The repeated blocks in ascending order (a block appears once per repeat).
    """
    k = _check_growth(num_blocks, to_layers)
    edge = edge_blocks(num_blocks)
    interior = list(range(edge, num_blocks - edge)) or list(range(num_blocks))
    n = len(interior)
    return tuple(sorted(interior[int((j + 0.5) * n / k)] for j in range(k)))


def default_span(num_blocks: int, to_layers: int) -> tuple[int, int]:
    """Sequential mode's default: the N - L blocks ending right before the last ``edge`` blocks.

    Returns:
        ``(a, b)``, half-open: blocks ``a .. b - 1`` are repeated.

    Raises:
        ExtendError: when N - L blocks do not fit between the first and last ``edge`` blocks.
    """
    k = _check_growth(num_blocks, to_layers)
    edge = edge_blocks(num_blocks)
    end = num_blocks - edge
    start = end - k
    if start < edge:
        raise ExtendError(
            f"the default sequential span of {k} blocks does not fit between the first and last {edge} of "
            f"{num_blocks} blocks; give --span a:b, use --mode block, or extend less"
        )
    return start, end


def llama_pro_default_blocks(num_blocks: int, to_layers: int) -> tuple[int, ...]:
    """LLaMA Pro's interleaving: a copy of the last block of each of N - L equal groups.

    With L = 32 and 8 copies (LLaMA Pro-8B) the groups are 4 blocks and the copies
    follow blocks 3, 7, ..., 31. When L is not a multiple of N - L the group
    ends are ``floor((j + 1) * L / k) - 1``.

    Raises:
        ExtendError: when more copies than blocks are asked for (N > 2L).
    """
    k = _check_growth(num_blocks, to_layers)
    if k > num_blocks:
        raise ExtendError(
            f"LLaMA Pro's default inserts at most one copy per block ({num_blocks} blocks) but {k} are needed; "
            "give --blocks, listing a block twice to copy it twice"
        )
    return tuple((j + 1) * num_blocks // k - 1 for j in range(k))


# ----------------------------------------------------------- expansions
def block_expansion(num_blocks: int, to_layers: int, blocks: tuple[int, ...]) -> Expansion:
    """Block mode: each listed block gets one repeat right after itself (or after its earlier repeats).

    Args:
        num_blocks: depth L of the source model.
        to_layers: target depth N.
        blocks: the blocks to repeat, N - L entries; a block listed twice is repeated twice.

    Raises:
        ExtendError: on a block out of range or a count that is not N - L.
    """
    k = _check_growth(num_blocks, to_layers)
    bad = [b for b in blocks if not 0 <= b < num_blocks]
    if bad:
        raise ExtendError(f"--blocks {bad} are out of range; the model has blocks 0..{num_blocks - 1}")
    if len(blocks) != k:
        raise ExtendError(
            f"--blocks lists {len(blocks)} blocks but going from {num_blocks} to {to_layers} adds {k} positions; "
            f"list exactly {k} (a block listed twice is repeated twice)"
        )
    sources: list[int] = []
    new: list[bool] = []
    for b in range(num_blocks):
        sources.append(b)
        new.append(False)
        repeats = blocks.count(b)
        sources += [b] * repeats
        new += [True] * repeats
    return Expansion(tuple(sources), tuple(new), num_blocks)


def span_expansion(num_blocks: int, to_layers: int, span: tuple[int, int]) -> Expansion:
    """Sequential mode: the half-open span ``a:b`` runs twice in a row, the second time as new positions.

    Raises:
        ExtendError: on a span out of range, empty, or whose length is not N - L.
    """
    k = _check_growth(num_blocks, to_layers)
    a, b = span
    if not 0 <= a < b <= num_blocks:
        raise ExtendError(
            f"--span {a}:{b} is not a non-empty half-open range inside 0:{num_blocks} (a:b repeats blocks a..b-1)"
        )
    if b - a != k:
        raise ExtendError(
            f"--span {a}:{b} repeats {b - a} blocks but going from {num_blocks} to {to_layers} adds {k}; "
            f"give a span of exactly {k} blocks (half-open: a:b repeats blocks a..b-1)"
        )
    sources = list(range(b)) + list(range(a, b)) + list(range(b, num_blocks))
    new = [False] * b + [True] * k + [False] * (num_blocks - b)
    return Expansion(tuple(sources), tuple(new), num_blocks)


def solar_overlap(num_blocks: int, to_layers: int, overlap: int | None = None) -> int:
    """SOLAR depth up-scaling arithmetic: N = 2 (L - m).

    Args:
        num_blocks: depth L of the source model.
        to_layers: target depth N.
        overlap: m, the blocks dropped at the seam from each copy; computed as
            ``L - N / 2`` when None.

    Returns:
        m, with ``0 <= m < L / 2`` (m = 0 stacks two whole copies).

    Raises:
        ExtendError: when N and m do not satisfy ``N = 2 (L - m)`` with ``L < N <= 2L``.
    """
    _check_growth(num_blocks, to_layers)
    if overlap is None:
        if to_layers % 2 or to_layers > 2 * num_blocks:
            raise ExtendError(
                f"SOLAR makes 2(L - m) blocks, an even number up to {2 * num_blocks} for L = {num_blocks}; "
                f"--to-layers {to_layers} is not one (e.g. {2 * num_blocks - 2} for m = 1)"
            )
        return num_blocks - to_layers // 2
    if not 0 <= overlap < num_blocks / 2:
        raise ExtendError(
            f"--solar-overlap {overlap} must be in 0..{(num_blocks - 1) // 2} so that 2(L - m) exceeds L = {num_blocks}"
        )
    if to_layers != 2 * (num_blocks - overlap):
        raise ExtendError(
            f"SOLAR with L = {num_blocks} and m = {overlap} makes 2(L - m) = {2 * (num_blocks - overlap)} blocks, "
            f"not --to-layers {to_layers}; change one of them or drop --solar-overlap"
        )
    return overlap


def solar_expansion(num_blocks: int, to_layers: int, overlap: int | None = None) -> Expansion:
    """SOLAR (Kim et al. 2023, Sec. 2.1): blocks ``0 .. L-m-1`` then ``m .. L-1``; the second copy is new."""
    m = solar_overlap(num_blocks, to_layers, overlap)
    first = list(range(num_blocks - m))
    second = list(range(m, num_blocks))
    return Expansion(tuple(first + second), (False,) * len(first) + (True,) * len(second), num_blocks)


# ------------------------------------------------------------------ plan
def flexigpt_plan(
    expansion: Expansion,
    lora_rank: int,
    lora_targets: tuple[str, ...],
    out_norm: bool,
) -> Plan:
    """FlexiGPT's extension plan: new positions reuse their source block and own an adapter and output norms.

    The first occurrence of every block stays a plain position; each added one
    runs the same stored weights plus its own LoRA (rank ``lora_rank`` on
    ``lora_targets``, none when the rank is 0) and, with ``out_norm``, its own
    output norms (FlexiGPT Sec. 3.3-3.4).
    """
    targets = tuple(lora_targets) if lora_rank > 0 else ()
    rank = lora_rank if targets else 0
    positions = tuple(
        Position(s, lora_rank=rank, lora_targets=targets, out_norm=out_norm) if is_new else Position(s)
        for s, is_new in zip(expansion.sources, expansion.new)
    )
    return Plan(positions, expansion.num_source_blocks)
