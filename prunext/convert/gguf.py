"""Write a model's dense form as one GGUF file (llama.cpp), with the ``gguf`` package's writer and name maps.

Flow: plan -> dense HF state dict (:func:`prunext.core.mapping.plan_to_hf`, adapters merged, one block
per position) -> GGUF tensor names from ``gguf.get_tensor_name_map`` -> q/k rows permuted where
llama.cpp's Llama layout expects it -> metadata (hyperparameters, BPE tokenizer: byte-level or
sentencepiece-style, chat template) -> ``GGUFWriter``. transformers' GGUF loader reads the file back with the same logits.

Families: Llama (SmolLM2, Llama 2/3) and Mistral, both as GGUF architecture ``llama`` (llama.cpp runs
Mistral as Llama; transformers' GGUF loader has no Mistral name map, so it reads such a file as the
equivalent Llama model; a sliding window is not carried, as llama.cpp's converter does not carry it),
Qwen2 and Qwen3 (architectures ``qwen2``, ``qwen3``, no permutation, as llama.cpp's converter writes them),
Phi-3 (``phi3``: the fused ``qkv_proj`` and ``gate_up_proj`` stay fused, as llama.cpp stores them),
Gemma 2 and Gemma 3 (``gemma2``, ``gemma3``: every RMSNorm gain written as ``1 + w``, as llama.cpp's
converter writes it and transformers' loader undoes it). A Gemma file carries its sliding window and
softcaps, but no GGUF reader takes the sliding/full layer pattern, the query scale or the local rotary
base from the file: both assume Gemma's own values (every 2nd layer full in Gemma 2, every 6th in
Gemma 3; 256; 10,000). A model that differs (a Gemma with blocks dropped usually does) is refused.
OLMo-2 is refused: the ``gguf`` package names it, but transformers cannot read such a file back, so the
result could not be checked.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from prunext.convert.hf import check_hf_expressible
from prunext.core.checkpoint import stored_state_dict
from prunext.core.families import FAMILIES
from prunext.core.mapping import plan_to_hf
from prunext.errors import UserError

#: family -> (GGUF architecture, permute q/k rows as llama.cpp's Llama converter does)
GGUF_ARCH: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "phi3": ("phi3", False),
    "gemma2": ("gemma2", False),
    "gemma3_text": ("gemma3", False),
}
#: Families the gguf package names but this writer refuses, and why.
GGUF_REFUSED = {
    "olmo2": "transformers' GGUF loader cannot read OLMo-2 files, so the result could not be checked",
}
#: What GGUF readers (llama.cpp, transformers) assume of a Gemma instead of reading it from the file.
_GEMMA_ASSUMED = {
    # llama.cpp scales queries by the head size, transformers' loader by 256: they agree at 256
    "gemma2": {"full_every": 2, "query_pre_attn_scalar": 256, "head_dim": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3_text": {"full_every": 6, "query_pre_attn_scalar": 256, "head_dim": 256, "attn_logit_softcapping": None, "final_logit_softcapping": None},
}
#: Gemma 3's rotary base on sliding layers, which GGUF readers assume.
_GEMMA3_LOCAL_ROPE_THETA = 10000.0
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def check_gguf_expressible(plan, model_type: str) -> None:
    """Refuse (one line) a plan or a family the GGUF writer here cannot express.

    Output norms are expressible where they replace the family's post-branch norms (Gemma).
    """
    if plan.has_out_norm and not (model_type in FAMILIES and FAMILIES[model_type].out_norm_replaces_post_norm):
        positions = [i for i, p in enumerate(plan.positions) if p.out_norm]
        raise UserError(
            f"--format gguf cannot express output feature normalization (positions {positions}); "
            "keep the native format, which loads with AutoModelForCausalLM (trust_remote_code=True, or after `import prunext`)"
        )
    check_hf_expressible(plan, model_type)
    if model_type in GGUF_REFUSED:
        raise UserError(f"--format gguf does not write model type '{model_type}': {GGUF_REFUSED[model_type]}; keep --format hf")
    if model_type not in GGUF_ARCH:
        raise UserError(f"--format gguf does not support model type '{model_type}'; supported: {', '.join(GGUF_ARCH)}")


def check_gguf_config(config) -> None:
    """Refuse (one line) a dense config whose Gemma settings GGUF readers would not reproduce (see the module docstring)."""
    assumed = _GEMMA_ASSUMED.get(config.model_type)
    if assumed is None:
        return
    every = assumed["full_every"]
    pattern = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    if list(config.layer_types) != pattern:
        full = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
        raise UserError(
            f"--format gguf: this model's full-attention layers are {full}, but GGUF readers assume every {every}th "
            f"layer of a {config.model_type} is full; keep --format hf"
        )
    for key in ("query_pre_attn_scalar", "head_dim", "attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None) != assumed[key]:
            raise UserError(f"--format gguf: this model's {key} is {getattr(config, key, None)}, but GGUF readers assume {assumed[key]}; keep --format hf")


def check_gguf_out(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output that is a folder, does not end in .gguf, or exists without ``overwrite``."""
    path = Path(path)
    if path.suffix != ".gguf":
        raise UserError(f"--to {path}: --format gguf writes one file; give a path ending in .gguf")
    if path.is_dir():
        raise UserError(f"--to {path} is a folder; --format gguf writes one .gguf file")
    if path.exists() and not overwrite:
        raise UserError(f"--to {path} exists; choose another file or pass --overwrite")
    return path


