"""The parts a position may own: LoRA linears and output feature normalization."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, parts: tuple[tuple[int, int], ...], out_features: int) -> torch.Tensor:
    """``B @ A`` of an adapter as an (out, in) fp32 matrix; rows outside every part are 0.

    Args:
        lora_a: A, (len(parts) * rank, in): the parts' A matrices stacked.
        lora_b: B, (sum of the parts' rows, rank): the parts' B matrices stacked.
        parts: ``(first row, rows)`` of each adapted part of the output, ascending.
        out_features: rows of the weight.
    """
    rank = lora_b.shape[1]
    delta = lora_a.new_zeros(out_features, lora_a.shape[1], dtype=torch.float32)  # (out, in)
    b_row = 0
    for p, (start, rows) in enumerate(parts):
        delta[start : start + rows] = lora_b[b_row : b_row + rows].float() @ lora_a[p * rank : (p + 1) * rank].float()
        b_row += rows
    return delta


def merge_lora(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    parts: tuple[tuple[int, int], ...] | None = None,
) -> torch.Tensor:
    """``W + scale * B @ A`` computed in fp32 and returned in ``weight``'s dtype.

    Args:
        weight: base weight, (out, in).
        lora_a: A, (rank, in), or the parts' A matrices stacked for a fused linear.
        lora_b: B, (out, rank), or the parts' B matrices stacked.
        scale: ``alpha / rank``.
        parts: ``(first row, rows)`` of each adapted part of a fused linear (:class:`LoRALinear`);
            None: one adapter over all rows.

    Raises:
        ValueError: when the result holds NaN or inf (as PEFT's ``safe_merge``).
    """
    parts = parts or ((0, weight.shape[0]),)
    merged = weight.float() + scale * lora_delta(lora_a, lora_b, parts, weight.shape[0])  # (out, in)
    if not torch.isfinite(merged).all():
        raise ValueError("merging a LoRA adapter produced NaN/inf; the adapter weights are broken")
    return merged.to(weight.dtype)


class LoRALinear(nn.Linear):
    """A linear layer with a frozen-by-default base ``weight`` and a LoRA update beside it.

    ``y = x W^T + b + scale * (x A^T) B^T`` with ``A: (rank, in)``, ``B: (out, rank)``
    (Hu et al. 2021, eq. 3). It *is* an ``nn.Linear``, and the base weight keeps
    the key ``weight``, so code that walks HF modules (generation, lm-eval, PEFT)
    sees the layout it expects; the adapter adds ``lora_A`` and ``lora_B``.

    A fused linear (Phi-3's ``qkv_proj``: the rows of q, then k, then v) carries one
    adapter per logical part it adapts, as separate linears would: ``parts`` lists
    their rows, ``lora_A`` stacks their A matrices and ``lora_B`` their B matrices::

        lora_A  (P * rank, in)      [A_q; A_k; A_v]
        lora_B  (sum rows, rank)    [B_q; B_k; B_v]      update rows of part p = x A_p^T B_p^T

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether the base layer has a bias.
        rank: adapter rank (> 0).
        scale: ``alpha / rank``.
        parts: ``(first row, rows)`` of each adapted part, ascending; None: one adapter over all rows.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        rank: int,
        scale: float = 1.0,
        parts: tuple[tuple[int, int], ...] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.scale = scale
        self.parts = tuple(parts) if parts else ((0, out_features),)
        rows = sum(r for _, r in self.parts)
        self.lora_A = nn.Parameter(torch.empty(len(self.parts) * rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(rows, rank, device=device, dtype=dtype))
        self.reset_lora()

    @property
    def whole(self) -> bool:
        """True when one adapter covers every output row (an unfused linear)."""
        return self.parts == ((0, self.out_features),)

    def part_rows(self, start: int) -> tuple[slice, slice]:
        """Which rows of ``lora_A`` and ``lora_B`` hold the adapter of the part whose rows begin at ``start``."""
        b_row = 0
        for p, (first, rows) in enumerate(self.parts):
            if first == start:
                return slice(p * self.rank, (p + 1) * self.rank), slice(b_row, b_row + rows)
            b_row += rows
        raise KeyError(f"no adapted part starts at row {start}; parts are {self.parts}")

    def reset_lora(self) -> None:
        """Standard LoRA start: A Kaiming-uniform, B zero, so the update is exactly 0."""
        if self.lora_A.device.type == "meta":
            return
        with torch.no_grad():
            for p in range(len(self.parts)):  # each part as its own (rank, in) matrix
                nn.init.kaiming_uniform_(self.lora_A[p * self.rank : (p + 1) * self.rank], a=math.sqrt(5))
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        base = F.linear(x, self.weight, self.bias)  # (..., out)
        low = F.linear(x, self.lora_A)  # (..., P * rank)
        if self.whole:
            return base + self.scale * F.linear(low, self.lora_B)  # (..., out)
        pieces, row, b_row = [], 0, 0
        for p, (start, rows) in enumerate(self.parts):
            if start > row:
                pieces.append(low.new_zeros(*low.shape[:-1], start - row))
            part = low[..., p * self.rank : (p + 1) * self.rank]  # (..., rank)
            pieces.append(F.linear(part, self.lora_B[b_row : b_row + rows]))  # (..., rows)
            row, b_row = start + rows, b_row + rows
        if row < self.out_features:
            pieces.append(low.new_zeros(*low.shape[:-1], self.out_features - row))
        return base + self.scale * torch.cat(pieces, dim=-1)  # (..., out)

    def merged_weight(self) -> torch.Tensor:
        """``W + scale * B @ A`` in the base weight's dtype; refuses a non-finite result.

        Raises:
            ValueError: when the merged weight holds NaN or inf (as PEFT ``safe_merge``).
        """
        return merge_lora(self.weight, self.lora_A, self.lora_B, self.scale, self.parts)

    def extra_repr(self) -> str:
        fused = "" if self.whole else f", lora_parts={self.parts}"
        return f"{super().extra_repr()}, lora_rank={self.rank}, lora_scale={self.scale:g}{fused}"


class OutputNorm(nn.Module):
    """Output feature normalization of one residual branch (FlexiGPT Sec. 3.3).

    Applied to a branch output before the residual add. Its scale starts at
    ``init_scale`` (small), so a new position first adds little to the residual
    stream and the model starts close to the one without that position.

    Two kinds (:attr:`prunext.core.families.Family.out_norm_kind`):

    - ``"layernorm"``: ``gamma * LN(y) + beta`` over the hidden size, added on a pre-norm
      block's branch (FlexiGPT's own); ``weight`` = gamma, ``bias`` = beta.
    - ``"rms"``: ``g * y / rms(y)``, computed in fp32 as Gemma and OLMo-2 do, in place of a
      sandwich or post-norm block's own post-branch RMSNorm; ``weight`` = the gain g itself
      (not Gemma's ``w`` of ``1 + w``), no bias.

    Args:
        hidden_size: the width normalised over.
        eps: the family's norm epsilon.
        init_scale: the scale the weight starts at (:meth:`reset_scale`).
        kind: ``"layernorm"`` or ``"rms"``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, init_scale: float = 1e-2, kind: str = "layernorm", **factory) -> None:
        super().__init__()
        if kind not in ("layernorm", "rms"):
            raise ValueError(f"unknown output norm kind {kind!r}")
        self.kind = kind
        self.normalized_shape = (hidden_size,)
        self.eps = eps
        self.init_scale = init_scale
        self.weight = nn.Parameter(torch.empty(hidden_size, **factory))
        self.bias = nn.Parameter(torch.empty(hidden_size, **factory)) if kind == "layernorm" else None
        self.gate = 1.0  # a multiplier on the output, set by train --norm-open (prunext.train.normopen); not stored
        self.reset_scale()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised input before the affine part, in fp32: ``LN(y)`` or ``y / rms(y)``."""
        x = x.float()
        if self.kind == "layernorm":
            return F.layer_norm(x, self.normalized_shape, eps=self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., hidden)
        if self.kind == "layernorm":
            out = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            out = (self.normalize(x) * self.weight.float()).type_as(x)
        return out if self.gate == 1.0 else out * self.gate

    def reset_scale(self, gain: torch.Tensor | None = None) -> None:
        """Start the weight at ``init_scale``, or at ``init_scale * gain`` per feature (a sandwich block's own gain)."""
        if self.weight.device.type == "meta":
            return
        with torch.no_grad():
            if gain is None:
                self.weight.fill_(self.init_scale)
            else:
                self.weight.copy_(self.init_scale * gain.float())
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, kind={self.kind}, eps={self.eps}, init_scale={self.init_scale:g}"
