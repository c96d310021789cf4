"""Which transformer blocks matter least: importance scores over calibration text.

Notation: ``x_i`` is the hidden state entering block ``i`` (``x_0`` are the
token embeddings) and ``x_L`` is what the last block returns, *before* the
final norm. Per token ``t``, ``cos_{a,b}(t) = cos(x_a(t), x_b(t))`` over the
hidden dimension. Three metrics (docs/method.md, "The prune path")::

    bi          BI_i      = 1 - mean_t cos_{i,i+1}(t)          per block, L scores
                ShortGPT (Men et al. 2024, Sec. 3): remove the LOWEST first.
    angular     d_s       = mean_t arccos(cos_{s,s+n}(t)) / pi  per window of n blocks
                Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the
                Deeper Layers", Sec. 3.2, d(x^l, x^{l+n})): remove the window
                with the LOWEST distance.
    streamline  c_s       = mean_t cos_{s,s+n}(t)               per window of n blocks
                LLM-Streamline (Chen et al. 2024, Sec. 3.1): remove the window
                with the HIGHEST cosine.

    scores index:  bi -> block i;  angular/streamline -> window of blocks s..s+n-1

Gromov et al. measure the angular distance on the last token of each sequence
only; prunext averages over every token of every window, as ShortGPT and
LLM-Streamline do, so all three metrics see the same statistics and short
calibration sets still give a stable estimate. :class:`BlockScores` knows each
metric's direction (:meth:`BlockScores.ranking`, :meth:`BlockScores.least_important`),
so callers never compare scores themselves.

Both entry points make one pass over the calibration windows and keep float64
running sums of the per-token statistic, never more activations than one batch
(in memory) or one layer's worth (offloaded). Under ``torch.distributed`` with
more than one rank, each rank scores ``windows[rank::world]`` and the sums are
all-reduced, so every rank returns the same scores as one process would.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunext.prune.collective import rank_and_world, sum_over_ranks

log = logging.getLogger(__name__)

METRICS = ("bi", "angular", "streamline")
# ``prune --importance`` chooses how the per-block methods (flexigpt, shortgpt, shortgpt-lora) pick blocks:
# ``bi``: one pass, ShortGPT's Block Influence; ``bi-iterative``: BI recomputed after each removal, on the
# model with the blocks removed so far skipped (:func:`score_blocks_iterative`); ``ppl``: Shortened LLaMA's
# one-shot criterion, the calibration LM loss with each block skipped in turn, lowest first (:func:`score_blocks_ppl`);
# ``best``: the one of those three whose chosen set, skipped together, leaves the lowest loss (:func:`score_blocks_best`).

#: For each metric, whether a LOW score means "remove first".
_LOW_IS_REDUNDANT = {"bi": True, "angular": True, "streamline": False, "bi-iterative": True, "ppl": True}


@dataclass
class BlockScores:
    """Importance scores of a model's blocks, with the direction of each metric built in.

    Attributes:
        metric: ``"bi"``, ``"angular"`` or ``"streamline"``.
        window: n, the number of consecutive blocks one score covers (1 for ``"bi"``).
        scores: ``bi``: length L, ``scores[i]`` is block i's BI; ``angular``/``streamline``:
            length L - n + 1, ``scores[s]`` covers blocks ``s .. s+n-1``.
        tokens: calibration tokens seen, summed over all ranks.
        order: ``bi-iterative``: the blocks in the order they were removed (each one's score is its BI
            when it was removed); they rank first, in that order. None for the one-pass metrics.
        candidates: ``best``: each criterion's calibration loss with its choice of blocks skipped (these
            scores are the winner's). None otherwise.
    """

    metric: str
    window: int
    scores: list[float]
    tokens: int
    order: list[int] | None = None
    candidates: dict[str, float] | None = None

    @property
    def num_blocks(self) -> int:
        """L, the number of blocks the model had when scored."""
        return len(self.scores) + self.window - 1

    def ranking(self) -> list[int]:
        """Score indices ordered from "remove first" to "remove last".

        ``bi`` and ``angular``: ascending score; ``streamline``: descending
        cosine. Ties go to the lower index (a stable sort).
        """
        sign = 1.0 if _LOW_IS_REDUNDANT[self.metric] else -1.0
        first = list(self.order or [])
        rest = sorted((i for i in range(len(self.scores)) if i not in first), key=lambda i: sign * self.scores[i])
        return first + rest

    def best_window(self) -> int:
        """Index of the most redundant score: the first block of the window to remove (for ``bi``, the block)."""
        return self.ranking()[0]

    def least_important(self, k: int) -> list[int]:
        """The k blocks to remove, in ascending block order.

        ``bi``: the k blocks with the lowest BI. ``angular``/``streamline``: the
        blocks of the most redundant window, which requires ``k == window``
        (windows of another size need another scoring pass).

        Raises:
            ValueError: k out of range, or k differs from a windowed metric's n.
        """
        if not 0 <= k <= self.num_blocks:
            raise ValueError(f"cannot choose {k} of {self.num_blocks} blocks")
        if self.window == 1:
            if self.order is not None and k > len(self.order):
                raise ValueError(f"{self.metric} scores removed {len(self.order)} blocks one by one, not {k}; score again")
            return sorted(self.ranking()[:k])
        if k == 0:
            return []
        if k != self.window:
            raise ValueError(
                f"{self.metric} scores cover windows of {self.window} blocks, not {k}; score again with window={k}"
            )
        start = self.best_window()
        return list(range(start, start + self.window))

    def to_dict(self) -> dict:
        """JSON-ready: the four fields plus ``remove_first`` ("lowest"/"highest") for readers of reports."""
        d = asdict(self)
        for key in ("order", "candidates"):
            if d[key] is None:
                del d[key]
        d["remove_first"] = "lowest" if _LOW_IS_REDUNDANT[self.metric] else "highest"
        return d


# --------------------------------------------------------------------------- statistics
def _check_args(metric: str, window: int, num_blocks: int, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    if metric not in METRICS:
        raise ValueError(f"unknown importance metric '{metric}'; choose one of {', '.join(METRICS)}")
    if isinstance(window, bool) or not isinstance(window, int):
        raise ValueError(f"window must be an integer number of blocks, got {window!r}")
    if metric == "bi" and window != 1:
        raise ValueError(
            f"the bi metric scores single blocks; window must be 1, got {window} (angular and streamline score windows)"
        )
    if not 1 <= window <= num_blocks:
        raise ValueError(f"window must be between 1 and the model's {num_blocks} blocks, got {window}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    windows = torch.as_tensor(windows)
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] == 0:
        raise ValueError(
            f"calibration windows must be a non-empty (n_windows, seq_len) tensor, got shape {tuple(windows.shape)}"
        )
    if windows.is_floating_point() or windows.is_complex() or windows.dtype == torch.bool:
        raise ValueError(f"calibration windows must hold integer token ids, got {windows.dtype}")
    return windows.long()


def _token_values(metric: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The per-token statistic between two hidden states.

    Args:
        a, b: (batch, seq, hidden), any float dtype.

    Returns:
        (batch, seq) float64: cosine (bi, streamline) or arccos(cosine) / pi (angular).
    """
    # Cosine in float32 at least (bf16 models), the rest in float64 for the sums.
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1).double()  # (batch, seq)
    if metric == "angular":
        return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
    return cos


