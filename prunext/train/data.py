"""Training data: the token budget, packed blocks, and which rank reads which block at which step.

::

    documents ─► token_chunks (EOS after each) ─► OUT/data/tokens-*.npy (uint32, memory-mapped)
               ─► blocks of --seq-len (remainder dropped)
                                                   │
    epoch e: permutation_e = rng([seed, e]).permutation(n_blocks)
    global order = permutation_0 ++ permutation_1 ++ ...       (as many epochs as the budget needs)
                                                   │
    step s takes G = world * micro * accum blocks: order[s*G : (s+1)*G]
    rank r reads the slice [r::world] of them, as accum micro-batches of micro blocks

Labels are the inputs (the model shifts them), and there is no padding, so
every micro-batch has the same number of tokens and the mean over ranks and
micro-batches (what DeepSpeed computes) is the mean over the global batch.
The order depends only on the seed, the number of blocks and the global batch,
so a resumed run reads exactly the blocks the uninterrupted run would have.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prunext.errors import DataError, UserError

log = logging.getLogger(__name__)

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_tokens(text: str) -> int:
    """Parse a token count such as ``50000``, ``50M``, ``1.5B``, ``2e9``.

    Raises:
        UserError: not a positive count.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMBGT]?)\s*", str(text).upper())
    if not m:
        raise UserError(f"--tokens {text!r} is not a token count; write e.g. 50000, 50M or 1B")
    value = int(float(m.group(1)) * _SUFFIXES[m.group(2)])
    if value < 1:
        raise UserError(f"--tokens {text!r} must be at least 1 token")
    return value


@dataclass(frozen=True)
class Budget:
    """How many optimizer steps a token budget buys.

    Attributes:
        requested: tokens asked for (``--tokens`` or the fraction).
        tokens_per_step: ``seq_len * micro * accum * world``.
        steps: ``floor(requested / tokens_per_step)``.
    """

    requested: int
    seq_len: int
    micro: int
    accum: int
    world: int

    @property
    def global_batch(self) -> int:
        """Blocks per optimizer step, over all ranks."""
        return self.micro * self.accum * self.world

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch

    @property
    def steps(self) -> int:
        return self.requested // self.tokens_per_step

    @property
    def tokens(self) -> int:
        """Tokens actually used: whole steps only."""
        return self.steps * self.tokens_per_step

    @property
    def blocks(self) -> int:
        return self.steps * self.global_batch


def make_budget(tokens: int, seq_len: int, micro: int, accum: int, world: int) -> Budget:
    """The budget, refusing one too small for a single step."""
    budget = Budget(tokens, seq_len, micro, accum, world)
    if budget.steps < 1:
        raise UserError(
            f"a budget of {tokens:,} tokens is less than one step of {budget.tokens_per_step:,} tokens "
            f"(seq-len {seq_len} x micro-batch {micro} x grad-accum {accum} x {world} ranks); "
            "raise --tokens or lower the batch"
        )
    return budget


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash that changes when the tokenization would."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha1(f"{text}|eos={tokenizer.eos_token_id}".encode()).hexdigest()[:12]


def cache_name(data: str, tokenizer, max_tokens: int) -> str:
    key = json.dumps({"data": data, "tokenizer": tokenizer_fingerprint(tokenizer), "max_tokens": max_tokens}, sort_keys=True)
    return f"tokens-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"


def texts_of(dataset):
    """The ``text`` column of a (streaming or in-memory) data set, one document at a time."""
    for row in dataset:
        yield row["text"]


#: The dtype of the tokenized budget on disk: 4 bytes a token, any vocabulary below 2**32.
TOKEN_DTYPE = np.dtype("<u4")


