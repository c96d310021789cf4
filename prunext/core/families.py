"""The model families prunext builds on: one entry each, read by every path that needs to know one.

Three block shapes cover the eight families. ``ON`` is the output feature
normalization a position owns when its plan says so (FlexiGPT Sec. 3.3);
everything else is the family's own module, weights shared by every position
that runs the block::

    pre-norm   llama mistral qwen2 qwen3 phi3      h = x + ON(attn(input_layernorm(x)))
                                                   y = h + ON(mlp(post_attention_layernorm(h)))
               ON: a LayerNorm added on each branch output (FlexiGPT's own)

    sandwich   gemma2 gemma3_text                  h = x + POST_a(attn(input_layernorm(x)))
                                                   y = h + POST_m(mlp(pre_feedforward_layernorm(h)))
    post-norm  olmo2                               h = x + POST_a(attn(x))
                                                   y = h + POST_m(mlp(h))
               POST_a / POST_m = post_attention_layernorm / post_feedforward_layernorm.
               ON: the position's OWN RMSNorm in POST's place (not a second norm after it)

Sandwich and post-norm blocks already normalise each branch output with a
learned per-feature gain, which is what FlexiGPT's output norm adds to a
pre-norm block. There a position that owns output norms runs its own copy of
the post-branch norms instead of the shared ones: it is the same operator as
the family's (RMS over the hidden size, times a gain), so a pruned Gemma or
OLMo-2 model is still a plain model of its family (``convert --format hf``),
and it starts small as FlexiGPT asks: its gain is ``init_scale`` times the
gain of the block it runs. prunext stores that gain itself, not Gemma's
``w`` of ``1 + w``: a gain of 0 then means "branch closed" in every family,
``init_scale``, ``train --norm-open`` and the least-squares fit keep one
meaning, and converting to Gemma's own format subtracts the offset
(:attr:`Family.norm_offset`). docs/method.md, "Families", has the reasoning.

Fused linears (Phi-3's ``qkv_proj`` and ``gate_up_proj``) are handled on
their logical parts: distances, SVD initialisation and LoRA see ``q_proj``,
``k_proj``, ``v_proj``, ``gate_proj`` and ``up_proj`` as the rows of the fused
weight they are (:class:`Slot`), so a Phi-3 model is pruned exactly as the
same weights in Llama's layout would be, and an adapter on a fused module
carries one (A, B) pair per part: ``--ratio`` counts the same parameters.

A family not listed here is refused from its config alone
(:func:`check_family`), before any weight is read.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from prunext.errors import ModelError

#: The tensors outside the blocks, as every family here names them.
GLOBAL_PREFIXES: tuple[str, ...] = ("model.embed_tokens.", "model.norm.", "lm_head.")

#: Where each logical linear lives when the family does not fuse it.
UNFUSED_PATHS: dict[str, str] = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


@dataclass(frozen=True)
class Slot:
    """Where one logical linear's weight is: rows ``start .. start + rows`` of the module at ``path``.

    Args:
        name: the logical name (one of :data:`prunext.core.plan.LINEAR_NAMES`).
        path: the module inside a block, e.g. ``self_attn.qkv_proj``.
        start: first output row of this part.
        rows: output rows of this part; None for an unfused module (all of its rows).
    """

    name: str
    path: str
    start: int = 0
    rows: int | None = None

    @property
    def fused(self) -> bool:
        return self.rows is not None


@dataclass(frozen=True)
class Family:
    """What prunext knows about one family's decoder (the module docstring has the shapes).

    Args:
        model_type: transformers' ``model_type``.
        module: the family's modeling module in transformers.
        layer_class, model_class, causal_lm_class: class names in ``module``.
        pre_attn_norm, post_attn_norm, pre_mlp_norm, post_mlp_norm: the block's norm modules at
            the four points around its two branches; None where the family has none.
        norm_offset: the block norms' gain is ``norm_offset + weight`` (1 for Gemma's ``1 + w``).
        fused: ``(module path, logical parts in row order)`` of each fused linear.
        residual_dropout: dropout modules on the attention and MLP outputs (Phi-3), or None.
        layer_types: whether the config lists ``layer_types`` (full or sliding attention per layer);
            otherwise every layer slides when ``sliding_window`` is set.
        rotary_per_layer_type: the rotary embedding takes the layer type (Gemma-3: local and global).
        embed_scale: the embedding output is multiplied by ``sqrt(hidden_size)`` (Gemma).
        attention_scale: what the attention logits are divided by the square root of.
        logit_softcap: the config field of the final-logit softcap (Gemma-2), or None.
        gguf_architecture: the GGUF architecture transformers reads into this family, or None.
        tested: what the tests cover for the family (README).
    """

    model_type: str
    module: str
    layer_class: str
    model_class: str
    causal_lm_class: str
    pre_attn_norm: str | None = "input_layernorm"
    post_attn_norm: str | None = None
    pre_mlp_norm: str | None = "post_attention_layernorm"
    post_mlp_norm: str | None = None
    norm_offset: float = 0.0
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    residual_dropout: tuple[str, str] | None = None
    layer_types: bool = False
    rotary_per_layer_type: bool = False
    embed_scale: bool = False
    attention_scale: str = "head_dim"
    logit_softcap: str | None = None
    gguf_architecture: str | None = None
    tested: tuple[str, ...] = field(default=(), compare=False)

    # ------------------------------------------------------------ block
    @property
    def block_shape(self) -> str:
        """``"pre-norm"``, ``"sandwich"`` or ``"post-norm"``."""
        if self.post_attn_norm is None:
            return "pre-norm"
        return "sandwich" if self.pre_attn_norm else "post-norm"

    @property
    def out_norm_replaces_post_norm(self) -> bool:
        """True where a position's output norms take the place of the family's post-branch norms."""
        return self.post_attn_norm is not None

    @property
    def out_norm_kind(self) -> str:
        """``"layernorm"`` (FlexiGPT's, added on a pre-norm block) or ``"rms"`` (the family's own, replacing POST)."""
        return "rms" if self.out_norm_replaces_post_norm else "layernorm"

    def post_norm(self, branch: str) -> str | None:
        """The family's norm on a branch output (``"attn"`` or ``"mlp"``), None for pre-norm blocks."""
        return self.post_attn_norm if branch == "attn" else self.post_mlp_norm

    def describe_out_norms(self) -> str:
        """One line for the README table: what a position's output norms are in this family."""
        if not self.out_norm_replaces_post_norm:
            return "a LayerNorm added after each branch (FlexiGPT's)"
        gain = "`1 + w`" if self.norm_offset else "`w`"
        return f"its own `{self.post_attn_norm}` / `{self.post_mlp_norm}` (RMSNorm, {gain}) in place of the shared ones"

    # ---------------------------------------------------------- classes
    def _modeling(self):
        return importlib.import_module(self.module)

    def layer_cls(self) -> type:
        return getattr(self._modeling(), self.layer_class)

    def model_cls(self) -> type:
        return getattr(self._modeling(), self.model_class)

    # ---------------------------------------------------------- linears
    def slots(self, config) -> dict[str, Slot]:
        """``{logical linear: Slot}`` for a config of this family, in the order a block runs them.

        Split sizes of fused linears come from the config as the family's own code computes them;
        ``config`` may be None for a family that fuses nothing.
        """
        if self.fused and config is None:
            raise ValueError(f"{self.model_type} fuses linears; their split sizes need the config")
        slots = {name: Slot(name, path) for name, path in UNFUSED_PATHS.items()}
        for path, parts in self.fused:
            for name, (start, rows) in zip(parts, _split_rows(config, parts)):
                slots[name] = Slot(name, path, start, rows)
        return slots

    # ------------------------------------------------------- positions
    def attention_kinds(self, config) -> list[str]:
        """Per layer, ``"full_attention"`` or ``"sliding_attention"``, as the family's forward chooses."""
        if self.layer_types:
            return list(config.layer_types)
        sliding = getattr(config, "sliding_window", None) is not None
        return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers

    def position_fields(self, config, sources) -> dict:
        """Config fields that describe positions, for positions running ``sources`` (block indices).

        ``num_hidden_layers`` and, where the family lists them, ``layer_types`` change together, so
        a sliding-window block stays sliding wherever it runs and each position's KV-cache slot is
        of its own kind.
        """
        fields = {"num_hidden_layers": len(sources)}
        if self.layer_types and getattr(config, "layer_types", None) is not None:
            fields["layer_types"] = [config.layer_types[s] for s in sources]
        return fields

    def position_embeddings(self, inner, hidden, position_ids, kind: str):
        """The rotary (cos, sin) a layer of attention ``kind`` gets, as the family's ``Model.forward`` computes it."""
        if self.rotary_per_layer_type:
            return inner.rotary_emb(hidden, position_ids, kind)
        return inner.rotary_emb(hidden, position_ids)

    def softcap(self, config) -> float | None:
        """The final-logit softcap ``c`` (logits = c * tanh(logits / c)), or None."""
        return getattr(config, self.logit_softcap, None) if self.logit_softcap else None


