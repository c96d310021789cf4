"""Generate text from a loaded model: the Python API behind ``prunext generate``.

::

    from prunext.core.loading import load_model
    from prunext.generate import generate

    model, tokenizer = load_model("pruned/")
    out = generate(model, tokenizer, "The capital of France is", max_new_tokens=32, speculative="self")
    print(out.text, out.stats.acceptance_rate)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import torch
from torch import nn

from prunext.core.plan import Plan
from prunext.errors import UserError
from prunext.generate.speculative import (
    DEFAULT_DRAFT_TOKENS,
    DecodeResult,
    Sampling,
    SelfDraft,
    check_draft_skip,
    decode,
    speculative_decode,
)


@dataclass
class GenerationResult:
    """What :func:`generate` made: the new text and the run's counts and timings."""

    prompt: str
    text: str
    stats: DecodeResult

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, **self.stats.to_dict()}


def check_sampling(temperature: float | None, top_p: float | None, seed: int | None) -> Sampling:
    """Sampling settings from the command line's flags: greedy unless a temperature is given.

    Raises:
        UserError: a temperature that is not a positive number, a top-p outside (0, 1],
            or ``top_p``/``seed`` without a temperature (they would change nothing).
    """
    if temperature is None:
        given = [flag for flag, value in (("--top-p", top_p), ("--seed", seed)) if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)} apply to sampling, and decoding is greedy without --temperature; add --temperature T (e.g. 0.8)")
        return Sampling()
    if not math.isfinite(temperature) or temperature <= 0:
        raise UserError(f"--temperature {temperature:g} must be a positive number (greedy decoding is the default: drop the flag)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p:g} must be in (0, 1]")
    return Sampling(temperature=temperature, top_p=1.0 if top_p is None else top_p, seed=0 if seed is None else seed)


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover, or None when the config does not say."""
    return getattr(model.config, "max_position_embeddings", None)


def check_prompt_fits(prompt_tokens: int, model: nn.Module) -> None:
    """Refuse an empty prompt or one that leaves no room in the model's context for a new token."""
    if prompt_tokens == 0:
        raise UserError("the prompt is empty; give some text with --prompt or --prompt-file")
    context = context_length(model)
    if context is not None and prompt_tokens >= context:
        raise UserError(f"the prompt is {prompt_tokens} tokens, and the model's context is {context}; shorten the prompt")


def encode_prompt(tokenizer, prompt: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The prompt as the tokenizer encodes it (BOS only if it adds one), (1, prompt) on ``device``."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    return ids.to(device)


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """The tokens that end a text: the generation config's EOS, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


class TextStream:
    """Writes decoded text as tokens arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, out: TextIO | None = None) -> None:
        self.tokenizer = tokenizer
        self.out = out or sys.stdout
        self.ids: list[int] = []
        self.written = 0

    def __call__(self, new: list[int]) -> None:
        self.ids.extend(new)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for its end
            return
        self.out.write(text[self.written :])
        self.out.flush()
        self.written = len(text)

    def close(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.written :] + "\n")
        self.out.flush()


def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    speculative: str | None = None,
    draft_tokens: int | None = None,
    draft_skip: Sequence[int] | None = None,
    stream: bool | TextIO = False,
) -> GenerationResult:
    """Continue ``prompt`` with ``model``: greedy by default, sampled with a temperature.

    Args:
        model: a loaded causal LM (:func:`prunext.core.loading.load_model`), batch size 1.
        tokenizer: its tokenizer.
        prompt: the text to continue.
        max_new_tokens: most tokens to add (decoding also stops at EOS and at the end of the context).
        temperature, top_p, seed: sampling; without a temperature decoding is greedy.
        speculative: ``"self"`` for self-speculative decoding (FlexiGPT Sec. 4.2).
        draft_tokens: tokens the draft proposes per round (default
            :data:`~prunext.generate.speculative.DEFAULT_DRAFT_TOKENS`).
        draft_skip: positions the draft skips (default: the replacement positions).
        stream: True to write the text to stdout as it is made, or a file to write it to.

    Returns:
        The new text (without the prompt) with token counts, timings and, when
        speculative, the acceptance rate.

    Raises:
        UserError: bad settings (see :func:`check_sampling`,
            :func:`~prunext.generate.speculative.check_draft_skip`), a prompt that does not fit.
    """
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    sampling = check_sampling(temperature, top_p, seed)
    if speculative not in (None, "self"):
        raise UserError(f"--speculative {speculative} is not known; the one kind is 'self'")
    if speculative is None and (draft_tokens is not None or draft_skip is not None):
        raise UserError("--draft-tokens and --draft-skip apply to --speculative self")
    if draft_tokens is not None and draft_tokens < 1:
        raise UserError(f"--draft-tokens {draft_tokens} must be at least 1")
    plan = getattr(model, "plan", None) or Plan.identity(len(model.model.layers))
    skip = check_draft_skip(plan, draft_skip) if speculative == "self" else None
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt, device)
    check_prompt_fits(ids.shape[1], model)
    context = context_length(model)
    budget = max_new_tokens if context is None else min(max_new_tokens, context - ids.shape[1])

    streamer = None
    if stream:
        streamer = TextStream(tokenizer, None if stream is True else stream)
    model.eval()
    eos = eos_ids(model, tokenizer)
    if skip is not None:
        draft = SelfDraft(model, skip)
        stats = speculative_decode(model, ids, budget, draft, draft_tokens or DEFAULT_DRAFT_TOKENS, sampling, eos, streamer)
    else:
        stats = decode(model, ids, budget, sampling, eos, streamer)
    if budget < max_new_tokens and stats.stopped == "length":
        stats.stopped = "context"
    if streamer is not None:
        streamer.close()
    text = tokenizer.decode(stats.tokens, skip_special_tokens=True)
    return GenerationResult(prompt=prompt, text=text, stats=stats)
