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
the shorter side, in float64 (:func:`top_singular`, solver ``exact``): exact to
float64 precision for the well-separated top of a weight's spectrum, and
several times faster on a CPU than a full SVD when r is much smaller than the
matrix. Solver ``randomized`` uses Halko et al.'s randomized range finder
(``torch.svd_lowrank``, float32, 2 power iterations, a fixed seed), which is
cheaper for large weights; on the built-in model it picks 10 of the 11 shared
blocks ``exact`` picks, the other a near tie (tests/prune/test_replace.py).

Under ``torch.distributed`` (torchrun) the work is split over the ranks
instead of repeated: each rank factors every ``world``-th block and the
factors are exchanged, each rank computes every ``world``-th row of the
distance matrix (the rows are summed over ranks), and each rank starts every
``world``-th replacement's adapters (the adapters are exchanged). Every rank
ends with the same matrix and adapters as one process computes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from prunext.prune.collective import merge_over_ranks, rank_and_world, sum_over_ranks

#: Singular values below this are treated as 0 when dividing by them.
_TINY = 1e-300
#: How the top singular triplets are computed (:func:`top_singular`).
SOLVERS = ("exact", "randomized")
#: Extra columns and power iterations of the randomized solver (Halko et al. 2011's usual choices).
_OVERSAMPLE, _POWER_ITERATIONS = 10, 2


