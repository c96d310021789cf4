"""Self-speculative decoding: greedy output is plain decoding's, sampling keeps the model's distribution."""

import pytest
import torch

from prunext.core.families import FAMILIES as REGISTRY
from prunext.core.checkpoint import build_from_hf
from prunext.core.plan import LINEAR_NAMES, Plan, Position
from prunext.generate import (
    SelfDraft,
    Sampling,
    accept_or_resample,
    check_draft_skip,
    decode,
    replacement_positions,
    speculative_decode,
)
from prunext.errors import UserError

FAMILIES = tuple(REGISTRY)


def pruned_plan() -> Plan:
    """A flexigpt-like plan over 4 blocks: block 2 pruned, replaced in place by block 1 (+ LoRA, output norms)."""
    return Plan(
        (Position(0, lora_rank=2, lora_targets=("q_proj",)), Position(1),
         Position(1, lora_rank=4, lora_targets=LINEAR_NAMES, out_norm=True), Position(3)),
        num_source_blocks=4,
    )  # fmt: skip


def noisy_model(tiny_hf, family="llama", plan=None, sharpen=1.0):
    """A tiny shared-weight model whose replacement matters (so the draft often disagrees)."""
    model = build_from_hf(tiny_hf(family), plan or pruned_plan(), out_norm_init=1.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        model.model.norm.weight.mul_(sharpen)
    return model.eval()


def prompt(n=7, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_replacement_positions_of_prune_and_extend_plans():
    assert replacement_positions(pruned_plan()) == [2]
    assert replacement_positions(Plan.identity(4)) == []
    # a replacement placed before the block it re-runs: the plain position is the original
    before = Plan((Position(0), Position(2, lora_rank=2, lora_targets=("v_proj",), out_norm=True), Position(2), Position(3)), 4)
    assert replacement_positions(before) == [1]
    # extend, block mode: each repeat right after its block; sequential mode: a span repeated
    extended = Plan((Position(0), Position(1), Position(1, lora_rank=2, lora_targets=("q_proj",), out_norm=True), Position(2), Position(2, out_norm=True)), 3)
    assert replacement_positions(extended) == [2, 4]
    seq = Plan((Position(0), Position(1), Position(2), Position(1, out_norm=True), Position(2, out_norm=True), Position(3)), 4)
    assert replacement_positions(seq) == [3, 4]


@pytest.mark.parametrize(
    "skip, message",
    [
        (None, "runs every block once"),
        ([4], "--draft-skip 4: the model has positions 0..3"),
        ([-1, 2], "--draft-skip -1: the model has positions 0..3"),
        ([1, 1], "names a position twice"),
        ([0, 1, 2, 3], "skips all 4 positions"),
    ],
)
def test_bad_draft_is_refused(skip, message):
    with pytest.raises(UserError, match=message):
        check_draft_skip(Plan.identity(4), skip)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_speculative_equals_plain_decoding(tiny_hf, family):
    model = noisy_model(tiny_hf, family)
    x = prompt()
    reference = model.generate(x, max_new_tokens=48, min_new_tokens=48, do_sample=False)[0, x.shape[1]:].tolist()
    assert decode(model, x, 48).tokens == reference
    draft = SelfDraft(model, [2])
    rates = []
    for k in (1, 2, 3, 5, 8):
        result = speculative_decode(model, x, 48, draft, draft_tokens=k)
        assert result.tokens == reference, f"K={k}"
        assert result.drafted > 0 and result.accepted <= result.drafted
        rates.append(result.acceptance_rate)
    # the draft disagrees sometimes, so rejection and cache rollback were exercised
    assert min(rates) < 1.0, rates


def test_greedy_speculative_with_first_position_skipped_and_eos(tiny_hf):
    model = noisy_model(tiny_hf)
    x = prompt(seed=3)
    reference = decode(model, x, 40).tokens
    for skip in ([0], [0, 3], [1, 2]):
        assert speculative_decode(model, x, 40, SelfDraft(model, skip), draft_tokens=3).tokens == reference, skip
    # EOS ends the text where plain decoding ends it, even inside an accepted run of draft tokens
    eos = reference[10]
    stop = reference.index(eos) + 1
    for k in (1, 4):
        result = speculative_decode(model, x, 40, SelfDraft(model, [2]), draft_tokens=k, eos_token_ids=[eos])
        assert result.tokens == reference[:stop] and result.stopped == "eos"


def test_draft_is_a_view_sharing_every_weight(tiny_hf):
    model = noisy_model(tiny_hf)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    draft = SelfDraft(model, [2])
    assert draft.parameters_shared_with(model)
    assert [layer is model.model.layers[i] for layer, i in zip(draft.view.layers, draft.kept)] == [True] * 3
    assert draft.view.embed_tokens is model.model.embed_tokens and draft.lm_head is model.lm_head
    speculative_decode(model, prompt(), 16, draft)
    # the model itself is untouched: all positions, same parameters and values
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert sum(p.numel() for p in model.parameters()) == params
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the draft is the model without position 2: its logits equal a model built without it
    x = prompt()
    cache = draft.new_cache()
    logits = draft(x, cache, 0)
    dropped = build_from_hf(tiny_hf("llama"), Plan(tuple(p for i, p in enumerate(pruned_plan().positions) if i != 2), 4))
    with torch.no_grad():
        dropped.model.layers[0].self_attn.q_proj.lora_B.copy_(model.model.layers[0].self_attn.q_proj.lora_B)
        dropped.model.layers[0].self_attn.q_proj.lora_A.copy_(model.model.layers[0].self_attn.q_proj.lora_A)
        dropped.model.norm.weight.copy_(model.model.norm.weight)
    torch.testing.assert_close(logits, dropped(x).logits[:, -1], rtol=1e-5, atol=1e-5)


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * (a - b).abs().sum().item()


def test_acceptance_rule_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = torch.tensor([0.05, 0.05, 0.1, 0.2, 0.3, 0.3])
    n = 20000
    counts = torch.zeros(6)
    for _ in range(n):
        token = int(torch.multinomial(q, 1, generator=g).item())
        _, out = accept_or_resample(p, q, token, g)
        counts[out] += 1
    assert _tv(counts / n, p) < 0.015  # sampling noise at n = 20000 is ~0.005
    assert counts[5] == 0  # a token the model gives probability 0 never comes out
    assert _tv(q, p) > 0.5  # ...although the draft proposed it 30% of the time


def test_sampled_speculative_tokens_follow_the_model_distribution(tiny_hf):
    """The second new token (the first the draft proposes) is distributed as the full model's marginal.

    The statistic is the mean of ``w(t) = sign(p(t) - q(t))`` over runs, ``p`` the exact marginal of the
    full model and ``q`` the draft's: it separates the two distributions by ``2 TV(p, q)``.
    """
    model = noisy_model(tiny_hf, sharpen=6.0)
    with torch.no_grad():  # let the blocks, not the embeddings, dominate, so the draft differs visibly
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(4.0)
    x = prompt(5, seed=2)
    sampling = Sampling(temperature=1.0)
    draft = SelfDraft(model, [2])
    with torch.no_grad():
        p1 = sampling.probs(model(x).logits[0, -1])  # (vocab,)
        both = torch.cat([x.repeat(128, 1), torch.arange(128).unsqueeze(1)], dim=1)  # every first token
        exact = p1 @ sampling.probs(model(both).logits[:, -1])  # (vocab,)
        draft_only = p1 @ sampling.probs(draft(both, draft.new_cache(), 0))
    w = torch.sign(exact - draft_only)
    n = 600
    seen = torch.tensor([
        speculative_decode(model, x, 3, draft, draft_tokens=1, sampling=Sampling(temperature=1.0, seed=seed)).tokens[1]
        for seed in range(n)
    ])  # fmt: skip
    sigma = ((exact * w**2).sum() - (exact * w).sum() ** 2).sqrt().item() / n**0.5
    observed = w[seen].mean().item()
    assert abs(observed - (exact * w).sum().item()) < 4 * sigma
    assert ((exact - draft_only) * w).sum().item() > 12 * sigma  # the draft's own distribution would fail


def test_sampling_is_reproducible_and_top_p_limits_the_support(tiny_hf):
    model = noisy_model(tiny_hf, sharpen=3.0)
    draft = SelfDraft(model, [2])
    s = Sampling(temperature=0.9, top_p=0.5, seed=7)
    a = speculative_decode(model, prompt(), 24, draft, 3, s).tokens
    assert a == speculative_decode(model, prompt(), 24, draft, 3, s).tokens
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])  # softmax: 0.644, 0.237, 0.087, 0.032
    full = torch.softmax(logits, -1)
    kept = Sampling(temperature=1.0, top_p=0.8).probs(logits)  # the first two reach 0.881 >= 0.8
    torch.testing.assert_close(kept, torch.cat([full[:2] / full[:2].sum(), torch.zeros(2)]))
    assert Sampling(temperature=1.0, top_p=0.5).probs(logits).tolist() == [1.0, 0.0, 0.0, 0.0]
