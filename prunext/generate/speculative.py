"""Plain and self-speculative decoding of a prunext model, batch size 1.

Self-speculative decoding (FlexiGPT Sec. 4.2): the same model without some of
its positions (by default the replacement positions, which reuse a block that
also runs elsewhere) drafts K tokens, and the full model checks all of them in
one forward pass::

    draft (positions kept)   P0 P1 P2 .. P4 ..     K steps, one token each, its own KV cache
    full model               P0 P1 P2 P3 P4 P5     one step over [last, d1 .. dK]
                                                   -> keep d1..da, then one token of its own

The draft is a *view*: a shallow copy of the inner HF model whose layer list
holds the kept position modules themselves, so every weight is shared and only
the draft's KV cache is its own. Output is lossless: with greedy decoding the
tokens are the full model's argmax at every step; with sampling, draft token
``d`` is kept with probability ``min(1, p(d) / q(d))`` and a rejected one is
replaced by a sample of ``max(0, p - q)`` (Leviathan et al. 2023, Chen et al.
2023), so every token is distributed as the full model's ``p``.

Why not transformers' assisted generation: its assistant is a separate model
whose layers index their own KV cache from 0, while a view of the same
position modules keeps each position's ``layer_idx``; and its per-step overhead
(logits processors, candidate bookkeeping) costs more than the draft saves on
a small model on CPU. The loop here is about 100 lines and is tested against
``model.generate``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from prunext.core.model import CACHE_ARG
from prunext.core.plan import Plan
from prunext.errors import UserError

#: Draft tokens per round when none is given: the fastest K for prunext's default model at 30% and 40% in the
#: full inference benchmark (BENCHMARKS.md, "Inference"; K = 4 was slower than plain decoding at 40%).
DEFAULT_DRAFT_TOKENS = 2


# ------------------------------------------------------------------ which positions the draft skips
def replacement_positions(plan: Plan) -> list[int]:
    """Positions that re-run a block which another position also runs: what a self-draft skips by default.

    Of the positions sharing one base block, one is the block's original and the
    others are replacements (prune) or repeats (extend). The original is the
    position that owns no output norms, else the one whose index is the block's
    number (a prune keeps positions in place), else the first. A plan in which
    every block runs once has nothing to skip.
    """
    by_block: dict[int, list[int]] = {}
    for i, p in enumerate(plan.positions):
        by_block.setdefault(p.source, []).append(i)
    skip: list[int] = []
    for block, positions in by_block.items():
        if len(positions) < 2:
            continue
        plain = [i for i in positions if not plan.positions[i].out_norm]
        in_place = [i for i in positions if i == block]
        original = (plain or in_place or positions)[0]
        skip.extend(i for i in positions if i != original)
    return sorted(skip)


def check_draft_skip(plan: Plan, skip: Sequence[int] | None) -> list[int]:
    """The positions a self-draft of ``plan`` skips: ``skip`` checked, or the replacement positions.

    Raises:
        UserError: a position out of range or named twice, a draft that would skip
            every position, or (``skip`` None) a plan with no replacement positions.
    """
    n = len(plan)
    if skip is None:
        skip = replacement_positions(plan)
        if not skip:
            raise UserError(
                "--speculative self needs positions to skip, and this model runs every block once (no replacement "
                "positions); name positions with --draft-skip I,J,... or decode without --speculative"
            )
        return skip
    bad = [i for i in skip if not 0 <= i < n]
    if bad:
        raise UserError(f"--draft-skip {','.join(map(str, bad))}: the model has positions 0..{n - 1}")
    if len(set(skip)) != len(skip):
        raise UserError(f"--draft-skip names a position twice ({','.join(map(str, skip))})")
    if not skip:
        raise UserError("--draft-skip names no position")
    if len(skip) >= n:
        raise UserError(f"--draft-skip skips all {n} positions; the draft needs at least one")
    return sorted(skip)


# ------------------------------------------------------------------ the draft: a view of the same modules
class _SlotCache(DynamicCache):
    """A KV cache with one slot per *kept* position; attention layers address it by their own ``layer_idx``."""

    def __init__(self, config, slots: dict[int, int]) -> None:
        super().__init__(config=config)
        self._slots = slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states, value_states, self._slots[layer_idx], *args, **kwargs)


class SelfDraft:
    """The model without positions ``skip``, sharing every module (and so every weight) with it.

    Args:
        model: a :class:`~prunext.core.model.PrunextForCausalLM` (or any HF causal LM
            with ``model.layers``).
        skip: positions the draft does not run.
    """

    def __init__(self, model: nn.Module, skip: Sequence[int]) -> None:
        inner = model.model
        n = len(inner.layers)
        self.skip = sorted(skip)
        self.kept = [i for i in range(n) if i not in set(self.skip)]
        if not self.kept or any(not 0 <= i < n for i in self.skip):
            raise ValueError(f"cannot skip {self.skip} of {n} positions")
        view = copy.copy(inner)  # a new module object; its dicts are re-made below so the model is untouched
        view._modules = dict(inner._modules)
        view._modules["layers"] = nn.ModuleList([inner.layers[i] for i in self.kept])
        view.config = copy.deepcopy(inner.config)
        view.config.num_hidden_layers = len(self.kept)
        if getattr(view.config, "layer_types", None) is not None:
            view.config.layer_types = [inner.config.layer_types[i] for i in self.kept]
        self.view = view
        self.lm_head = model.get_output_embeddings()
        self.slots = {inner.layers[i].self_attn.layer_idx: s for s, i in enumerate(self.kept)}

    def new_cache(self) -> DynamicCache:
        return _SlotCache(self.view.config, self.slots)

    def __call__(self, input_ids: torch.Tensor, cache: DynamicCache, start: int) -> torch.Tensor:
        """Logits of the last position, (batch, vocab), after running ``input_ids`` (batch, seq) from ``start``."""
        position_ids = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.view(input_ids=input_ids, position_ids=position_ids, use_cache=True, **{CACHE_ARG: cache}).last_hidden_state
        return self.lm_head(hidden[:, -1, :])  # (batch, vocab)

    def parameters_shared_with(self, model: nn.Module) -> bool:
        """True when every tensor the draft runs is one of ``model``'s own (no copy)."""
        own = {p.data_ptr() for p in model.parameters()}
        return all(p.data_ptr() in own for p in self.view.parameters())


