"""Token streams, windows and the vocabulary check, with a real tokenizer trained offline."""

import itertools

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from prunext.data.tokens import check_vocab, token_stream, windows
from prunext.errors import DataError, UserError

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Wikipedia is a free online encyclopedia.",
    "",
    "   \n",
    "Anarchism is a political philosophy. " * 20,
    "Zebras are not in the training text, so they split into bytes.",
]


def train_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``<s>``/``</s>``, adding BOS when asked."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([d for d in DOCS if d.strip()] * 5, trainer)
    if add_bos:
        bos = ("<s>", tok.token_to_id("<s>"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=16
    )


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no-bos"])
def tokenizer(request) -> PreTrainedTokenizerFast:
    return train_tokenizer(add_bos=request.param)


def reference_stream(texts, tokenizer, add_eos=True) -> list[int]:
    """The stream built the slow, obvious way: one tokenizer call per non-blank document."""
    ids: list[int] = []
    for text in texts:
        if text.strip():
            ids += tokenizer(text)["input_ids"]
            ids += [tokenizer.eos_token_id] if add_eos else []
    return ids


def test_stream_equals_one_call_per_document(tokenizer):
    stream = token_stream(DOCS, tokenizer, progress=False)
    assert stream.dtype == torch.long and stream.dim() == 1
    assert stream.tolist() == reference_stream(DOCS, tokenizer)


def test_bos_appears_iff_the_tokenizer_adds_it(tokenizer):
    stream = token_stream(DOCS, tokenizer, progress=False).tolist()
    adds_bos = tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    assert stream.count(tokenizer.bos_token_id) == (4 if adds_bos else 0)
    assert stream.count(tokenizer.eos_token_id) == 4


def test_stream_without_eos(tokenizer):
    stream = token_stream(DOCS, tokenizer, add_eos=False, progress=False)
    assert stream.tolist() == reference_stream(DOCS, tokenizer, add_eos=False)


def test_stream_across_several_batches(tokenizer):
    texts = [f"Document number {i} about the lazy dog." for i in range(600)]
    assert token_stream(texts, tokenizer, progress=False).tolist() == reference_stream(texts, tokenizer)


@pytest.mark.parametrize("max_tokens", [1, 7, 50])
def test_stream_is_cut_at_max_tokens(tokenizer, max_tokens):
    stream = token_stream(DOCS, tokenizer, max_tokens=max_tokens, progress=False)
    assert stream.tolist() == reference_stream(DOCS, tokenizer)[:max_tokens]


def test_stream_stops_reading_once_full(tokenizer):
    # An endless source proves the documents are read lazily.
    stream = token_stream(itertools.cycle(DOCS), tokenizer, max_tokens=5000, progress=False)
    assert stream.numel() == 5000


def test_stream_of_blank_documents_is_empty(tokenizer):
    assert token_stream(["", " "], tokenizer, progress=False).numel() == 0


def test_windows_drop_the_remainder():
    tokens = torch.arange(23)
    out = windows(tokens, 5)
    assert out.shape == (4, 5)
    assert out.dtype == torch.long
    assert torch.equal(out.flatten(), torch.arange(20))


def test_windows_exact_fit():
    assert windows(torch.arange(12), 4).shape == (3, 4)


def test_windows_too_short():
    with pytest.raises(DataError, match="has 3 tokens, fewer than one window of 4"):
        windows(torch.arange(3), 4)


def test_windows_need_a_positive_length():
    with pytest.raises(UserError, match="seq-len"):
        windows(torch.arange(10), 0)


def test_check_vocab():
    check_vocab(torch.tensor([0, 5, 9]), 10)
    with pytest.raises(DataError, match="token id 10 .* vocabulary of 10"):
        check_vocab(torch.tensor([[0, 10]]), 10)
    with pytest.raises(DataError, match="token id -1"):
        check_vocab(torch.tensor([-1, 3]), 10)
