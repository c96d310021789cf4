"""The weight-tied block graph as a Hugging Face model.

``PrunextForCausalLM`` keeps the module layout of the base family
(``model.embed_tokens``, ``model.layers[i]``, ``model.norm``, ``lm_head``), so
generation, lm-eval and PEFT work on it unchanged. ``model.layers[i]`` is
*position* i of the plan::

    input ─► P0 ─► P1 ─► P2 ─► P3 ─► P4 ─► P5 ─► norm ─► lm_head
             │     │     │     │     │     │
             B0    B1    B2    B1    B4    B2      base weights: one nn.Parameter
                               +A/B        +A/B    per tensor, registered in every
                               +norms      +norms  position module that runs it

Inside a position that owns output norms (FlexiGPT Sec. 3.3)::

    h = x + attn_out_norm(self_attn(input_layernorm(x)))
    y = h + mlp_out_norm(mlp(post_attention_layernorm(h)))

Every position is its own module with its own ``layer_idx`` (so the KV cache
keeps one slot per position), but a reused block's tensors are the *same*
``nn.Parameter`` objects as at the block's home position. Registering the
shared Parameter in each consumer module (as PEFT's
``clone_module(share_weights=True)`` does) is what lets DeepSpeed ZeRO-3 gather
it in every module that runs it.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from prunext.core.modules import LoRALinear, OutputNorm
from prunext.core.plan import LINEAR_PATHS, Plan, PlanError, Position
from prunext.errors import ModelError

#: Families whose decoder layer is the pre-norm Llama block this module rebuilds.
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "LlamaDecoderLayer",
    "mistral": "MistralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "qwen3": "Qwen3DecoderLayer",
}

#: Parameter-name fragments that a position owns; everything else in a block is base weight.
OWNED_PARTS: tuple[str, ...] = ("lora_A", "lora_B", "attn_out_norm.", "mlp_out_norm.")

DEFAULT_OUT_NORM_INIT = 1e-2
#: The KV-cache argument's name in the installed transformers: ``cache`` since it was renamed in 5.x, before that
#: ``past_key_values`` (passing the old name to a newer version warns on every forward).
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def is_owned(param_name: str) -> bool:
    """True if a parameter name (relative to a block or full) belongs to a position, not a base block.

    This is the one place that decides what is an adapter-side parameter.
    """
    return any(part in param_name for part in OWNED_PARTS)


def check_family(model_type: str) -> None:
    if model_type not in SUPPORTED_FAMILIES:
        raise ModelError(
            f"model type '{model_type}' is not supported; prunext handles decoder-only models with "
            f"model.layers of pre-norm blocks: {', '.join(SUPPORTED_FAMILIES)}"
        )


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
        fields["num_hidden_layers"] = len(plan)
        if fields.get("layer_types") is not None:
            fields["layer_types"] = [base.layer_types[p.source] for p in plan.positions]
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


class PositionBlockMixin:
    """Turns a family's decoder layer into a plan position (see the module docstring)."""

    def _own_parts(self, config: PretrainedConfig, position: Position, out_norm_init: float) -> None:
        for name in position.lora_targets:
            parent_name, leaf = LINEAR_PATHS[name].split(".")
            parent = getattr(self, parent_name)
            plain: nn.Linear = getattr(parent, leaf)
            adapted = LoRALinear(
                plain.in_features,
                plain.out_features,
                bias=plain.bias is not None,
                rank=position.lora_rank,
                scale=position.lora_scale,
                device=plain.weight.device,
                dtype=plain.weight.dtype,
            )
            setattr(parent, leaf, adapted)
        self.attn_out_norm = self.mlp_out_norm = None
        if position.out_norm:
            eps = getattr(config, "rms_norm_eps", 1e-5)
            factory = {"device": self.input_layernorm.weight.device, "dtype": self.input_layernorm.weight.dtype}
            self.attn_out_norm = OutputNorm(config.hidden_size, eps=eps, init_scale=out_norm_init, **factory)
            self.mlp_out_norm = OutputNorm(config.hidden_size, eps=eps, init_scale=out_norm_init, **factory)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (batch, seq, hidden)
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,  # the KV cache under CACHE_ARG, and attention backend arguments
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if self.attn_out_norm is not None:
            hidden_states = self.attn_out_norm(hidden_states)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        if self.mlp_out_norm is not None:
            hidden_states = self.mlp_out_norm(hidden_states)
        return residual + hidden_states  # (batch, seq, hidden)


@functools.cache
def position_block_class(model_type: str) -> type:
    """``Prunext<Family>DecoderLayer``: the family's layer class plus :class:`PositionBlockMixin`.

    It subclasses the family's own layer so transformers' output recording
    (``output_hidden_states``) and gradient checkpointing treat it as a layer.
    """
    check_family(model_type)
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    layer_cls = getattr(module, SUPPORTED_FAMILIES[model_type])

    def __init__(self, config, layer_idx: int, position: Position, out_norm_init: float = DEFAULT_OUT_NORM_INIT):
        layer_cls.__init__(self, config, layer_idx)
        self._own_parts(config, position, out_norm_init)

    name = f"Prunext{layer_cls.__name__}"
    cls = type(name, (PositionBlockMixin, layer_cls), {"__init__": __init__, "__module__": __name__})
    globals()[name] = cls  # so the class pickles by name
    return cls


