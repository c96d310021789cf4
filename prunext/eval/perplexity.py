"""Perplexity by prunext's one convention (docs/method.md, "Evaluation conventions").

Documents are tokenized as the tokenizer does by default (BOS only if it adds
one), each followed by EOS, concatenated, and cut into non-overlapping windows
of ``seq_len`` tokens; the remainder is dropped and there is no stride. Every
window is scored on its own: the first token of a window has no context and is
not predicted, so a window of ``seq_len`` tokens contributes ``seq_len - 1``
predictions. ``ppl = exp(total NLL / total predictions)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    """What a perplexity number means; every field is reported with it."""

    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # tokens in the scored windows
    predicted: int  # tokens predicted (tokens - windows)
    windows: int
    seq_len: int
    dataset: str
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll(model, windows: torch.LongTensor, batch_size: int = 4, progress: bool = True) -> tuple[float, int]:
    """Summed next-token NLL (nats, float64) and the count of predicted tokens over ``windows``.

    Args:
        model: a causal LM returning ``logits``.
        windows: (n_windows, seq_len) token ids.
        batch_size: windows per forward pass.
        progress: show a progress bar.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device)  # (b, seq)
        logits = model(input_ids=batch, use_cache=False).logits.float()  # (b, seq, vocab)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return total, count


def perplexity(
    model, windows: torch.LongTensor, dataset: str, batch_size: int = 4, progress: bool = True
) -> PerplexityResult:
    """Perplexity of ``model`` over non-overlapping ``windows`` (see the module docstring)."""
    was_training = model.training
    model.eval()
    total, count = window_nll(model, windows, batch_size, progress)
    model.train(was_training)
    mean = total / count
    return PerplexityResult(
        ppl=math.exp(mean),
        nll=mean,
        tokens=windows.numel(),
        predicted=count,
        windows=len(windows),
        seq_len=windows.shape[1],
        dataset=dataset,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
    )
