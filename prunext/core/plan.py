"""The plan: one validated, serialisable description of a model's depth.

A plan lists positions in execution order. Each position names the base block
whose weights it runs (``source``, numbered as in the model the plan was made
from) and what the position owns on top of those weights::

    positions:  P0   P1   P2   P3    P4   P5          base blocks, stored once:
    source:     B0   B1   B2   B1    B4   B2          B0  B1  B2  B4
    owns:       -    -    -    LoRA  -    LoRA        (B3 was pruned)
                               +norm      +norm

The first position that runs a base block is its *home*: the block's weights
are stored under that position's keys. Later positions reuse the very same
``nn.Parameter`` objects (see :mod:`prunext.core.model`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from prunext.errors import UserError

#: The seven logical linears of a block, in the order the block runs them. Every family has
#: them; where a family fuses some (Phi-3's ``qkv_proj``, ``gate_up_proj``) they are the fused
#: weight's parts (:mod:`prunext.core.families` says where each one is).
LINEAR_NAMES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

PLAN_VERSION = 1


class PlanError(UserError):
    """A plan that cannot describe a model."""


@dataclass(frozen=True)
class Position:
    """One position of the executed depth.

    Args:
        source: index of the base block whose weights this position runs.
        lora_rank: rank of this position's own LoRA adapters (0 = none).
        lora_targets: which of :data:`LINEAR_NAMES` carry an adapter.
        lora_alpha: LoRA scale numerator; the update is ``(alpha / rank) * B @ A``.
            ``None`` means ``alpha = rank`` (scale 1), which SVD initialisation needs.
        out_norm: whether the position normalises the attention-branch and
            MLP-branch outputs before each residual add (FlexiGPT Sec. 3.3).
    """

    source: int
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    lora_alpha: float | None = None
    out_norm: bool = False

    @property
    def has_lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def lora_scale(self) -> float:
        if not self.has_lora:
            return 0.0
        return (self.lora_alpha if self.lora_alpha is not None else self.lora_rank) / self.lora_rank

    @property
    def is_plain(self) -> bool:
        """True when the position owns nothing beyond its base block."""
        return not self.has_lora and not self.out_norm


@dataclass(frozen=True)
class Plan:
    """The depth of a model: positions in execution order over stored base blocks.

    Args:
        positions: the executed positions.
        num_source_blocks: how many blocks the model the plan was made from had;
            ``source`` indices refer to that numbering.
    """

    positions: tuple[Position, ...]
    num_source_blocks: int
    version: int = field(default=PLAN_VERSION)

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", tuple(self.positions))
        self.validate()

    # ------------------------------------------------------------------ build
    @classmethod
    def identity(cls, num_blocks: int) -> Plan:
        """The plan of an unmodified model: position i runs block i, owns nothing."""
        return cls(tuple(Position(i) for i in range(num_blocks)), num_blocks)

    # ------------------------------------------------------------- questions
    def __len__(self) -> int:
        return len(self.positions)

    @property
    def base_blocks(self) -> tuple[int, ...]:
        """Stored base blocks, in the order of their home positions."""
        return tuple(dict.fromkeys(p.source for p in self.positions))

    @property
    def homes(self) -> dict[int, int]:
        """Map base block -> the first position that runs it (where it is stored)."""
        homes: dict[int, int] = {}
        for i, p in enumerate(self.positions):
            homes.setdefault(p.source, i)
        return homes

    def home_of(self, position: int) -> int:
        """The position whose keys store the weights that ``position`` runs."""
        return self.homes[self.positions[position].source]

    @property
    def is_identity(self) -> bool:
        return self.num_source_blocks == len(self.positions) and all(
            p.source == i and p.is_plain for i, p in enumerate(self.positions)
        )

    @property
    def has_out_norm(self) -> bool:
        return any(p.out_norm for p in self.positions)

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`PlanError` when the plan is not self-consistent."""
        if self.version != PLAN_VERSION:
            raise PlanError(
                f"plan version {self.version} is not supported by this prunext (expects {PLAN_VERSION}); "
                "upgrade prunext or re-create the model"
            )
        if self.num_source_blocks < 1:
            raise PlanError("a plan needs num_source_blocks >= 1")
        if not self.positions:
            raise PlanError("a plan needs at least one position; this one would leave no block")
        for i, p in enumerate(self.positions):
            if not isinstance(p, Position):
                raise PlanError(f"position {i} is {type(p).__name__}, not a Position")
            if not 0 <= p.source < self.num_source_blocks:
                raise PlanError(
                    f"position {i} runs block {p.source}, but the source model has blocks 0..{self.num_source_blocks - 1}"
                )
            if p.lora_rank < 0:
                raise PlanError(f"position {i} has a negative LoRA rank {p.lora_rank}")
            unknown = set(p.lora_targets) - set(LINEAR_NAMES)
            if unknown:
                raise PlanError(f"position {i} targets unknown linears {sorted(unknown)}; choose from {LINEAR_NAMES}")
            if len(set(p.lora_targets)) != len(p.lora_targets):
                raise PlanError(f"position {i} lists a LoRA target twice: {p.lora_targets}")
            if (p.lora_rank > 0) != bool(p.lora_targets):
                raise PlanError(f"position {i}: a LoRA rank needs targets and targets need a rank > 0")
            if p.lora_alpha is not None and p.lora_alpha <= 0:
                raise PlanError(f"position {i} has lora_alpha {p.lora_alpha}; it must be positive")

    # --------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        """A JSON-ready dict; compact (positions omit fields at their defaults)."""
        defaults = asdict(Position(0))
        positions = []
        for p in self.positions:
            d = {k: v for k, v in asdict(p).items() if k == "source" or v != defaults[k]}
            if "lora_targets" in d:
                d["lora_targets"] = list(d["lora_targets"])
            positions.append(d)
        return {"version": self.version, "num_source_blocks": self.num_source_blocks, "positions": positions}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """Inverse of :meth:`to_dict`; raises :class:`PlanError` on malformed input."""
        try:
            positions = tuple(
                Position(**{**p, "lora_targets": tuple(p.get("lora_targets", ()))}) for p in d["positions"]
            )
            return cls(positions, int(d["num_source_blocks"]), int(d.get("version", PLAN_VERSION)))
        except (KeyError, TypeError) as e:
            raise PlanError(f"malformed plan in config.json ({e}); re-create the model with prunext") from e

    def describe(self) -> str:
        """A table, one row per position, for logs and reports."""
        rows = [f"{'pos':>4}  {'block':>5}  {'stored at':>9}  {'lora':>12}  out-norm"]
        for i, p in enumerate(self.positions):
            home = self.home_of(i)
            stored = "here" if home == i else f"pos {home}"
            lora = f"r={p.lora_rank} x{len(p.lora_targets)}" if p.has_lora else "-"
            rows.append(f"{i:>4}  {p.source:>5}  {stored:>9}  {lora:>12}  {'yes' if p.out_norm else '-'}")
        return "\n".join(rows)
