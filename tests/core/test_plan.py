import pytest

from prunext.core.plan import LINEAR_NAMES, Plan, PlanError, Position


def test_identity_plan_round_trips_and_is_identity():
    plan = Plan.identity(4)
    assert plan.is_identity
    assert plan.base_blocks == (0, 1, 2, 3)
    assert Plan.from_dict(plan.to_dict()) == plan


def test_shared_plan_homes_and_serialisation():
    plan = Plan(
        (
            Position(0),
            Position(1),
            Position(2),
            Position(1, lora_rank=4, lora_targets=LINEAR_NAMES, out_norm=True),
            Position(4),
            Position(2, lora_rank=2, lora_targets=("q_proj",), lora_alpha=4.0),
        ),
        num_source_blocks=5,
    )
    assert plan.base_blocks == (0, 1, 2, 4)
    assert plan.homes == {0: 0, 1: 1, 2: 2, 4: 4}
    assert plan.home_of(3) == 1 and plan.home_of(5) == 2
    assert not plan.is_identity and plan.has_out_norm
    assert plan.positions[5].lora_scale == 2.0
    assert plan.positions[3].lora_scale == 1.0
    again = Plan.from_dict(plan.to_dict())
    assert again == plan
    assert "pos 1" in plan.describe()


@pytest.mark.parametrize(
    "positions, n, match",
    [
        ((), 3, "leave no block"),
        ((Position(3),), 3, "runs block 3"),
        ((Position(0, lora_rank=2),), 1, "needs targets"),
        ((Position(0, lora_targets=("q_proj",)),), 1, "needs targets"),
        ((Position(0, lora_rank=2, lora_targets=("qkv",)),), 1, "unknown linears"),
        ((Position(0, lora_rank=2, lora_targets=("q_proj", "q_proj")),), 1, "twice"),
        ((Position(0, lora_rank=-1),), 1, "negative"),
    ],
)
def test_invalid_plans_are_refused(positions, n, match):
    with pytest.raises(PlanError, match=match):
        Plan(positions, n)


def test_malformed_dict_is_refused_with_plan_error():
    with pytest.raises(PlanError, match="malformed plan"):
        Plan.from_dict({"positions": [{"src": 0}], "num_source_blocks": 1})
