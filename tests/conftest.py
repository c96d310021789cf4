"""Shared test fixtures: tiny deterministic models of each supported family and a tiny tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never write to the user's cache, except the built-in model, which is
# expensive to convert and identical for everyone: integration tests share it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from prunext.core.families import FAMILIES as REGISTRY

#: Every family in the registry, as tests parametrize over it.
FAMILIES = tuple(REGISTRY)


def tiny_config(family: str = "llama", layers: int = 4, hidden: int = 32, tie: bool = True, vocab: int = 128, window: int | None = None):
    """A tiny config of ``family``: 4 heads (2 for keys and values), head size hidden/4.

    ``window``: the sliding window where the family has one (None: no sliding). Gemma
    alternates sliding and full layers, as its real configs do; Gemma-2 also softcaps.
    """
    from transformers import AutoConfig

    extra: dict = {"head_dim": hidden // 4}
    if family == "qwen2":
        extra["attention_bias"] = True
    if family in ("mistral", "phi3"):
        extra["sliding_window"] = window
    if family in ("qwen2", "qwen3"):
        extra.update(sliding_window=window, use_sliding_window=window is not None, max_window_layers=layers // 2)
        if window is not None:  # sliding from max_window_layers on, as Qwen's config computes it
            extra["layer_types"] = ["full_attention" if i < layers // 2 else "sliding_attention" for i in range(layers)]
    if family in ("gemma2", "gemma3_text"):
        extra.update(sliding_window=window or 256, query_pre_attn_scalar=hidden // 4,
                     layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
        if family == "gemma2":
            extra.update(final_logit_softcapping=3.0, attn_logit_softcapping=5.0)
    if family in ("phi3", "olmo2"):  # their default special-token ids lie outside a tiny vocabulary
        extra.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model(
        family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        **extra,
    )


def make_tiny_hf(family: str = "llama", layers: int = 4, hidden: int = 32, tie: bool = True, seed: int = 0, vocab: int = 128,
                 window: int | None = None):  # fmt: skip
    """A tiny random HF causal LM (2-4 layers, width 32-64) of a supported family, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, layers, hidden, tie, vocab, window)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves norms at 1 (Gemma's at 0) and biases at 0; perturb them so tests see every tensor.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_tiny_tokenizer(vocab: int = 128):
    """A real byte-level BPE tokenizer trained offline on a few sentences (ids < ``vocab``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [
        "The quick brown fox jumps over the lazy dog.",
        "Wikipedia is a free online encyclopedia written by volunteers.",
        "Anarchism is a political philosophy and movement.",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        # the byte-level characters of space and ASCII, in byte order: ByteLevel.alphabet() comes from a
        # hash set whose order changes with every process, and its first ids with it (a different
        # tokenizer, so different token ids and a different trained model, on every run)
        initial_alphabet=[byte_level.pre_tokenize_str(chr(b))[0][0] for b in range(32, 32 + vocab - 40)],
    )
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.fixture
def tiny_hf():
    """Factory fixture: ``tiny_hf(family="llama", layers=4, hidden=32, tie=True, seed=0)``."""
    return make_tiny_hf


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def builtin_model_dir() -> Path:
    """The built-in SmolLM2-135M native folder (converted once into $PRUNEXT_CACHE)."""
    from prunext.core.loading import builtin_folder

    return builtin_folder("smollm2-135m")
