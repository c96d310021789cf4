"""Least-squares start for the output norms of flexigpt replacements (``prune --out-norm-init fit``).

A replacement at position i runs kept block j plus adapters, and each of its
two branches (attention, MLP) ends in an output norm ``gamma * LN(y) + beta``
(``LN`` without its affine part). The paper starts ``gamma`` small, so the
replacement first adds almost nothing: the model starts as if block i were
dropped, and the adapters' gradients are scaled down by ``gamma`` too.

``fit`` instead chooses, per feature d, the ``gamma_d, beta_d`` that best
reproduce what the pruned block's own branch computed on the calibration
windows, given the same input::

    min over gamma_d, beta_d of  sum over tokens t of  (gamma_d * LN(y_t)_d + beta_d - o_t,d)^2
    y_t = replacement branch output,  o_t = block i's original branch output on the same input

(``LN`` is ``y / rms(y)`` and there is no ``beta`` in a sandwich or post-norm family,
whose output norms replace the block's post-branch RMSNorm; ``o_t`` is then the pruned
block's branch output after its own post-branch norm), which is ordinary least squares per feature:
``gamma_d = cov(LN(y)_d, o_d) / var(LN(y)_d)`` and ``beta_d = mean(o_d) - gamma_d * mean(LN(y)_d)``.
``gamma = beta = 0`` (the block dropped) is one of the candidates, so on the
calibration data each branch ends no farther from the original than dropping it.

Positions are fitted in depth order, attention before MLP, each on the model
with the earlier fits in place (one forward pass per branch, stopped at the
branch being fitted). Under torchrun each rank takes ``windows[rank::world]``
and the moments are summed over ranks, as in block scoring.
"""

from __future__ import annotations

import logging

import torch

from prunext.prune.collective import rank_and_world, sum_over_ranks

log = logging.getLogger(__name__)

#: Tokens the fit uses at most (the first windows): two numbers per feature need few.
FIT_TOKENS = 8192


class _Stop(Exception):
    """Raised by the hook once the fitted branch has run, to skip the rest of the forward pass."""


class Moments:
    """Running sums of (x, x^2, o, x*o) per feature over tokens, in float64."""

    def __init__(self, hidden: int) -> None:
        self.sums = torch.zeros(4, hidden, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor, o: torch.Tensor) -> None:
        """``x``, ``o``: (..., hidden)."""
        x = x.reshape(-1, x.shape[-1]).double().cpu()
        o = o.reshape(-1, o.shape[-1]).double().cpu()
        self.sums += torch.stack([x.sum(0), (x * x).sum(0), o.sum(0), (x * o).sum(0)])
        self.count += x.shape[0]

    def all_reduce(self) -> None:
        packed = sum_over_ranks(torch.cat([self.sums.flatten(), torch.tensor([float(self.count)], dtype=torch.float64)]))
        self.sums, self.count = packed[:-1].view_as(self.sums), int(round(packed[-1].item()))

    def solve(self, intercept: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature least squares ``(gamma, beta)`` of ``o ~ gamma * x + beta`` (float64).

        Without ``intercept`` (an RMS output norm has no bias): ``o ~ gamma * x``, ``beta = 0``.
        """
        if self.count == 0:
            raise ValueError("no calibration tokens reached the fitted branch")
        mx, mxx, mo, mxo = self.sums / self.count
        if not intercept:
            gamma = torch.where(mxx > 1e-12, mxo / mxx.clamp_min(1e-12), torch.zeros_like(mxx))
            return gamma, torch.zeros_like(gamma)
        var = mxx - mx * mx
        cov = mxo - mx * mo
        gamma = torch.where(var > 1e-12, cov / var.clamp_min(1e-12), torch.zeros_like(var))
        return gamma, mo - gamma * mx


def _branch_hook(norm, original, original_post, moments: Moments, attention: bool):
    """Hook on the replacement's branch: the normalised branch output against the pruned block's on the same input.

    ``original_post`` is the pruned block's own post-branch norm (sandwich and post-norm
    families), whose output is what the block added to the residual stream; None on pre-norm blocks.
    """

    def hook(module, args, kwargs, output):
        y = output[0] if attention else output
        o = original(*args, **kwargs)
        o = o[0] if attention else o
        if original_post is not None:
            o = original_post(o)
        moments.add(norm.normalize(y), o.float())
        raise _Stop

    return hook


@torch.no_grad()
def fit_out_norms(model, source, sources: dict[int, int], windows: torch.Tensor, batch_size: int, device: str,
                  progress: bool = True) -> dict[int, dict[str, float]]:  # fmt: skip
    """Set the output norms of every replacement by least squares (module docstring).

    Args:
        model: the pruned model, adapters initialised (built from ``source``, so it shares its tensors).
        source: the unpruned model; ``source.model.layers[i]`` is block i with its own weights.
        sources: ``{pruned block i: kept block j}``; position i holds the replacement.
        windows: (n, seq_len) calibration token windows; at most :data:`FIT_TOKENS` tokens are used.
        batch_size: windows per forward pass.
        device: where ``model`` and ``source`` are.

    Returns:
        ``{i: {"attn_gamma_mean": ..., "mlp_gamma_mean": ...}}``: the mean ``|gamma|`` each fit chose
        (for the report: how far each branch was opened).
    """
    from tqdm.auto import tqdm

    rank, world = rank_and_world()
    seq_len = windows.shape[1]
    use = windows[: max(1, FIT_TOKENS // seq_len)][rank::world]
    was_training = model.training
    model.eval()
    errors: dict[int, dict[str, float]] = {}
    steps = [(i, branch) for i in sorted(sources) for branch in ("attn", "mlp")]
    bar = tqdm(steps, desc="fitting output norms", disable=not progress or rank != 0)
    for i, branch in bar:
        layer, original = model.model.layers[i], source.model.layers[i]
        norm = layer.attn_out_norm if branch == "attn" else layer.mlp_out_norm
        fitted = layer.self_attn if branch == "attn" else layer.mlp
        moments = Moments(norm.weight.shape[0])
        post = layer.family.post_norm(branch)
        hook = _branch_hook(norm, original.self_attn if branch == "attn" else original.mlp,
                            getattr(original, post) if post else None, moments, branch == "attn")  # fmt: skip
        handle = fitted.register_forward_hook(hook, with_kwargs=True)
        try:
            for start in range(0, use.shape[0], batch_size):
                try:
                    model(input_ids=use[start : start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        moments.all_reduce()
        gamma, beta = moments.solve(intercept=norm.bias is not None)
        errors.setdefault(i, {})[f"{branch}_gamma_mean"] = gamma.abs().mean().item()
        norm.weight.copy_(gamma.to(norm.weight.dtype))
        if norm.bias is not None:
            norm.bias.copy_(beta.to(norm.bias.dtype))
    model.train(was_training)
    log.info("fitted the output norms of %d replacement positions on %d tokens", len(sources), use.numel() * world)
    return errors