class _RunningSums:
    """float64 running sums of the per-token statistic, one per score index, and a token count."""

    def __init__(self, metric: str, window: int, num_blocks: int) -> None:
        self.metric = metric
        self.window = window
        self.sums = [0.0] * (num_blocks - window + 1)
        self.tokens = 0

    def add(self, start: int, x_start: torch.Tensor, x_end: torch.Tensor) -> None:
        """Accumulate the pair ``(x_start, x_{start+n})``, both (batch, seq, hidden)."""
        self.sums[start] += _token_values(self.metric, x_start, x_end).sum().item()

    def scores(self) -> BlockScores:
        """All-reduce over ranks (when distributed) and turn sums into means."""
        packed = sum_over_ranks(torch.tensor([*self.sums, float(self.tokens)], dtype=torch.float64)).tolist()
        sums, tokens = packed[:-1], int(round(packed[-1]))
        if tokens == 0:
            raise ValueError("no calibration tokens were scored")
        means = [s / tokens for s in sums]
        if self.metric == "bi":
            means = [1.0 - m for m in means]
        return BlockScores(metric=self.metric, window=self.window, scores=means, tokens=tokens)


def _progress(iterable, total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    rank, _ = rank_and_world()
    return tqdm(iterable, total=total, desc=desc, disable=not progress or rank != 0)


def _block_output(out) -> torch.Tensor:
    # transformers 5 decoder layers return a tensor; older ones and some families a tuple.
    return out[0] if isinstance(out, (tuple, list)) else out


# --------------------------------------------------------------------------- in memory
@torch.no_grad()
def score_blocks(
    model: nn.Module,
    windows: torch.LongTensor,
    metric: str,
    window: int = 1,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> BlockScores:
    """Score every block (bi) or every window of n blocks (angular, streamline) in one pass.

    Hooks on the blocks capture each block's input ``x_i`` (pre-hooks) and the
    last block's output ``x_L`` (a forward hook), so the final norm never
    enters the scores. Only the last n states of the current batch are held;
    statistics go into float64 running sums. The forward runs the inner
    ``model.model`` (no LM head, no logits).

    Args:
        model: a causal LM with ``model.model.layers`` (plain HF, or
            ``PrunextForCausalLM``, whose positions are then what is scored).
            Moved to ``device`` if it is not there; runs in eval mode and
            gets its training mode back afterwards.
        windows: (n_windows, seq_len) token ids; every token counts (no padding).
        metric: one of :data:`METRICS`.
        window: n, blocks per window; must be 1 for ``"bi"``.
        batch_size: windows per forward pass (per rank).
        device: where the forward runs.
        progress: show a progress bar over batches (rank 0 only).

    Returns:
        The scores; identical on every rank when ``torch.distributed`` is initialised.

    Raises:
        ValueError: unknown metric, window out of range, ``bi`` with window != 1,
            malformed windows.
    """
    layers = model.model.layers
    num_blocks = len(layers)
    windows = _check_args(metric, window, num_blocks, windows, batch_size)
    rank, world = rank_and_world()
    local = windows[rank::world]
    device = torch.device(device)
    first = next(model.parameters(), None)
    if first is not None and first.device != device:
        model.to(device)

    sums = _RunningSums(metric, window, num_blocks)
    # The last n states of the current batch: x_{j-n} .. x_{j-1} when x_j arrives.
    recent: deque[torch.Tensor] = deque(maxlen=window)

    def on_state(j: int, x: torch.Tensor) -> None:
        if j >= window:
            sums.add(j - window, recent[0], x)
        recent.append(x)

    def pre_hook(j):
        def hook(module, args, kwargs):
            on_state(j, args[0] if args else kwargs["hidden_states"])

        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(j), with_kwargs=True) for j, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(lambda module, args, out: on_state(num_blocks, _block_output(out))))
    was_training = model.training
    model.eval()
    try:
        starts = range(0, local.shape[0], batch_size)
        for s in _progress(starts, len(starts), f"scoring blocks ({metric})", progress):
            batch = local[s : s + batch_size].to(device)  # (batch, seq)
            model.model(input_ids=batch, use_cache=False)
            sums.tokens += batch.numel()
            recent.clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    scores = sums.scores()
    log.info("%s scores of %d blocks (window %d) over %d tokens", metric, num_blocks, window, scores.tokens)
    return scores


