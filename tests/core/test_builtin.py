"""The built-in model: the cached native conversion scores exactly as transformers' own GGUF loader."""

import pytest
import torch

from prunext.core.loading import builtin_gguf_path, load_gguf_hf, load_model
from prunext.data import load_text_dataset, token_stream, windows
from prunext.eval.perplexity import perplexity

pytestmark = pytest.mark.integration


def test_builtin_perplexity_equals_transformers_gguf_loader(builtin_model_dir):
    model, tokenizer = load_model("builtin:smollm2-135m")
    assert model.plan.is_identity and len(model.plan) == 30 and model.dtype == torch.float32
    texts = load_text_dataset("builtin:wiki:test")["text"]
    eval_windows = windows(token_stream(texts, tokenizer, max_tokens=2 * 256), 256)
    ours = perplexity(model, eval_windows, dataset="builtin:wiki:test", progress=False)
    del model

    reference, ref_tokenizer = load_gguf_hf(builtin_gguf_path("smollm2-135m"))
    assert torch.equal(windows(token_stream(texts, ref_tokenizer, max_tokens=2 * 256), 256), eval_windows)
    theirs = perplexity(reference, eval_windows, dataset="builtin:wiki:test", progress=False)
    assert ours.ppl == pytest.approx(theirs.ppl, rel=1e-6)
    assert 5 < ours.ppl < 100  # a real model on real text, not noise (vocab 49152)