def top_singular(matrix: torch.Tensor, rank: int, solver: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets of ``matrix``, in float64.

    ``exact``: from ``eigh`` of ``X^T X`` (or ``X X^T``, whichever is smaller)
    in float64: the eigenvectors are the right (left) singular vectors and the
    eigenvalues the squared singular values. The other side is ``X V / S``.
    ``randomized``: ``torch.svd_lowrank`` in float32 with ``rank + 10`` columns
    and 2 power iterations, under a fixed seed (the same on every rank, and the
    global RNG is left as it was).

    Args:
        matrix: (m, n), any float dtype.
        rank: how many triplets; capped at ``min(m, n)``.
        solver: ``exact`` or ``randomized``.

    Returns:
        ``(U, S, V)``: U (m, r), S (r,) descending, V (n, r), with
        ``U @ diag(S) @ V.T`` the best rank-r approximation of ``matrix``
        (approximately, for ``randomized``).
    """
    m, n = matrix.shape
    r = min(rank, m, n)
    if solver == "randomized":
        devices = [matrix.device.index or 0] if matrix.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(matrix.detach().to(torch.float32), q=min(r + _OVERSAMPLE, m, n), niter=_POWER_ITERATIONS)
        return u[:, :r].double(), s[:r].double(), v[:, :r].double()
    if solver != "exact":
        raise ValueError(f"unknown solver {solver!r}; one of {SOLVERS}")
    x = matrix.detach().to(torch.float64)
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


def low_rank_factors(weight: torch.Tensor, rank: int, solver: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-k reconstruction ``W-hat = L @ R.T`` of a weight, as factors (float64).

    Args:
        weight: (out, in).
        rank: k; at ``min(out, in)`` or more, ``W-hat = W``.
        solver: see :func:`top_singular`.

    Returns:
        ``(L, R)``: L = U_k S_k (out, k), R = V_k (in, k).
    """
    u, s, v = top_singular(weight, rank, solver)
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
    solver: str = "exact",
) -> torch.Tensor:
    """``d(i, j)`` for every pruned block i and kept block j (see the module docstring).

    Each weight is read once per pass over it, so ``weights`` may read from disk on
    access (``prune --offload``): with filtering, at most one linear's factors of every
    block are held; without, one linear of this rank's pruned rows and one kept block.

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
        solver: how the filtering's top singular triplets are computed (:func:`top_singular`).

    Returns:
        (len(pruned), len(kept)) float64, on the CPU; the same on every rank.
    """
    ranks = adapter_rank if isinstance(adapter_rank, Mapping) else dict.fromkeys(pruned, adapter_rank)
    names = list(weights[pruned[0]])
    rank, world = rank_and_world()
    rows = list(range(len(pruned)))[rank::world]  # this rank's rows
    out = torch.zeros(len(pruned), len(kept), dtype=torch.float64)
    for name in names:
        if filter_rank is None:
            mine = {row: weights[pruned[row]][name].to(torch.float64) for row in rows}  # (m, n) each
            for col, j in enumerate(kept):
                kept_w = weights[j][name].to(torch.float64)  # (m, n)
                for row, w in mine.items():
                    out[row, col] += tail_energy(w - kept_w, ranks[pruned[row]]).cpu()
            continue
        # W-hat of each block once, as factors: this rank factors every world-th block
        blocks = sorted({*pruned, *kept})
        factors = {b: low_rank_factors(weights[b][name], filter_rank, solver) for b in blocks[rank::world]}
        if world > 1:  # exchanged on the CPU, used where this rank computed (the CPU if it had no block)
            device = next(iter(factors.values()))[0].device if factors else torch.device("cpu")
            shared = merge_over_ranks({b: (f[0].cpu(), f[1].cpu()) for b, f in factors.items()})
            factors = {b: (f[0].to(device), f[1].to(device)) for b, f in shared.items()}
        # kept blocks in groups whose stacked (m + n) x 2k factors take about one weight's memory
        (m, k), n = factors[kept[0]][0].shape, factors[kept[0]][1].shape[0]
        group = max(1, m * n // ((m + n) * 2 * k))
        for first in range(0, len(kept), group):
            cols = range(first, min(first + group, len(kept)))
            left_j = torch.stack([factors[kept[c]][0] for c in cols])  # (J, m, k)
            right_j = torch.stack([factors[kept[c]][1] for c in cols])  # (J, n, k)
            for row in rows:
                i = pruned[row]
                out[row, first : cols.stop] += factored_tail_energy(*factors[i], left_j, right_j, ranks[i]).cpu()
    return sum_over_ranks(out)


def choose_sources(distances: torch.Tensor, pruned: Sequence[int], kept: Sequence[int]) -> dict[int, int]:
    """``{pruned block i: argmin_j d(i, j)}``; several pruned blocks may pick the same j.

    Ties go to the earliest kept block, so every rank of a distributed run
    picks the same one.
    """
    columns = torch.argmin(distances, dim=1).tolist()
    return {i: kept[c] for i, c in zip(pruned, columns)}


def svd_adapter(target: torch.Tensor, source: torch.Tensor, rank: int, solver: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors that make ``source + B @ A`` the best rank-r approximation of ``target``.

    From the truncated SVD ``target - source ~ U_r S_r V_r^T`` (FlexiGPT Sec. 3;
    docs/method.md item 4): ``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_r^T``, so with
    LoRA scale 1 the update is exactly ``U_r S_r V_r^T`` and the error is
    ``sum_{t > r} sigma_t(target - source)^2``. Unfiltered weights are used.

    Args:
        target: the pruned block's weight W_i, (out, in).
        source: the kept block's weight W_j, (out, in).
        rank: r; beyond ``min(out, in)`` the extra rows/columns are zero.
        solver: see :func:`top_singular`.

    Returns:
        ``(A, B)``: A (rank, in), B (out, rank), float64.
    """
    diff = target.to(torch.float64) - source.to(torch.float64)  # (out, in)
    _, s, v = top_singular(diff, rank, solver)
    root = s.sqrt()  # (r,)
    a = diff.new_zeros(rank, diff.shape[1])
    b = diff.new_zeros(diff.shape[0], rank)
    r = s.shape[0]
    a[:r] = root[:, None] * v.T  # (r, in)
    # U S^1/2 = X V S^-1/2: exact where S is tiny, and 0 (not NaN) where S is 0
    b[:, :r] = (diff @ v) / root.clamp_min(_TINY)  # (out, r)
    return a, b