# --------------------------------------------------------------------------- other criteria
def _skip(layer: nn.Module):
    """Make ``layer`` return its input (the block removed) until the returned handle is removed."""

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, (tuple, list)) else x

    return layer.register_forward_hook(hook, with_kwargs=True)


def score_blocks_iterative(model: nn.Module, windows: torch.LongTensor, count: int, batch_size: int = 8,
                           device: str | torch.device = "cpu", progress: bool = True,
                           first: BlockScores | None = None) -> BlockScores:  # fmt: skip
    """``bi-iterative``: remove ``count`` blocks one at a time, each the lowest BI of the model without the earlier ones.

    ``count`` passes over the calibration windows; a removed block is skipped (returns its input). The
    result's ``order`` is the removal order; ``scores`` hold each removed block's BI when it went and the
    others' BI in the last pass. ``first``: the whole model's ``bi`` scores on the same windows, when the
    caller already has them (the first pass is then skipped).
    """
    layers = model.model.layers
    removed: list[int] = []
    values = [0.0] * len(layers)
    tokens = 0
    handles = []
    try:
        for step in range(count):
            if step == 0 and first is not None:
                scores = first
            else:
                scores = score_blocks(model, windows, "bi", 1, batch_size, device, progress=False)
            tokens += scores.tokens
            pick = min((i for i in range(len(layers)) if i not in removed), key=lambda i: scores.scores[i])
            values = [values[i] if i in removed else scores.scores[i] for i in range(len(layers))]
            removed.append(pick)
            handles.append(_skip(layers[pick]))
            if progress and rank_and_world()[0] == 0:
                log.info("bi-iterative: removed block %d (BI %.4f), %d of %d", pick, scores.scores[pick], step + 1, count)
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        return score_blocks(model, windows, "bi", 1, batch_size, device, progress)
    return BlockScores("bi-iterative", 1, values, tokens, order=removed)


