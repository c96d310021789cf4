"""Shared test fixtures: tiny deterministic models of each supported family and a tiny tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never write to the user's cache, except the built-in model, which is
# expensive to convert and identical for everyone: integration tests share it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("llama", "mistral", "qwen2")


def make_tiny_hf(family: str = "llama", layers: int = 4, hidden: int = 32, tie: bool = True, seed: int = 0, vocab: int = 128):
    """A tiny random HF causal LM (2-4 layers, width 32-64) of a supported family, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"attention_bias": True} if family == "qwen2" else {}
    if family in ("mistral", "qwen2"):
        extra["sliding_window"] = None
    config = AutoConfig.for_model(
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
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves norms at 1 and biases at 0; perturb them so tests see every tensor.
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
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[: vocab - 40],
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