def _inner_model_class(model_type: str) -> type:
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, SUPPORTED_FAMILIES[model_type].replace("DecoderLayer", "Model"))


def _set_parameter(root: nn.Module, name: str, param: nn.Parameter) -> None:
    *path, leaf = name.split(".")
    module = root
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, param)


class PrunextForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose depth is a :class:`Plan` over weight-shared base blocks.

    Build one from a Hugging Face model with
    :func:`prunext.core.checkpoint.build_from_hf`. transformers' own
    ``from_pretrained`` / ``save_pretrained`` load and save it: the shared
    tensors are its tied weights (:meth:`position_tied_keys`), stored once.
    """

    config_class = PrunextConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = [CACHE_ARG]

    def __init__(self, config: PrunextConfig, out_norm_init: float = DEFAULT_OUT_NORM_INIT) -> None:
        super().__init__(config)
        plan = config.plan
        base_config = config.base_config()
        self.model = _inner_model_class(config.base_model_type)(base_config)
        block_cls = position_block_class(config.base_model_type)
        self.model.layers = nn.ModuleList(
            block_cls(base_config, i, p, out_norm_init) for i, p in enumerate(plan.positions)
        )
        self._no_split_modules = [block_cls.__name__]
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_positions()
        self._tied_weights_keys = {**type(self)._tied_weights_keys, **self.position_tied_keys()}
        self.post_init()

    # ------------------------------------------------------------- sharing
    @property
    def plan(self) -> Plan:
        return self.config.plan

    def tie_positions(self) -> None:
        """Point every reused block's tensors at the home position's Parameters.

        Called after construction and after any weight load that may have given
        positions their own tensors; afterwards each base tensor exists once.
        """
        plan = self.plan
        for i in range(len(plan)):
            home = plan.home_of(i)
            if home == i:
                continue
            for name, param in self.model.layers[home].named_parameters():
                if not is_owned(name):
                    _set_parameter(self.model.layers[i], name, param)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, OutputNorm):
            module.reset_scale()
            return
        super()._init_weights(module)
        if isinstance(module, LoRALinear):
            module.reset_lora()

    # ------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # (batch, seq)
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE_ARG: past_key_values if cache is None else cache},  # either name, as transformers passes it
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (batch, seq, hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])  # (batch, seq', vocab)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    # ------------------------------------------------------------ loading
    def position_tied_keys(self) -> dict[str, str]:
        """``{reused position's key: home position's key}`` for every base tensor a position shares.

        These are transformers' tied weights (``_tied_weights_keys``): ``save_pretrained``
        stores each shared tensor once under its home key, and ``from_pretrained`` ties the
        reused keys back to it, with any loading argument (``device_map``, ``dtype``, ...).
        """
        plan, tied = self.plan, {}
        for i in range(len(plan)):
            home = plan.home_of(i)
            if home != i:
                for name, _ in self.model.layers[home].named_parameters():
                    if not is_owned(name):
                        tied[f"model.layers.{i}.{name}"] = f"model.layers.{home}.{name}"
        return tied

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # transformers ties only when ``tie_word_embeddings``; shared positions are tied regardless.
        return {**super().get_expanded_tied_weights_keys(all_submodels), **self.position_tied_keys()}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' own loading (local folder or hub id, ``revision``, ``dtype``, ``device_map``,
        ``attn_implementation``, ...), made strict: a folder whose weights do not fit its plan is refused.

        Raises:
            ModelError: stored keys or shapes disagree with the plan, or a weights file is corrupt.
        """
        from safetensors import SafetensorError

        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        except SafetensorError as e:
            raise ModelError(
                f"the weights in {pretrained_model_name_or_path} are corrupt or truncated ({e}); re-create or re-copy the folder"
            ) from e
        except RuntimeError as e:
            if "ignore_mismatched_sizes" not in str(e):
                raise
            raise ModelError(
                f"the stored weights of {pretrained_model_name_or_path} do not fit the plan's shapes (see the report above); "
                "the folder is inconsistent"
            ) from e
        check_loading_info(info, kwargs.get("ignore_mismatched_sizes", False))
        return (model, info) if want_info else model


def check_loading_info(info: dict, ignore_mismatched_sizes: bool = False) -> None:
    """Refuse what transformers only warns about: a stored tensor missing, unexpected or of another shape.

    Raises:
        ModelError: naming a few of the keys.
    """

    def few(keys) -> str:
        keys = sorted(k if isinstance(k, str) else k[0] for k in keys)
        return f"{keys[:3]}{'...' if len(keys) > 3 else ''}"

    mismatched = [] if ignore_mismatched_sizes else info.get("mismatched_keys") or []
    if mismatched:
        raise ModelError(f"the stored weights do not fit the plan's shapes ({few(mismatched)}); the folder is inconsistent")
    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    if missing or unexpected:
        raise ModelError(
            "the plan in config.json disagrees with the stored weights "
            f"(missing {few(missing)}, unexpected {few(unexpected)}); the folder was edited or is from another model"
        )


def register() -> None:
    """Make ``AutoConfig``/``AutoModelForCausalLM`` know the native format (idempotent)."""
    try:
        AutoConfig.register(PrunextConfig.model_type, PrunextConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(PrunextConfig, PrunextForCausalLM)
    except ValueError:
        pass