@torch.no_grad()
def score_blocks_ppl(model: nn.Module, windows: torch.LongTensor, batch_size: int = 8,
                     device: str | torch.device = "cpu", progress: bool = True) -> BlockScores:  # fmt: skip
    """``ppl``: per block, the mean next-token loss on the calibration windows with that block skipped.

    One forward pass of the whole model (LM head included) per block; under torchrun the windows are
    split over the ranks and the sums all-reduced.
    """
    layers = model.model.layers
    windows = _check_args("bi", 1, len(layers), windows, batch_size)
    bar = _progress(range(len(layers)), len(layers), "scoring blocks (ppl)", progress)
    values = [calibration_loss(model, windows, [i], batch_size, device) for i in bar]
    log.info("ppl scores of %d blocks over %d tokens", len(layers), windows.numel())
    return BlockScores("ppl", 1, values, int(windows.numel()))


@torch.no_grad()
def calibration_loss(model: nn.Module, windows: torch.LongTensor, skipped: list[int], batch_size: int = 8,
                     device: str | torch.device = "cpu") -> float:  # fmt: skip
    """Mean next-token loss of ``model`` on ``windows`` with the blocks ``skipped`` returning their input.

    Under torchrun each rank runs ``windows[rank::world]`` and the sums are all-reduced.
    """
    layers = model.model.layers
    rank, world = rank_and_world()
    local = windows[rank::world]
    device = torch.device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    handles = [_skip(layers[i]) for i in skipped]
    total = torch.zeros(2, dtype=torch.float64)
    try:
        for s in range(0, local.shape[0], batch_size):
            batch = local[s : s + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += torch.tensor([nll.item(), batch[:, 1:].numel()], dtype=torch.float64)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total = sum_over_ranks(total)
    return (total[0] / total[1]).item()


def score_blocks_best(model: nn.Module, windows: torch.LongTensor, count: int, batch_size: int = 8,
                      device: str | torch.device = "cpu", progress: bool = True) -> BlockScores:  # fmt: skip
    """``best``: score with ``bi``, ``bi-iterative`` and ``ppl``; keep the criterion whose ``count`` blocks, skipped
    together, leave the lowest calibration loss (ties: that order). One-shot ``ppl`` ranks each block alone and
    can pick a set that is poor together (measured at 40% on SmolLM2-135M); this checks every set as a whole.

    Costs one ``ppl`` scoring (a pass per block), ``count`` BI passes (the first is ``bi``'s) and three loss passes.
    """
    bi = score_blocks(model, windows, "bi", 1, batch_size, device, progress=False)
    candidates = {
        "bi": bi,
        "bi-iterative": score_blocks_iterative(model, windows, count, batch_size, device, progress=False, first=bi),
        "ppl": score_blocks_ppl(model, windows, batch_size, device, progress),
    }
    losses = {name: calibration_loss(model, windows, s.least_important(count), batch_size, device)
              for name, s in candidates.items()}  # fmt: skip
    best = min(losses, key=losses.get)
    log.info("best: %s (calibration loss with the chosen blocks skipped: %s)", best,
             ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))  # fmt: skip
    chosen = candidates[best]
    chosen.candidates = {k: round(v, 6) for k, v in losses.items()}
    return chosen


