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

Inside a position that owns output norms (FlexiGPT Sec. 3.3), for a pre-norm family::

    h = x + attn_out_norm(self_attn(input_layernorm(x)))
    y = h + mlp_out_norm(mlp(post_attention_layernorm(h)))

Sandwich and post-norm families (Gemma, OLMo-2) run the position's own
``attn_out_norm`` / ``mlp_out_norm`` in place of their post-branch norms; where
the norms sit in each family is :mod:`prunext.core.families`.

Every position is its own module with its own ``layer_idx`` (so the KV cache
keeps one slot per position), but a reused block's tensors are the *same*
``nn.Parameter`` objects as at the block's home position. Registering the
shared Parameter in each consumer module (as PEFT's
``clone_module(share_weights=True)`` does) is what lets DeepSpeed ZeRO-3 gather
it in every module that runs it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from prunext.core.config import PrunextConfig
from prunext.core.families import Family, Slot, family_of
from prunext.core.modules import LoRALinear, OutputNorm
from prunext.core.plan import Plan, Position
from prunext.errors import ModelError

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


class PositionBlockMixin:
    """Turns a family's decoder layer into a plan position (see the module docstring).

    ``family`` (a class attribute set by :func:`position_block_class`) says where the block's
    norms are and what a position's output norms are (:mod:`prunext.core.families`).
    """

    family: Family

    def _own_parts(self, config: PretrainedConfig, position: Position, out_norm_init: float) -> None:
        slots = self.family.slots(config)
        for path, parts in lora_modules(slots, position.lora_targets).items():
            parent_name, leaf = path.split(".")
            parent = getattr(self, parent_name)
            plain: nn.Linear = getattr(parent, leaf)
            adapted = LoRALinear(
                plain.in_features,
                plain.out_features,
                bias=plain.bias is not None,
                rank=position.lora_rank,
                scale=position.lora_scale,
                parts=parts,
                device=plain.weight.device,
                dtype=plain.weight.dtype,
            )
            setattr(parent, leaf, adapted)
        self.attn_out_norm = self.mlp_out_norm = None
        if position.out_norm:
            eps = getattr(config, "rms_norm_eps", 1e-5)
            some = next(self.parameters())
            factory = {"device": some.device, "dtype": some.dtype}
            kind = self.family.out_norm_kind
            self.attn_out_norm = OutputNorm(config.hidden_size, eps=eps, init_scale=out_norm_init, kind=kind, **factory)
            self.mlp_out_norm = OutputNorm(config.hidden_size, eps=eps, init_scale=out_norm_init, kind=kind, **factory)

    def start_out_norms(self) -> None:
        """Start a sandwich or post-norm position's output norms at ``init_scale`` times the gain of the block it runs.

        The position's post-branch norms are the shared block's, so this is called once the block's
        weights are in place (:func:`prunext.core.checkpoint.build_from_hf`). Pre-norm families
        start at ``init_scale`` (FlexiGPT's LayerNorm) and are left as they are.
        """
        if self.attn_out_norm is None or not self.family.out_norm_replaces_post_norm:
            return
        for branch, norm in (("attn", self.attn_out_norm), ("mlp", self.mlp_out_norm)):
            shared = getattr(self, self.family.post_norm(branch)).weight
            norm.reset_scale(gain=self.family.norm_offset + shared.detach().float())

    def _branch_output(self, branch: str, out: torch.Tensor) -> torch.Tensor:
        """A branch output as the residual add receives it: through the position's output norm, else the family's."""
        own = self.attn_out_norm if branch == "attn" else self.mlp_out_norm
        post = self.family.post_norm(branch)
        if own is not None:
            out = own(out)  # added on a pre-norm block, in the post-norm's place on the others
        elif post is not None:
            out = getattr(self, post)(out)
        if self.family.residual_dropout is not None:
            out = getattr(self, self.family.residual_dropout[0 if branch == "attn" else 1])(out)
        return out

    def forward(
        self,
        hidden_states: torch.Tensor,  # (batch, seq, hidden)
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,  # the KV cache under CACHE_ARG, and attention backend arguments
    ) -> torch.Tensor:
        family = self.family
        residual = hidden_states
        if family.pre_attn_norm is not None:
            hidden_states = getattr(self, family.pre_attn_norm)(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + self._branch_output("attn", hidden_states)

        residual = hidden_states
        if family.pre_mlp_norm is not None:
            hidden_states = getattr(self, family.pre_mlp_norm)(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + self._branch_output("mlp", hidden_states)  # (batch, seq, hidden)


def lora_modules(slots: dict[str, Slot], targets) -> dict[str, tuple[tuple[int, int], ...] | None]:
    """``{module path: parts}`` of the modules that carry LoRA for ``targets`` (logical linears).

    ``parts`` is None for an unfused module, else the ``(first row, rows)`` of each targeted
    part of the fused module, ascending (:class:`prunext.core.modules.LoRALinear`).
    """
    modules: dict[str, list[Slot]] = {}
    for name in targets:
        modules.setdefault(slots[name].path, []).append(slots[name])
    return {
        path: None if not group[0].fused else tuple(sorted((s.start, s.rows) for s in group))
        for path, group in modules.items()
    }


@functools.cache
def position_block_class(model_type: str) -> type:
    """``Prunext<Family>DecoderLayer``: the family's layer class plus :class:`PositionBlockMixin`.

    It subclasses the family's own layer so transformers' output recording
    (``output_hidden_states``) and gradient checkpointing treat it as a layer.
    """
    family = family_of(model_type)
    layer_cls = family.layer_cls()

    def __init__(self, config, layer_idx: int, position: Position, out_norm_init: float = DEFAULT_OUT_NORM_INIT):
        layer_cls.__init__(self, config, layer_idx)
        self._own_parts(config, position, out_norm_init)

    name = f"Prunext{layer_cls.__name__}"
    attrs = {"__init__": __init__, "__module__": __name__, "family": family}
    cls = type(name, (PositionBlockMixin, layer_cls), attrs)
    globals()[name] = cls  # so the class pickles by name
    return cls


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
        self.family = family_of(config.base_model_type)
        # The family's model without its own layers (they would be built only to be replaced), then the positions.
        positions, base_config.num_hidden_layers = base_config.num_hidden_layers, 0
        try:
            self.model = self.family.model_cls()(base_config)
        finally:
            base_config.num_hidden_layers = positions
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
        cap = self.family.softcap(self.config)
        if cap is not None:  # Gemma-2's final-logit softcapping, as its ForCausalLM does
            logits = torch.tanh(logits / cap) * cap
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
