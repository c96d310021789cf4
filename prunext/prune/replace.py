"""Which kept block replaces each pruned block, and the SVD start of its adapters.

Pure tensor functions (FlexiGPT, arXiv 2501.14713, Sec. 3; docs/method.md, "The
prune path", items 3-4). For a pruned block i and a kept block j, with
``W-hat`` the rank-k reconstruction of a weight ("low-rank filtering", k =
``filter_rank``) and r = the adapter rank::

    d(i, j) = sum over the 7 linears of || W-hat_i - (W-hat_j + SVD_r(W-hat_i - W-hat_j)) ||_F^2

The pruned block is replaced by the kept block whose weights plus a rank-r
adapter can come closest to it: ``argmin_j d(i, j)``.

Two identities make this cheap (Eckart-Young):

* ``||X - SVD_r(X)||_F^2 = sum_{t > r} sigma_t(X)^2``: each term is the energy
  of ``W-hat_i - W-hat_j`` beyond its top r singular values, so only singular
  *values* are needed (``torch.linalg.svdvals``), never a reconstruction.
* ``W-hat = L R^T`` with ``L`` (out, k) and ``R`` (in, k), so
  ``W-hat_i - W-hat_j = [L_i, -L_j] [R_i, R_j]^T``. With thin QRs
  ``[L_i, -L_j] = Q_1 R_1`` and ``[R_i, R_j] = Q_2 R_2``, its singular values are
  those of the (2k x 2k) core ``R_1 R_2^T``. On SmolLM2 (k = 36) that is a
  72 x 72 SVD instead of one of up to 1536 x 576, per pair and linear.

Top singular triplets come from the eigendecomposition of the Gram matrix of
the shorter side, in float64 (:func:`top_singular`): exact to float64
precision for the well-separated top of a weight's spectrum, and several
times faster on a CPU than a full SVD when r is much smaller than the matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

#: Singular values below this are treated as 0 when dividing by them.
_TINY = 1e-300


def top_singular(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets of ``matrix``, in float64.

    Computed from ``eigh`` of ``X^T X`` (or ``X X^T``, whichever is smaller):
    the eigenvectors are the right (left) singular vectors and the eigenvalues
    the squared singular values. The other side is ``X V / S``.

    Args:
        matrix: (m, n), any float dtype.
        rank: how many triplets; capped at ``min(m, n)``.

    Returns:
        ``(U, S, V)``: U (m, r), S (r,) descending, V (n, r), with
        ``U @ diag(S) @ V.T`` the best rank-r approximation of ``matrix``.
    """
    x = matrix.detach().to(torch.float64)
    m, n = x.shape
    r = min(rank, m, n)
    if n <= m:
        evals, evecs = torch.linalg.eigh(x.T @ x)  # ascending, (n,), (n, n)
        v = evecs[:, n - r :].flip(-1)  # (n, r)
        s = evals[n - r :].flip(-1).clamp_min(0).sqrt()  # (r,)
        u = (x @ v) / s.clamp_min(_TINY)  # (m, r)
    else:
        evals, evecs = torch.linalg.eigh(x @ x.T)  # (m,), (m, m)
        u = evecs[:, m - r :].flip(-1)  # (m, r)
        s = evals[m - r :].flip(-1).clamp_min(0).sqrt()
        v = (x.T @ u) / s.clamp_min(_TINY)  # (n, r)
    return u, s, v


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-k reconstruction ``W-hat = L @ R.T`` of a weight, as factors (float64).

    Args:
        weight: (out, in).
        rank: k; at ``min(out, in)`` or more, ``W-hat = W``.

    Returns:
        ``(L, R)``: L = U_k S_k (out, k), R = V_k (in, k).
    """
    u, s, v = top_singular(weight, rank)
    return u * s, v  # (out, k), (in, k)


def tail_energy(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """``||X - SVD_r(X)||_F^2`` as the sum of the squared singular values beyond the first r.

    Args:
        matrix: (..., m, n); batched matrices give a batch of energies.
        rank: r.

    Returns:
        (...,) float64.
    """
    s = torch.linalg.svdvals(matrix.to(torch.float64))  # (..., min(m, n)), descending
    return (s[..., rank:] ** 2).sum(-1)


def factored_tail_energy(
    left_i: torch.Tensor, right_i: torch.Tensor, left_j: torch.Tensor, right_j: torch.Tensor, rank: int
) -> torch.Tensor:
    """:func:`tail_energy` of ``L_i R_i^T - L_j R_j^T`` for a batch of j, from the factors only.

    Args:
        left_i: (m, k) float64.
        right_i: (n, k) float64.
        left_j: (J, m, k) float64.
        right_j: (J, n, k) float64.
        rank: r.

    Returns:
        (J,) float64.
    """
    count = left_j.shape[0]
    lefts = torch.cat([left_i.expand(count, -1, -1), -left_j], dim=-1)  # (J, m, 2k)
    rights = torch.cat([right_i.expand(count, -1, -1), right_j], dim=-1)  # (J, n, 2k)
    r_left = torch.linalg.qr(lefts, mode="r").R  # (J, min(m, 2k), 2k)
    r_right = torch.linalg.qr(rights, mode="r").R  # (J, min(n, 2k), 2k)
    return tail_energy(r_left @ r_right.transpose(-1, -2), rank)  # core: (J, min(m, 2k), min(n, 2k))


def distance_matrix(
    weights: Mapping[int, Mapping[str, torch.Tensor]],
    pruned: Sequence[int],
    kept: Sequence[int],
    adapter_rank: int | Mapping[int, int],
    filter_rank: int | None,
) -> torch.Tensor:
    """``d(i, j)`` for every pruned block i and kept block j (see the module docstring).

    Args:
        weights: ``{block: {linear name: weight (out, in)}}`` for every block in
            ``pruned`` and ``kept``; the same linear names in every block.
        pruned: pruned blocks (rows).
        kept: kept blocks (columns).
        adapter_rank: r, the rank the adapter can add: one for every pruned block, or
            ``{pruned block: r}`` when replacements get different ranks (the hybrid's split).
        filter_rank: k of the low-rank filtering; ``None`` compares the raw
            weights (``d = sum ||W_i - (W_j + SVD_r(W_i - W_j))||^2``, the
            "no low-rank filtering" ablation).

    Returns:
        (len(pruned), len(kept)) float64.
    """
    ranks = adapter_rank if isinstance(adapter_rank, Mapping) else dict.fromkeys(pruned, adapter_rank)
    names = list(next(iter(weights.values())))
    device = weights[pruned[0]][names[0]].device
    out = torch.zeros(len(pruned), len(kept), dtype=torch.float64, device=device)
    if filter_rank is None:
        for name in names:
            kept_w = torch.stack([weights[j][name] for j in kept]).to(torch.float64)  # (J, m, n)
            for row, i in enumerate(pruned):
                out[row] += tail_energy(weights[i][name].to(torch.float64) - kept_w, ranks[i])
        return out
    for name in names:
        # W-hat of each block once, as factors
        factors = {b: low_rank_factors(weights[b][name], filter_rank) for b in {*pruned, *kept}}
        left_j = torch.stack([factors[j][0] for j in kept])  # (J, m, k)
        right_j = torch.stack([factors[j][1] for j in kept])  # (J, n, k)
        for row, i in enumerate(pruned):
            out[row] += factored_tail_energy(*factors[i], left_j, right_j, ranks[i])
    return out


def choose_sources(distances: torch.Tensor, pruned: Sequence[int], kept: Sequence[int]) -> dict[int, int]:
    """``{pruned block i: argmin_j d(i, j)}``; several pruned blocks may pick the same j.

    Ties go to the earliest kept block, so every rank of a distributed run
    picks the same one.
    """
    columns = torch.argmin(distances, dim=1).tolist()
    return {i: kept[c] for i, c in zip(pruned, columns)}


def svd_adapter(target: torch.Tensor, source: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors that make ``source + B @ A`` the best rank-r approximation of ``target``.

    From the truncated SVD ``target - source ~ U_r S_r V_r^T`` (FlexiGPT Sec. 3;
    docs/method.md item 4): ``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_r^T``, so with
    LoRA scale 1 the update is exactly ``U_r S_r V_r^T`` and the error is
    ``sum_{t > r} sigma_t(target - source)^2``. Unfiltered weights are used.

    Args:
        target: the pruned block's weight W_i, (out, in).
        source: the kept block's weight W_j, (out, in).
        rank: r; beyond ``min(out, in)`` the extra rows/columns are zero.

    Returns:
        ``(A, B)``: A (rank, in), B (out, rank), float64.
    """
    diff = target.to(torch.float64) - source.to(torch.float64)  # (out, in)
    _, s, v = top_singular(diff, rank)
    root = s.sqrt()  # (r,)
    a = diff.new_zeros(rank, diff.shape[1])
    b = diff.new_zeros(diff.shape[0], rank)
    r = s.shape[0]
    a[:r] = root[:, None] * v.T  # (r, in)
    # U S^1/2 = X V S^-1/2: exact where S is tiny, and 0 (not NaN) where S is 0
    b[:, :r] = (diff @ v) / root.clamp_min(_TINY)  # (out, r)
    return a, b
