"""The parts a position may own: LoRA linears and output feature normalization."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def merge_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B @ A`` computed in fp32 and returned in ``weight``'s dtype.

    Args:
        weight: base weight, (out, in).
        lora_a: A, (rank, in).
        lora_b: B, (out, rank).
        scale: ``alpha / rank``.

    Raises:
        ValueError: when the result holds NaN or inf (as PEFT's ``safe_merge``).
    """
    merged = weight.float() + scale * (lora_b.float() @ lora_a.float())  # (out, in)
    if not torch.isfinite(merged).all():
        raise ValueError("merging a LoRA adapter produced NaN/inf; the adapter weights are broken")
    return merged.to(weight.dtype)


class LoRALinear(nn.Linear):
    """A linear layer with a frozen-by-default base ``weight`` and a LoRA update beside it.

    ``y = x W^T + b + scale * (x A^T) B^T`` with ``A: (rank, in)``, ``B: (out, rank)``
    (Hu et al. 2021, eq. 3). It *is* an ``nn.Linear``, and the base weight keeps
    the key ``weight``, so code that walks HF modules (generation, lm-eval, PEFT)
    sees the layout it expects; the adapter adds ``lora_A`` and ``lora_B``.

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether the base layer has a bias.
        rank: adapter rank (> 0).
        scale: ``alpha / rank``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        rank: int,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_lora()

    def reset_lora(self) -> None:
        """Standard LoRA start: A Kaiming-uniform, B zero, so the update is exactly 0."""
        if self.lora_A.device.type == "meta":
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        base = F.linear(x, self.weight, self.bias)  # (..., out)
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., rank) -> (..., out)
        return base + self.scale * update

    def merged_weight(self) -> torch.Tensor:
        """``W + scale * B @ A`` in the base weight's dtype; refuses a non-finite result.

        Raises:
            ValueError: when the merged weight holds NaN or inf (as PEFT ``safe_merge``).
        """
        return merge_lora(self.weight, self.lora_A, self.lora_B, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.rank}, lora_scale={self.scale:g}"


class OutputNorm(nn.LayerNorm):
    """Output feature normalization of one residual branch (FlexiGPT Sec. 3.3).

    A LayerNorm over the hidden dimension applied to a branch output before the
    residual add. Its scale starts at ``init_scale`` (small), so a new position
    first adds little to the residual stream and the model starts close to the
    one without that position.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, init_scale: float = 1e-2, **factory) -> None:
        super().__init__(hidden_size, eps=eps, **factory)
        self.init_scale = init_scale
        self.gate = 1.0  # a multiplier on the output, set by train --norm-open (prunext.train.normopen); not stored
        self.reset_scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.gate == 1.0 else out * self.gate

    def reset_scale(self) -> None:
        if self.weight.device.type == "meta":
            return
        with torch.no_grad():
            self.weight.fill_(self.init_scale)
            self.bias.zero_()