def permute_qk(weight: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """llama.cpp's row order for a Llama q/k projection (its ``LlamaModel.permute``), (out, ...) -> (out, ...).

    Hugging Face stores each head's rotary pairs as two halves; llama.cpp interleaves
    them. transformers' GGUF loader undoes exactly this (``reverse_permute``).
    """
    if n_head != n_head_kv:
        n_head = n_head_kv
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def hf_to_gguf_tensors(
    state: dict[str, torch.Tensor], config, arch: str, permute: bool, norm_offset: float = 0.0
) -> dict[str, torch.Tensor]:
    """A dense HF state dict -> GGUF tensor names (``gguf.get_tensor_name_map``), q/k permuted if asked.

    ``norm_offset``: added to every RMSNorm weight (Gemma's ``1 + w``: GGUF stores the gain itself).

    Raises:
        KeyError: a tensor the map does not know.
    """
    import gguf

    arch_id = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    out = {}
    for key, tensor in state.items():
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no GGUF name for tensor '{key}' in architecture {arch}")
        if permute and (".self_attn.q_proj." in key or ".self_attn.k_proj." in key):
            kv = config.num_attention_heads if ".q_proj." in key else config.num_key_value_heads
            tensor = permute_qk(tensor, config.num_attention_heads, kv)
        if norm_offset and key.endswith("norm.weight"):
            tensor = tensor.float() + norm_offset
        out[name] = tensor
    return out


# ------------------------------------------------------------------ tokenizer
def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """What GGUF stores of a BPE tokenizer: byte-level (GPT-2 style: SmolLM2, Llama 3, Qwen2; GGUF model
    ``gpt2``) or sentencepiece-style with byte fallback (Llama 2, Mistral v0.1, Gemma, Phi-3; GGUF model
    ``llama``).

    Returns a dict with ``model``, ``tokens`` (by id, padded to ``vocab_size``), ``token_types``,
    ``merges``, ``scores`` and ``add_space_prefix`` (sentencepiece-style), ``pre`` (byte-level), special
    token ids and BOS/EOS flags, and the chat template.

    Raises:
        UserError: another kind of tokenizer, or one larger than the vocabulary.
    """
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("--format gguf embeds a fast (tokenizer.json) BPE tokenizer; this model's tokenizer is not one")
    spec = json.loads(backend.to_str())
    model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    byte_level = model.get("type") == "BPE" and "ByteLevel" in json.dumps(pre)
    sentencepiece = model.get("type") == "BPE" and bool(model.get("byte_fallback")) and not byte_level
    if not (byte_level or sentencepiece):
        raise UserError(
            f"--format gguf embeds BPE tokenizers, byte-level (GPT-2 style) or sentencepiece-style with byte fallback, "
            f"and this one is {model.get('type')} with pre-tokenizer {pre.get('type')}; keep --format hf or native"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's vocabulary of {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids) | {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # sentencepiece-style: llama.cpp merges the pair whose result scores highest, so a token scores
    # minus the rank of the merge that makes it (the merges' own order)
    made_at = {m.replace(" ", "", 1): rank for rank, m in enumerate(merges)}
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # an embedding row no token uses (vocabularies padded to a multiple)
            kind = gguf.TokenType.UNUSED
        elif i == tokenizer.unk_token_id and sentencepiece:
            kind = gguf.TokenType.UNKNOWN
        elif i in special:
            kind = gguf.TokenType.CONTROL
        elif sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(f"[PAD{i}]" if token is None else token)
        types.append(kind)
        scores.append(-float(made_at.get(token, 0)) if kind == gguf.TokenType.NORMAL else -1000.0)
    probe = tokenizer("a").input_ids
    meta = {
        "model": "gpt2" if byte_level else "llama",
        "tokens": tokens,
        "token_types": types,
        "merges": merges,
        "scores": scores if sentencepiece else None,
        "pre": _pre_tokenizer_name(pre) if byte_level else None,
        "add_space_prefix": _adds_space_prefix(pre, norm) if sentencepiece else None,
        "add_bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "add_eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }
    for name in ("bos", "eos", "unk", "pad"):
        meta[f"{name}_id"] = getattr(tokenizer, f"{name}_token_id")
    return meta


def _adds_space_prefix(pre: dict, norm: dict) -> bool:
    """Whether a sentencepiece-style tokenizer puts "▁" before the text (Llama 2's dummy prefix; Gemma's has none)."""
    parts = [pre, *pre.get("pretokenizers", [])]
    if any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in parts):
        return True
    return any(n.get("type") == "Prepend" for n in [norm, *norm.get("normalizers", [])])


def _pre_tokenizer_name(pre: dict) -> str:
    """llama.cpp's name for how text is split before BPE: GPT-2's regex, or a known Split regex."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    if len(splits) == 1:
        regex = splits[0].get("pattern", {}).get("Regex")
        try:  # the names transformers' GGUF tokenizer builder understands
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:
            GGUF_PRE_TOKENIZER_SPLITS = {}
        for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
            if known == regex:
                return name
    raise UserError("--format gguf: this tokenizer splits text in a way GGUF cannot name (not GPT-2, Llama 3 or Qwen2); keep --format hf")


# ------------------------------------------------------------------ writing
def write_gguf(model, path: str | os.PathLike, tokenizer, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write ``model``'s dense form to ``path`` as GGUF, atomically (a temporary file, then a rename).

    Args:
        model: a :class:`~prunext.core.model.PrunextForCausalLM` whose plan has no output norms.
        path: the ``.gguf`` file to write.
        tokenizer: the model's BPE tokenizer (:func:`tokenizer_metadata`), embedded with its chat template.
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the matrices (norms stay float32, as llama.cpp writes them).
        overwrite: replace an existing file.

    Returns:
        A summary: architecture, tensors, parameters, bytes.

    Raises:
        UserError: a plan, family or tokenizer GGUF cannot express, or an existing file.
    """
    import gguf

    path = check_gguf_out(path, overwrite)
    config = model.config
    family = config.base_model_type
    check_gguf_expressible(model.plan, family)
    arch, permute = GGUF_ARCH[family]
    meta = tokenizer_metadata(tokenizer, config.vocab_size)
    dense = config.base_config()
    _rope_theta(dense)  # refuse rope scaling before anything is written
    check_gguf_config(dense)
    state = plan_to_hf(stored_state_dict(model), model.plan, model.config.base_config())
    tensors = hf_to_gguf_tensors(state, dense, arch, permute, FAMILIES[family].norm_offset)
    qtype = getattr(gguf.GGMLQuantizationType, DTYPES[dtype])

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _write_metadata(writer, dense, family, meta, qtype)
        for name, tensor in tensors.items():
            data = tensor.detach().float().cpu().numpy()
            if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, data.astype(np.float32))
            else:
                writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"architecture": arch, "family": family, "tensors": len(tensors), "positions": len(model.plan),
            "parameters": sum(t.numel() for t in tensors.values()), "bytes": path.stat().st_size, "dtype": dtype}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_metadata(writer, config, family: str, meta: dict, qtype) -> None:
    import gguf

    # not exactly "mistral": transformers would then look for a Mistral name map that gguf does not have
    name = str(getattr(config, "_name_or_path", "") or "").rstrip("/").split("/")[-1]
    writer.add_name(name if name and name != "mistral" else f"prunext-{family}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if family in _GEMMA_ASSUMED:  # what llama.cpp reads of a Gemma
        writer.add_sliding_window(int(config.sliding_window))
        for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                         ("final_logit_softcapping", writer.add_final_logit_softcapping)):
            if getattr(config, key, None) is not None:
                add(float(getattr(config, key)))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "BF16": gguf.LlamaFileType.MOSTLY_BF16}[qtype.name])
    writer.add_tokenizer_model(meta["model"])
    if meta["pre"] is not None:
        writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    if meta["scores"] is not None:
        writer.add_token_scores(meta["scores"])
        writer.add_add_space_prefix(meta["add_space_prefix"])
    if meta["merges"]:
        writer.add_token_merges(meta["merges"])
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if meta[f"{name}_id"] is not None:
            add(int(meta[f"{name}_id"]))
    writer.add_add_bos_token(bool(meta["add_bos"]))
    writer.add_add_eos_token(bool(meta["add_eos"]))
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])


def _rope_theta(config) -> float:
    """The rotary base; refuses rope scaling, which this writer does not carry."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:  # Gemma 3: one set per attention kind
        local = params.get("sliding_attention", {})
        if local.get("rope_type", "default") != "default" or local.get("rope_theta") != _GEMMA3_LOCAL_ROPE_THETA:
            raise UserError(f"--format gguf: GGUF readers assume a sliding-layer rotary base of {_GEMMA3_LOCAL_ROPE_THETA:g} "
                            f"with no scaling, and this model has {local}; keep --format hf")
        params = params["full_attention"]
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise UserError(f"--format gguf does not carry rope scaling of type '{kind}'; keep --format hf")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UserError("--format gguf needs the model's rope_theta, and its config has none")
    return theta
