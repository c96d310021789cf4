"""Layouts of the extend methods: explicit expected plans, documented defaults, SOLAR arithmetic."""

from __future__ import annotations

import pytest

from prunext.core.plan import LINEAR_NAMES, Plan, Position
from prunext.errors import UserError
from prunext.extend import plans
from prunext.extend.plans import Expansion, ExtendError


def _pos(source: int, rank: int = 2, targets=LINEAR_NAMES, out_norm: bool = True) -> Position:
    return Position(source, lora_rank=rank, lora_targets=tuple(targets), out_norm=out_norm)


# --------------------------------------------------------------- block mode
def test_block_mode_repeats_each_listed_block_right_after_itself():
    expansion = plans.block_expansion(4, 6, (1, 2))
    plan = plans.flexigpt_plan(expansion, 2, LINEAR_NAMES, out_norm=True)
    assert plan == Plan((Position(0), Position(1), _pos(1), Position(2), _pos(2), Position(3)), 4)


def test_block_listed_twice_is_repeated_twice_in_a_row():
    expansion = plans.block_expansion(4, 7, (2, 0, 2))
    assert expansion.sources == (0, 0, 1, 2, 2, 2, 3)
    assert expansion.new == (False, True, False, False, True, True, False)
    plan = plans.flexigpt_plan(expansion, 3, ("q_proj", "v_proj"), out_norm=False)
    adapted = _pos(0, 3, ("q_proj", "v_proj"), False)
    assert plan.positions[1] == adapted
    assert plan.homes == {0: 0, 1: 2, 2: 3, 3: 6}


def test_rank_zero_without_norms_makes_plain_shared_repeats():
    plan = plans.flexigpt_plan(plans.block_expansion(3, 4, (1,)), 0, LINEAR_NAMES, out_norm=False)
    assert plan == Plan((Position(0), Position(1), Position(1), Position(2)), 3)


@pytest.mark.parametrize(
    ("blocks", "fragment"),
    [((1,), "lists 1 blocks but going from 4 to 6 adds 2"), ((1, 4), "out of range"), ((-1, 2), "out of range")],
)
def test_block_mode_refuses_wrong_count_or_range(blocks, fragment):
    with pytest.raises(ExtendError, match=fragment):
        plans.block_expansion(4, 6, blocks)


def test_extend_error_is_a_user_error():
    assert issubclass(ExtendError, UserError)


# ---------------------------------------------------------- sequential mode
def test_sequential_mode_repeats_the_half_open_span_after_itself():
    expansion = plans.span_expansion(5, 7, (1, 3))
    plan = plans.flexigpt_plan(expansion, 2, LINEAR_NAMES, out_norm=True)
    expected = (Position(0), Position(1), Position(2), _pos(1), _pos(2), Position(3), Position(4))
    assert plan == Plan(expected, 5)


def test_sequential_span_may_end_at_the_last_block():
    assert plans.span_expansion(3, 5, (1, 3)).sources == (0, 1, 2, 1, 2)


@pytest.mark.parametrize(
    ("span", "fragment"),
    [((1, 2), "repeats 1 blocks but going from 5 to 7 adds 2"), ((3, 6), "not a non-empty"), ((2, 2), "not a non-empty")],
)
def test_sequential_mode_refuses_bad_spans(span, fragment):
    with pytest.raises(ExtendError, match=fragment):
        plans.span_expansion(5, 7, span)


# ----------------------------------------------------------------- defaults
def test_growth_must_exceed_current_depth():
    for fn in (plans.default_blocks, plans.default_span, plans.llama_pro_default_blocks):
        with pytest.raises(ExtendError, match="must exceed the model's current depth of 4"):
            fn(4, 4)


@pytest.mark.parametrize(("num_blocks", "edge"), [(2, 1), (4, 1), (19, 1), (20, 2), (22, 2), (30, 3), (32, 3)])
def test_edge_blocks(num_blocks, edge):
    assert plans.edge_blocks(num_blocks) == edge


