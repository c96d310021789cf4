"""Text generation: plain and lossless self-speculative decoding (FlexiGPT Sec. 4.2).

- :func:`generate`: prompt text in, new text plus counts and timings out (what ``prunext generate`` runs);
- :func:`decode`, :func:`speculative_decode`: the same on token ids;
- :class:`SelfDraft`: the model without some positions, sharing every weight;
- :func:`replacement_positions`: the positions a self-draft skips by default.
"""

from prunext.generate.api import GenerationResult, generate
from prunext.generate.speculative import (
    DEFAULT_DRAFT_TOKENS,
    DecodeResult,
    Sampling,
    SelfDraft,
    accept_or_resample,
    check_draft_skip,
    decode,
    replacement_positions,
    speculative_decode,
)

__all__ = [
    "DEFAULT_DRAFT_TOKENS",
    "DecodeResult",
    "GenerationResult",
    "Sampling",
    "SelfDraft",
    "accept_or_resample",
    "check_draft_skip",
    "decode",
    "generate",
    "replacement_positions",
    "speculative_decode",
]