# ------------------------------------------------------------------ sampling
@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when ``temperature`` is None, else sampled.

    Args:
        temperature: divides the logits (> 0); None = greedy.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``.
        seed: seeds the sampler's own ``torch.Generator``.
    """

    temperature: float | None = None
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature is None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution tokens are drawn from, (..., vocab) fp32, after temperature and top-p."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
            drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= self.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: int, generator: torch.Generator) -> tuple[bool, int]:
    """The speculative-sampling rule for one draft token (Leviathan et al. 2023, Algorithm 1).

    Args:
        p: the full model's distribution at this step, (vocab,).
        q: the draft's distribution the token was drawn from, (vocab,).
        token: the draft's token.
        generator: the random source.

    Returns:
        ``(True, token)`` when the token is kept, else ``(False, t)`` with ``t`` drawn
        from ``max(0, p - q)`` normalised; either way the token is distributed as ``p``.
    """
    ratio = (p[token] / q[token]).item() if q[token] > 0 else math.inf
    if torch.rand((), generator=generator).item() < min(1.0, ratio):
        return True, token
    residual = (p - q).clamp_min(0.0)
    total = residual.sum()
    if total <= 0:  # p == q up to rounding: any draw from p is right
        residual, total = p, p.sum()
    return False, int(torch.multinomial(residual / total, 1, generator=generator).item())


# ------------------------------------------------------------------ results
@dataclass
class DecodeResult:
    """Tokens and timings of one decoding run (batch size 1).

    ``prefill_s`` is the time to the first new token (the prompt's forward pass,
    and the draft's too when speculative); ``decode_s`` the time for the rest.
    """

    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    speculative: bool = False
    draft_tokens: int = 0
    draft_skip: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    stopped: str = "length"

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first, per second of decoding."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else float("nan")

    @property
    def acceptance_rate(self) -> float | None:
        """Fraction of drafted tokens the full model kept."""
        if not self.speculative:
            return None
        return self.accepted / self.drafted if self.drafted else float("nan")

    def to_dict(self) -> dict:
        d = {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3) if self.new_tokens > 1 else None,
            "tokens_per_s": round(self.new_tokens / (self.prefill_s + self.decode_s), 3),
            "prefill_tokens_per_s": round(self.prompt_tokens / self.prefill_s, 3) if self.prefill_s > 0 else None,
            "stopped": self.stopped,
            "speculative": self.speculative,
        }
        if self.speculative:
            d.update(draft_tokens=self.draft_tokens, draft_skip=self.draft_skip, drafted=self.drafted,
                     accepted=self.accepted, rounds=self.rounds, acceptance_rate=round(self.acceptance_rate, 4))
        return d


# ------------------------------------------------------------------ the loops
def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.greedy:
        return int(logits.argmax(-1).item())
    return int(torch.multinomial(sampling.probs(logits), 1, generator=generator).item())


def _full_step(model: nn.Module, ids: torch.Tensor, cache: DynamicCache, start: int, keep: int) -> torch.Tensor:
    """Run ``ids`` (1, seq) through the full model from position ``start``; logits of the last ``keep``, (keep, vocab)."""
    position_ids = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    out = model(input_ids=ids, position_ids=position_ids, use_cache=True, logits_to_keep=keep, **{CACHE_ARG: cache})
    return out.logits[0]


@torch.inference_mode()
def decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_token_ids: Sequence[int] = (),
    on_tokens: Callable[[list[int]], None] | None = None,
) -> DecodeResult:
    """Plain decoding with the KV cache, one full forward pass per token.

    Args:
        model: a causal LM in eval mode.
        input_ids: the prompt, (1, prompt).
        max_new_tokens: most tokens to add (>= 1).
        sampling: greedy or sampling settings.
        eos_token_ids: tokens that end the text (kept in the output).
        on_tokens: called with each list of new tokens as soon as they are chosen (streaming).
    """
    return _run(model, input_ids, max_new_tokens, sampling, eos_token_ids, on_tokens, draft=None, draft_tokens=0)


@torch.inference_mode()
def speculative_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    draft: SelfDraft,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    sampling: Sampling = Sampling(),
    eos_token_ids: Sequence[int] = (),
    on_tokens: Callable[[list[int]], None] | None = None,
) -> DecodeResult:
    """Self-speculative decoding: ``draft`` proposes ``draft_tokens`` tokens, the full model checks them at once.

    Arguments as :func:`decode`, plus the draft and K. Lossless: greedy output is
    :func:`decode`'s; sampled tokens follow the full model's distribution.
    """
    if draft_tokens < 1:
        raise ValueError("draft_tokens must be at least 1")
    return _run(model, input_ids, max_new_tokens, sampling, eos_token_ids, on_tokens, draft=draft, draft_tokens=draft_tokens)


def _run(model, input_ids, max_new_tokens, sampling, eos_token_ids, on_tokens, draft, draft_tokens) -> DecodeResult:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"decoding takes one prompt, shape (1, seq); got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=input_ids.device).manual_seed(sampling.seed)
    eos = set(eos_token_ids)
    n_prompt = input_ids.shape[1]
    result = DecodeResult([], n_prompt, 0.0, 0.0, speculative=draft is not None, draft_tokens=draft_tokens,
                          draft_skip=list(draft.skip) if draft is not None else [])

    def emit(new: list[int]) -> bool:
        """Append tokens up to the budget and the first EOS; True when decoding is over."""
        room = max_new_tokens - len(result.tokens)
        new = new[:room]
        for j, t in enumerate(new):
            if t in eos:
                new, result.stopped = new[: j + 1], "eos"
                break
        result.tokens.extend(new)
        if on_tokens is not None and new:
            on_tokens(new)
        return result.stopped == "eos" or len(result.tokens) >= max_new_tokens

    start = time.perf_counter()
    cache = DynamicCache(config=model.config)
    logits = _full_step(model, input_ids, cache, 0, keep=1)[-1]  # (vocab,)
    seen = n_prompt  # tokens in the full model's cache
    draft_cache = None
    if draft is not None:
        draft_cache = draft.new_cache()
        draft(input_ids, draft_cache, 0)
    first = _choose(logits, sampling, generator)
    done = emit([first])
    result.prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    seq = input_ids[0].tolist() + [first]
    device = input_ids.device

    while not done:
        remaining = max_new_tokens - len(result.tokens)
        k = min(draft_tokens, remaining - 1) if draft is not None else 0
        if k == 0:  # plain step: the full model runs the last token
            logits = _full_step(model, torch.tensor([seq[-1:]], device=device), cache, seen, keep=1)[-1]
            seen += 1
            token = _choose(logits, sampling, generator)
            seq.append(token)
            done = emit([token])
            continue

        # draft k tokens; the draft first catches up on the tokens its cache lacks (1 or 2)
        drafted: list[int] = []
        q_probs: list[torch.Tensor] = []
        d_seen = draft_cache.get_seq_length()
        pending = seq[d_seen:]
        for _ in range(k):
            d_logits = draft(torch.tensor([pending], device=device), draft_cache, d_seen)[-1]
            d_seen += len(pending)
            if sampling.greedy:
                token = int(d_logits.argmax(-1).item())
            else:
                q = sampling.probs(d_logits)
                token = int(torch.multinomial(q, 1, generator=generator).item())
                q_probs.append(q)
            drafted.append(token)
            pending = [token]

        # the full model checks [last, d1..dk] at once: row i predicts the token after d_i (row 0: after last)
        check = torch.tensor([seq[-1:] + drafted], device=device)
        logits = _full_step(model, check, cache, seen, keep=k + 1)  # (k + 1, vocab)
        accepted: list[int] = []
        if sampling.greedy:
            targets = logits.argmax(-1).tolist()
            for i, token in enumerate(drafted):
                if token != targets[i]:
                    break
                accepted.append(token)
            nxt = targets[len(accepted)]
        else:
            p_all = sampling.probs(logits)
            nxt = None
            for i, token in enumerate(drafted):
                kept, t = accept_or_resample(p_all[i], q_probs[i], token, generator)
                if not kept:
                    nxt = t
                    break
                accepted.append(token)
            if nxt is None:  # every draft token kept: one more from the full model's last row
                nxt = int(torch.multinomial(p_all[k], 1, generator=generator).item())
        a = len(accepted)
        result.rounds += 1
        result.drafted += k
        result.accepted += a

        # keep what is valid: the full cache holds seq + d1..da; the draft's seq + d1..d_min(a, k-1)
        if a < k:
            cache.crop(-(k - a))
        seen += 1 + a
        d_keep = len(seq) + min(a, k - 1)
        if d_seen > d_keep:
            draft_cache.crop(-(d_seen - d_keep))
        seq.extend(accepted + [nxt])
        done = emit(accepted + [nxt])

    result.decode_s = time.perf_counter() - start
    return result
