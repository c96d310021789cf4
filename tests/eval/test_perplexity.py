import math

import pytest
import torch

from prunext.core.checkpoint import build_from_hf
from prunext.core.plan import Plan
from prunext.eval.perplexity import perplexity


def test_perplexity_equals_an_independent_loop(tiny_hf):
    model = build_from_hf(tiny_hf("llama"), Plan.identity(4))
    windows = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, windows, dataset="random", batch_size=2, progress=False)

    # independent: one window at a time, log-softmax and gather, token by token
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), dim=-1)
            for t in range(1, len(w)):
                nll -= logp[t - 1, w[t]].item()
                count += 1
    assert result.predicted == count == 5 * 15
    assert result.tokens == 80 and result.windows == 5 and result.seq_len == 16
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result.dtype == "float32" and result.dataset == "random"