def _split_rows(config, parts: tuple[str, ...]) -> list[tuple[int, int]]:
    """``(start, rows)`` of each logical part of a fused linear, as Phi-3's modules slice it."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = {
        "q_proj": config.num_attention_heads * head_dim,
        "k_proj": config.num_key_value_heads * head_dim,
        "v_proj": config.num_key_value_heads * head_dim,
        "gate_proj": config.intermediate_size,
        "up_proj": config.intermediate_size,
    }
    out, start = [], 0
    for name in parts:
        out.append((start, sizes[name]))
        start += sizes[name]
    return out


def _pre_norm(model_type: str, prefix: str, **kwargs) -> Family:
    module = f"transformers.models.{model_type}.modeling_{model_type}"
    return Family(model_type, module, f"{prefix}DecoderLayer", f"{prefix}Model", f"{prefix}ForCausalLM", **kwargs)


_GEMMA = dict(
    post_attn_norm="post_attention_layernorm",
    pre_mlp_norm="pre_feedforward_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
    norm_offset=1.0,
    layer_types=True,
    embed_scale=True,
    attention_scale="query_pre_attn_scalar",
)
_TESTED = ("identity", "hf round trip", "prune", "extend", "cached generation", "offload")

#: Every family prunext builds on, by ``model_type``.
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        _pre_norm("llama", "Llama", gguf_architecture="llama", tested=(*_TESTED, "zero3", "gguf")),
        _pre_norm("mistral", "Mistral", gguf_architecture="mistral", tested=_TESTED),
        _pre_norm("qwen2", "Qwen2", layer_types=True, gguf_architecture="qwen2", tested=_TESTED),
        _pre_norm("qwen3", "Qwen3", layer_types=True, gguf_architecture="qwen3", tested=_TESTED),
        _pre_norm(
            "phi3", "Phi3",
            fused=(("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp.gate_up_proj", ("gate_proj", "up_proj"))),
            residual_dropout=("resid_attn_dropout", "resid_mlp_dropout"),
            gguf_architecture="phi3", tested=(*_TESTED, "prunes as its unfused twin", "zero3", "gguf"),
        ),
        _pre_norm("gemma2", "Gemma2", **_GEMMA, logit_softcap="final_logit_softcapping", gguf_architecture="gemma2",
                  tested=(*_TESTED, "zero3", "gguf")),
        Family("gemma3_text", "transformers.models.gemma3.modeling_gemma3", "Gemma3DecoderLayer", "Gemma3TextModel",
               "Gemma3ForCausalLM", **_GEMMA, rotary_per_layer_type=True, logit_softcap="final_logit_softcapping",
               gguf_architecture="gemma3", tested=(*_TESTED, "gguf", "measured on Gemma 3 270M from GGUF")),
        _pre_norm("olmo2", "Olmo2", pre_attn_norm=None, post_attn_norm="post_attention_layernorm", pre_mlp_norm=None,
                  post_mlp_norm="post_feedforward_layernorm", tested=_TESTED),
    )
}

#: Model types that are near a supported family, with what to do instead.
_NEAR_MISSES = {
    "gemma3": "this is the multimodal Gemma 3; prunext prunes the text model (model type gemma3_text, e.g. gemma-3-270m or gemma-3-1b)",
    "gemma": "Gemma 1 is not supported; Gemma 2 (gemma2) and Gemma 3 text models (gemma3_text) are",
    "olmo": "OLMo 1 is not supported; OLMo 2 (olmo2) is",
    "phi": "Phi-1/2 are not supported; Phi-3 and Phi-3.5 (phi3) are",
}


def check_family(model_type: str) -> None:
    """Refuse a model type without an entry, in one line.

    Raises:
        ModelError: naming the supported families.
    """
    if model_type not in FAMILIES:
        hint = _NEAR_MISSES.get(model_type, "prunext builds on decoder-only models of these families")
        raise ModelError(f"model type '{model_type}' is not supported: {hint}; supported: {', '.join(FAMILIES)}")


def family_of(model_type: str) -> Family:
    """The registry entry of ``model_type``.

    Raises:
        ModelError: for a model type without an entry.
    """
    check_family(model_type)
    return FAMILIES[model_type]


def gguf_model_type(architecture: str) -> str:
    """The supported ``model_type`` transformers reads a GGUF ``general.architecture`` into.

    Raises:
        ModelError: an architecture no family here is read from.
    """
    for family in FAMILIES.values():
        if family.gguf_architecture == architecture:
            return family.model_type
    readable = ", ".join(f.gguf_architecture for f in FAMILIES.values() if f.gguf_architecture)
    raise ModelError(f"GGUF architecture '{architecture}' is not supported; prunext reads GGUF files of: {readable}")