def tokenize_to_file(dataset, tokenizer, max_tokens: int, path: Path, vocab_size: int) -> int:
    """Tokenize up to ``max_tokens`` tokens into ``path`` (a uint32 .npy), in pieces, written atomically.

    The budget is never held whole in memory: each piece of the stream
    (:func:`prunext.data.token_chunks`) is checked and appended to a raw file
    beside ``path``, and the .npy is that file behind a header (copied in blocks),
    renamed into place only when complete. Readers memory-map it.

    Returns:
        The number of tokens written.

    Raises:
        DataError: the data holds no tokens, or ids outside the model's vocabulary.
    """
    import shutil

    from prunext.data import check_vocab, token_chunks

    if vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise DataError(f"a vocabulary of {vocab_size:,} ids does not fit the uint32 token file")
    path.parent.mkdir(parents=True, exist_ok=True)
    names = []
    for suffix in (".raw", ".npy"):
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        names.append(Path(name))
    raw, final = names
    try:
        count = 0
        with raw.open("wb") as f:
            for piece in token_chunks(texts_of(dataset), tokenizer, max_tokens=max_tokens):
                check_vocab(piece, vocab_size)
                f.write(piece.numpy().astype(TOKEN_DTYPE).tobytes())
                count += piece.numel()
        if count == 0:
            raise DataError("the training data holds no text; give a data set with non-empty documents")
        with final.open("wb") as out, raw.open("rb") as f:
            header = {"descr": TOKEN_DTYPE.str, "fortran_order": False, "shape": (count,)}
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(f, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(final, path)
    finally:
        raw.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
    return count


class BlockOrder:
    """Which blocks each rank reads at each step (see the module docstring).

    Args:
        tokens: the 1-D token stream (int array; a memory map is fine).
        seq_len: block length.
        budget: the run's budget (global batch, steps).
        seed: shuffling seed.

    Raises:
        DataError: the data is shorter than one block.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, budget: Budget, seed: int) -> None:
        self.n_blocks = len(tokens) // seq_len
        if self.n_blocks == 0:
            raise DataError(
                f"the training data has {len(tokens)} tokens, fewer than one block of --seq-len {seq_len}; "
                "use more data or a smaller --seq-len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.budget = budget
        self.seed = seed

    @property
    def epochs(self) -> int:
        """Passes over the data the budget needs (each one reshuffled)."""
        return math.ceil(self.budget.blocks / self.n_blocks)

    @functools.lru_cache(maxsize=4)
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)

    def step_blocks(self, step: int, rank: int) -> np.ndarray:
        """Block ids rank ``rank`` reads at 0-based optimizer step ``step``: shape (accum, micro)."""
        b = self.budget
        start = step * b.global_batch
        ids = []
        for index in range(start + rank, start + b.global_batch, b.world):
            epoch, pos = divmod(index, self.n_blocks)
            ids.append(self.permutation(epoch)[pos])
        return np.asarray(ids).reshape(b.accum, b.micro)

    def global_blocks(self, step: int) -> np.ndarray:
        """All blocks of step ``step`` in order (what a single process would train on): shape (G,)."""
        start = step * self.budget.global_batch
        return np.asarray([self.permutation(i // self.n_blocks)[i % self.n_blocks] for i in range(start, start + self.budget.global_batch)])

    def batch(self, block_ids: np.ndarray) -> torch.LongTensor:
        """The token blocks for ``block_ids``: shape (len(block_ids), seq_len)."""
        rows = [np.asarray(self.tokens[i * self.seq_len : (i + 1) * self.seq_len]) for i in block_ids]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def eval_windows(data: str, tokenizer, seq_len: int, n_windows: int, vocab_size: int) -> torch.LongTensor:
    """The first ``n_windows`` windows of ``data`` (fixed for the whole run): shape (n, seq_len).

    Raises:
        DataError: the data is shorter than one window.
    """
    from prunext.data import check_vocab, load_text_dataset, token_stream, windows

    tokens = token_stream(texts_of(load_text_dataset(data)), tokenizer, max_tokens=n_windows * seq_len)
    check_vocab(tokens, vocab_size)
    return windows(tokens, seq_len)


def prepare_tokens(dataset, tokenizer, data: str, vocab_size: int, budget: Budget, folder: Path, local_rank: int, wait_group):
    """Tokenize the budget once per node (node-local rank 0) into ``folder`` (OUT/data); every rank memory-maps it.

    A file there from an earlier run with the same data, tokenizer and budget is reused (``--resume``).
    """
    import time

    from prunext.train.dist import all_ok

    path = folder / cache_name(data, tokenizer, budget.tokens)
    error = None
    if local_rank == 0 and not path.exists():
        try:
            start = time.perf_counter()
            count = tokenize_to_file(dataset, tokenizer, budget.tokens, path, vocab_size)
            log.info("tokenized %s tokens of %s in %.1f s into %s", f"{count:,}", data, time.perf_counter() - start, path)
        except Exception as e:  # every rank learns of it, instead of waiting out the timeout
            error = e
    all_ok(error, group=wait_group)
    return np.load(path, mmap_mode="r")
