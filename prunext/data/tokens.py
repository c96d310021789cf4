"""Turn documents into one token stream and cut it into training windows."""

import itertools
from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from prunext.errors import DataError, ModelError, UserError

BATCH_DOCS = 256
# Below this many tokens a stream takes seconds; a progress bar would be noise.
PROGRESS_MIN_TOKENS = 1_000_000


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """Yield lists of up to ``size`` non-blank texts, in order."""
    non_blank = (text for text in texts if text and not text.isspace())
    while batch := list(itertools.islice(non_blank, size)):
        yield batch


def _with_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """Return a document's ids followed by the end-of-sequence id, if there is one."""
    return ids + [eos_id] if eos_id is not None else ids


def token_chunks(
    texts: Iterable[str],
    tokenizer,
    max_tokens: int | None = None,
    add_eos: bool = True,
    progress: bool | None = None,
) -> Iterator[torch.LongTensor]:
    """Tokenize documents one by one and yield the stream in pieces of up to ``BATCH_DOCS`` documents.

    Each document is tokenized with the tokenizer's defaults, so it starts with
    BOS exactly when the tokenizer adds one. Blank documents are skipped: they
    would add only special tokens. Concatenated, the pieces are
    :func:`token_stream`; only one piece is in memory at a time.

    Args:
        texts (Iterable[str]): The documents, read lazily and in order.
        tokenizer: A Hugging Face tokenizer (``tokenizer(list_of_texts)["input_ids"]``).
        max_tokens (int | None): Stop once the stream has this many tokens, and
            cut it to exactly this length; None reads every document.
        add_eos (bool): Append the tokenizer's EOS id after each document, when
            the tokenizer has one.
        progress (bool | None): Show a progress bar in tokens; None shows one
            only when ``max_tokens`` is unset or at least ``PROGRESS_MIN_TOKENS``.

    Yields:
        torch.LongTensor: 1-D pieces of the stream, in order.
    """
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens is {max_tokens}; give a positive number of tokens.")
    eos_id = tokenizer.eos_token_id if add_eos else None
    if progress is None:
        progress = max_tokens is None or max_tokens >= PROGRESS_MIN_TOKENS
    count = 0
    with tqdm(total=max_tokens, unit="tok", unit_scale=True, disable=not progress) as bar:
        for batch in _batches(texts, BATCH_DOCS):
            # verbose=False: long documents are expected here and are windowed
            # later, so the "longer than the model's maximum length" warning is noise.
            encoded = tokenizer(batch, verbose=False)["input_ids"]
            ids = list(itertools.chain.from_iterable(_with_eos(doc, eos_id) for doc in encoded))
            if max_tokens is not None:
                ids = ids[: max_tokens - count]
            count += len(ids)
            bar.update(len(ids))
            yield torch.tensor(ids, dtype=torch.long)
            if max_tokens is not None and count >= max_tokens:
                break


def token_stream(
    texts: Iterable[str],
    tokenizer,
    max_tokens: int | None = None,
    add_eos: bool = True,
    progress: bool | None = None,
) -> torch.LongTensor:
    """Tokenize documents one by one and concatenate them into one stream (:func:`token_chunks`, joined).

    Returns:
        torch.LongTensor: The 1-D stream (empty when there is no text).
    """
    chunks = list(token_chunks(texts, tokenizer, max_tokens, add_eos, progress))
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long)


def windows(tokens: torch.LongTensor, seq_len: int) -> torch.LongTensor:
    """Cut a token stream into non-overlapping windows, dropping the remainder.

    Args:
        tokens (torch.LongTensor): A 1-D stream.
        seq_len (int): The window length.

    Returns:
        torch.LongTensor: Shape ``(len(tokens) // seq_len, seq_len)``, a view of ``tokens``.

    Raises:
        UserError: If ``seq_len`` is not positive.
        DataError: If the stream is shorter than one window.
    """
    if seq_len < 1:
        raise UserError(f"--seq-len is {seq_len}; give a positive window length.")
    if tokens.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(tokens.shape)}")
    n_windows = tokens.numel() // seq_len
    if n_windows == 0:
        raise DataError(
            f"the data has {tokens.numel()} tokens, fewer than one window of {seq_len}; "
            "use more data or a smaller --seq-len."
        )
    return tokens[: n_windows * seq_len].view(n_windows, seq_len)


def check_vocab(tokens: torch.Tensor, vocab_size: int) -> None:
    """Check that every token id fits the model's embedding table.

    Args:
        tokens (torch.Tensor): Token ids of any shape.
        vocab_size (int): The model's vocabulary size.

    Raises:
        DataError: If an id is negative or not below ``vocab_size``.
    """
    if tokens.numel() == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise DataError(
            f"token id {bad} is outside the model's vocabulary of {vocab_size}; "
            "the tokenizer does not match the model, so use the model's own tokenizer."
        )


def tokenizer_max_id(tokenizer) -> int:
    """The largest id a tokenizer gives ordinary text: its base vocabulary, BOS and EOS.

    Tokens added on top of the base vocabulary (chat markers, a pad token) are
    left out: text rarely spells them, and models often list a few beyond
    their embedding table without harm. :func:`check_vocab` still catches one
    that a data set does produce.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids = list(backend.get_vocab(with_added_tokens=False).values())
    else:  # a slow (Python) tokenizer numbers its base vocabulary 0 .. vocab_size - 1
        ids = [tokenizer.vocab_size - 1]
    ids += [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None]
    return max(ids)


def check_tokenizer(tokenizer, vocab_size: int, spec: str) -> None:
    """Refuse a tokenizer that can give ids the model has no embedding for, before any text is read.

    Args:
        tokenizer: The model's Hugging Face tokenizer.
        vocab_size (int): The model's vocabulary size (rows of its embedding table).
        spec (str): The model as the user named it, for the message.

    Raises:
        ModelError: If the tokenizer's base vocabulary, BOS or EOS reaches ``vocab_size``.
    """
    top = tokenizer_max_id(tokenizer)
    if top >= vocab_size:
        raise ModelError(
            f"the tokenizer of '{spec}' gives token ids up to {top}, outside the model's vocabulary of {vocab_size}; "
            "the tokenizer does not match the model, so save the model's own tokenizer with it."
        )
