"""The native config: a base family's config plus the plan (``model_type`` "prunext").

It lives apart from the model so a folder's configuration code can be loaded
without the model code, as transformers' ``AutoConfig`` does
(:mod:`prunext.core.portable`).
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from prunext.core.families import check_family, family_of
from prunext.core.plan import Plan, PlanError

class PrunextConfig(PretrainedConfig):
    """The base model's config plus the plan.

    All fields of the base config are kept at top level (so code that reads
    ``config.hidden_size`` keeps working), except that ``num_hidden_layers`` and
    ``layer_types`` describe the *positions*. ``base_model_type`` names the
    family and ``prunext_plan`` holds :meth:`Plan.to_dict`.
    """

    model_type = "prunext"

    def __init__(self, base_model_type: str = "llama", prunext_plan: dict | None = None, **kwargs) -> None:
        self.base_model_type = base_model_type
        self.prunext_plan = prunext_plan
        super().__init__(**kwargs)

    @property
    def plan(self) -> Plan:
        if self.prunext_plan is None:
            return Plan.identity(self.num_hidden_layers)
        return Plan.from_dict(self.prunext_plan)

    @classmethod
    def from_base(cls, base: PretrainedConfig, plan: Plan) -> PrunextConfig:
        """Combine a base family config (describing the source blocks) with a plan."""
        check_family(base.model_type)
        if plan.num_source_blocks != base.num_hidden_layers:
            raise PlanError(
                f"the plan was made for {plan.num_source_blocks} blocks but the model has {base.num_hidden_layers}"
            )
        fields = _config_fields(base)
        fields.update(family_of(base.model_type).position_fields(base, [p.source for p in plan.positions]))
        return cls(base_model_type=base.model_type, prunext_plan=plan.to_dict(), **fields)

    def base_config(self) -> PretrainedConfig:
        """The family config with one layer per *position* (what the inner HF model is built with)."""
        fields = _config_fields(self)
        for key in ("base_model_type", "prunext_plan"):
            fields.pop(key, None)
        return AutoConfig.for_model(self.base_model_type, **fields)


def _config_fields(config: PretrainedConfig) -> dict:
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "quantization_config", "auto_map"):
        fields.pop(key, None)
    return fields