# --------------------------------------------------------------------------- offloaded
def _load_skeleton(folder: Path):
    """The model on the meta device (rotary buffers real), its plan, and the file of every stored tensor."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunext.core.checkpoint import read_safetensors_keys
    from prunext.core.families import check_family
    from prunext.core.model import PrunextConfig, PrunextForCausalLM, register
    from prunext.core.plan import Plan
    from prunext.errors import ModelError

    register()
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder)
    files = read_safetensors_keys(folder)
    # Buffers (the rotary inv_freq) are small and computed at construction: keep them real.
    with init_empty_weights(include_buffers=False):
        if isinstance(config, PrunextConfig):
            model, plan = PrunextForCausalLM(config), config.plan
        else:
            check_family(config.model_type)
            model, plan = AutoModelForCausalLM.from_config(config), Plan.identity(config.num_hidden_layers)
    return model.eval(), plan, files


def _block_state(files: dict[str, str], plan, position: int) -> dict[str, str]:
    """``{name inside the block: stored key}`` for one position.

    Base tensors live under the block's home position, adapters and output
    norms under the position itself (see :mod:`prunext.core.mapping`); for a
    plain HF folder or an identity plan both are ``model.layers.{position}.``.
    """
    from prunext.core.model import is_owned

    home, own = f"model.layers.{plan.home_of(position)}.", f"model.layers.{position}."
    names = {}
    for key in files:
        if key.startswith(home) and not is_owned(key[len(home) :]):
            names[key[len(home) :]] = key
        elif key.startswith(own) and is_owned(key[len(own) :]):
            names[key[len(own) :]] = key
    return names


def _materialize(module: nn.Module, names: dict[str, str], folder: Path, files: dict[str, str], device, dtype) -> None:
    """Load exactly the tensors ``names`` maps into ``module`` (strict), on ``device`` in ``dtype``."""
    from prunext.core.checkpoint import iter_safetensors
    from prunext.errors import ModelError

    key_to_name = {key: name for name, key in names.items()}
    state = {
        key_to_name[key]: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for key, t in iter_safetensors(folder, {key: files[key] for key in key_to_name})
    }
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        last = str(e).strip().splitlines()[-1].strip()
        raise ModelError(
            f"the weights in {folder} do not fit its config.json ({last}); the folder is inconsistent"
        ) from e


@torch.no_grad()
def score_blocks_offloaded(
    model_path: str,
    windows: torch.LongTensor,
    metric: str,
    window: int = 1,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> BlockScores:
    """:func:`score_blocks` for models larger than memory: the calibration goes through one block at a time.

    The model is built on the meta device from the folder's config. Embeddings
    turn all windows into ``x_0``; then each block's tensors (and only those)
    are read from the safetensors, moved to ``device``, run over all windows in
    batches, and dropped again before the next block. The same masks, rotary
    embeddings and layer calls as the family's ``Model.forward`` are used, so the
    scores equal :func:`score_blocks` on the loaded model.

    Memory: weights of one block (or the embedding) on ``device``, plus the
    activations of all (local) windows on the CPU: ``window + 1`` tensors of
    shape (n_windows, seq_len, hidden) in ``dtype``, i.e.
    ``(window + 1) * n_windows * seq_len * hidden * dtype_bytes`` (2 * 256 * 2048
    * 4096 * 4 bytes = 16 GiB for bi on a 7B model with 512k fp32 tokens).

    Args:
        model_path: a plain HF folder (single or sharded safetensors) or a
            native prunext folder; a native model's positions are scored.
        windows, metric, window, batch_size, progress: as in :func:`score_blocks`.
        device: where each block runs.
        dtype: floating tensors are loaded, and activations kept, in this dtype.

    Raises:
        ValueError: bad metric, window, batch size or windows.
        ModelError: the folder is missing, unsupported, incomplete or inconsistent.
    """
    folder = Path(model_path)
    model, plan, files = _load_skeleton(folder)
    inner = model.model
    num_blocks = len(inner.layers)
    windows = _check_args(metric, window, num_blocks, windows, batch_size)
    rank, world = rank_and_world()
    local = windows[rank::world]
    device = torch.device(device)
    starts = range(0, local.shape[0], batch_size)

    _materialize(inner.embed_tokens, {"weight": "model.embed_tokens.weight"}, folder, files, device, dtype)
    x0 = torch.empty(*local.shape, inner.config.hidden_size, dtype=dtype)  # (n_windows, seq, hidden), on CPU
    for s in starts:
        x0[s : s + batch_size] = inner.embed_tokens(local[s : s + batch_size].to(device)).cpu()
    inner.embed_tokens.to("meta")

    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    from prunext.core.model import CACHE_ARG

    from prunext.core.families import family_of

    family = family_of(inner.config.model_type)
    mask_fns = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    mask_kinds = family.attention_kinds(inner.config)
    inner.rotary_emb.to(device)
    position_ids = torch.arange(local.shape[1], device=device).unsqueeze(0)  # (1, seq)

    sums = _RunningSums(metric, window, num_blocks)
    sums.tokens = local.numel()
    # All windows' states x_{i+1-n} .. x_i (CPU) when block i runs; x_{i+1-n} opens the window block i closes.
    states: deque[torch.Tensor] = deque([x0], maxlen=window)
    for i in _progress(range(num_blocks), num_blocks, f"scoring blocks offloaded ({metric})", progress):
        block = inner.layers[i]
        _materialize(block, _block_state(files, plan, i), folder, files, device, dtype)
        x_in, x_start = states[-1], states[0] if len(states) == window else None
        x_out = torch.empty_like(x_in)
        for s in starts:
            hidden = x_in[s : s + batch_size].to(device)  # (batch, seq, hidden)
            mask = mask_fns[mask_kinds[i]](
                config=inner.config,
                inputs_embeds=hidden,
                attention_mask=None,
                **{CACHE_ARG: None},
                position_ids=position_ids,
            )
            out = _block_output(
                block(
                    hidden,
                    attention_mask=mask,
                    position_embeddings=family.position_embeddings(inner, hidden, position_ids, mask_kinds[i]),
                    position_ids=position_ids,
                    **{CACHE_ARG: None},
                    use_cache=False,
                )
            )
            if x_start is not None:
                sums.add(i + 1 - window, x_start[s : s + batch_size].to(device), out)
            x_out[s : s + batch_size] = out.cpu()
        block.to("meta")
        states.append(x_out)
    scores = sums.scores()
    log.info("%s scores of %d blocks (window %d, offloaded) over %d tokens", metric, num_blocks, window, scores.tokens)
    return scores