def test_default_blocks_spread_over_the_interior():
    # SmolLM2-135M 30 -> 40: edge 3, interior blocks 3..26 (24 blocks), 10 repeats at floor((j + .5) * 2.4) + 3
    assert plans.default_blocks(30, 40) == (4, 6, 9, 11, 13, 16, 18, 21, 23, 25)
    # TinyLlama 22 -> 36 (the paper's setting): edge 2, interior 2..19, 14 repeats
    blocks = plans.default_blocks(22, 36)
    assert len(blocks) == 14 and min(blocks) >= 2 and max(blocks) <= 19 and len(set(blocks)) == 14
    # tiny: interior 1..2
    assert plans.default_blocks(4, 6) == (1, 2)


def test_default_blocks_repeat_interior_blocks_evenly_when_more_are_needed():
    # 4 blocks -> interior (1, 2); 4 repeats put 2 on each
    assert plans.default_blocks(4, 8) == (1, 1, 2, 2)


def test_default_span_ends_before_the_last_edge_blocks():
    assert plans.default_span(30, 40) == (17, 27)
    assert plans.default_span(22, 36) == (6, 20)
    assert plans.default_span(4, 6) == (1, 3)


def test_default_span_refuses_when_it_would_touch_the_first_blocks():
    with pytest.raises(ExtendError, match="does not fit between the first and last 1 of 4 blocks"):
        plans.default_span(4, 7)


def test_llama_pro_default_interleaves_one_copy_per_group():
    # LLaMA Pro-8B: 32 blocks, 8 copies, groups of 4 -> after blocks 3, 7, ..., 31
    assert plans.llama_pro_default_blocks(32, 40) == (3, 7, 11, 15, 19, 23, 27, 31)
    assert plans.llama_pro_default_blocks(4, 6) == (1, 3)
    # not a multiple: group ends at floor((j + 1) * 30 / 4) - 1
    assert plans.llama_pro_default_blocks(30, 34) == (6, 14, 21, 29)
    with pytest.raises(ExtendError, match="at most one copy per block"):
        plans.llama_pro_default_blocks(4, 9)


# -------------------------------------------------------------------- SOLAR
@pytest.mark.parametrize(
    ("num_blocks", "to_layers", "overlap", "expected"),
    [(32, 48, None, 8), (32, 48, 8, 8), (4, 6, None, 1), (4, 8, None, 0), (5, 8, 1, 1), (22, 36, None, 4)],
)
def test_solar_overlap_valid(num_blocks, to_layers, overlap, expected):
    assert plans.solar_overlap(num_blocks, to_layers, overlap) == expected


@pytest.mark.parametrize(
    ("num_blocks", "to_layers", "overlap", "fragment"),
    [
        (32, 47, None, "not one"),  # odd
        (4, 10, None, "up to 8"),  # beyond 2L
        (4, 4, None, "must exceed"),  # no growth
        (32, 48, 7, "makes 2\\(L - m\\) = 50 blocks, not --to-layers 48"),
        (4, 6, 2, "must be in 0..1"),  # m >= L/2 gives no growth
        (4, 6, -1, "must be in 0..1"),
    ],
)
def test_solar_overlap_invalid(num_blocks, to_layers, overlap, fragment):
    with pytest.raises(ExtendError, match=fragment):
        plans.solar_overlap(num_blocks, to_layers, overlap)


def test_solar_expansion_drops_m_blocks_at_the_seam():
    expansion = plans.solar_expansion(5, 8)  # m = 1
    assert expansion == Expansion((0, 1, 2, 3, 1, 2, 3, 4), (False,) * 4 + (True,) * 4, 5)


def test_expansion_describe_marks_added_positions():
    lines = plans.block_expansion(2, 3, (0,)).describe("copy").splitlines()
    assert lines[1].split() == ["0", "0", "-"]
    assert lines[2].split() == ["1", "0", "copy"]
