"""prunext/train/data.py: token budgets and the data order every rank reads."""

import numpy as np
import pytest
import torch

from prunext.errors import DataError, UserError
from prunext.train.data import BlockOrder, make_budget, parse_tokens


@pytest.mark.parametrize(("text", "value"), [("50000", 50_000), ("50M", 50_000_000), ("1.5B", 1_500_000_000), ("2e3", 2000), ("2T", 2 * 10**12), ("3k", 3000)])
def test_parse_tokens(text, value):
    assert parse_tokens(text) == value


@pytest.mark.parametrize("text", ["", "M", "-5", "ten", "0", "1.5X"])
def test_parse_tokens_refuses(text):
    with pytest.raises(UserError):
        parse_tokens(text)


def test_budget_is_whole_steps():
    b = make_budget(10_000, seq_len=64, micro=2, accum=3, world=4)
    assert b.tokens_per_step == 64 * 2 * 3 * 4 == 1536
    assert b.steps == 6 and b.tokens == 9216 and b.blocks == 6 * 24


def test_budget_below_one_step_refused():
    with pytest.raises(UserError, match="less than one step"):
        make_budget(1000, seq_len=64, micro=2, accum=3, world=4)


def _order(n_blocks=10, seq=4, micro=2, accum=2, world=2, steps=3, seed=0):
    budget = make_budget(seq * micro * accum * world * steps, seq, micro, accum, world)
    tokens = np.arange(n_blocks * seq + 3, dtype=np.int32)  # 3 left over: dropped
    return BlockOrder(tokens, seq, budget, seed)


def test_ranks_split_the_global_batch():
    order = _order(n_blocks=100)
    for step in range(3):
        per_rank = [order.step_blocks(step, r) for r in range(2)]
        assert all(b.shape == (2, 2) for b in per_rank)  # (accum, micro)
        together = np.concatenate([b.ravel() for b in per_rank])
        assert len(set(together)) == 8  # disjoint
        assert sorted(together) == sorted(order.global_blocks(step))
        assert list(per_rank[1].ravel()) == list(order.global_blocks(step)[1::2])


def test_order_depends_only_on_seed_and_step():
    a, b, c = _order(seed=1), _order(seed=1), _order(seed=2)
    assert all(np.array_equal(a.global_blocks(s), b.global_blocks(s)) for s in range(3))
    assert not all(np.array_equal(a.global_blocks(s), c.global_blocks(s)) for s in range(3))


def test_epochs_cover_every_block_and_reshuffle():
    order = _order(n_blocks=6, micro=1, accum=1, world=2, steps=6)  # 12 blocks needed from 6: 2 epochs
    assert order.epochs == 2
    seen = np.concatenate([order.global_blocks(s) for s in range(6)])
    assert sorted(seen[:6]) == sorted(seen[6:]) == list(range(6))
    assert not np.array_equal(seen[:6], seen[6:])


def test_batch_holds_the_blocks_tokens():
    order = _order()
    batch = order.batch(np.array([2, 0]))
    assert batch.dtype == torch.int64
    assert batch.tolist() == [[8, 9, 10, 11], [0, 1, 2, 3]]


def test_data_shorter_than_a_block_refused():
    budget = make_budget(64, 8, 1, 1, 1)
    with pytest.raises(DataError, match="fewer than one block"):
        BlockOrder(np.arange(5), 8, budget, 0)


# --------------------------------------------------------------------------- the token file
def _docs(n: int) -> list[dict]:
    return [{"text": f"The quick brown fox {i} jumps over the lazy dog number {i * 7}."} for i in range(n)]


def test_token_file_is_the_stream_as_uint32_written_in_pieces(tiny_tokenizer, tmp_path, monkeypatch):
    """More documents than one piece: the file is the whole stream, uint32, memory-mappable, and nothing else is left."""
    import prunext.data.tokens as tokens_module
    from prunext.data import token_chunks, token_stream
    from prunext.train.data import tokenize_to_file

    monkeypatch.setattr(tokens_module, "BATCH_DOCS", 16)  # pieces of 16 documents
    docs = _docs(100)
    pieces = list(token_chunks((d["text"] for d in docs), tiny_tokenizer, max_tokens=3000))
    assert len(pieces) > 3
    stream = token_stream((d["text"] for d in docs), tiny_tokenizer, max_tokens=3000)
    path = tmp_path / "data" / "tokens-x.npy"
    count = tokenize_to_file(docs, tiny_tokenizer, 3000, path, vocab_size=128)
    assert count == stream.numel()
    mapped = np.load(path, mmap_mode="r")
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.uint32
    assert np.array_equal(mapped, stream.numpy())
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokens-x.npy"]  # no temporary file is left


def test_token_file_refuses_ids_outside_the_vocabulary_and_writes_nothing(tiny_tokenizer, tmp_path):
    from prunext.train.data import tokenize_to_file

    path = tmp_path / "data" / "tokens-x.npy"
    with pytest.raises(DataError, match="vocabulary"):
        tokenize_to_file(_docs(40), tiny_tokenizer, 3000, path, vocab_size=20)
    assert list(path.parent.iterdir()) == []
    with pytest.raises(DataError, match="no text"):
        tokenize_to_file([{"text": "  "}], tiny_tokenizer, 3000, path, vocab_size=128)
    assert list(path.parent.iterdir()) == []
