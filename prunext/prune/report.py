"""What ``prunext prune`` writes beside the model and prints: the report, tables and two plots.

::

    DIR/prune_report.json    settings, scores, decision, distances, parameter counts, timings
    DIR/importance.png       importance per block (or per window), pruned ones marked
    DIR/distances.png        flexigpt: d(i, j) for pruned i x kept j, chosen source marked
"""

from __future__ import annotations

import json
from pathlib import Path

from prunext.prune.methods import Pruning
from prunext.prune.ratio import Budget
from prunext.tables import format_table

REPORT_FILE = "prune_report.json"
IMPORTANCE_PLOT = "importance.png"
DISTANCE_PLOT = "distances.png"


def build_report(
    settings: dict,
    scores,
    budget: Budget,
    pruning: Pruning,
    params_after: int,
    timings: dict[str, float],
) -> dict:
    """The JSON report.

    Args:
        settings: resolved command settings.
        scores: the :class:`~prunext.prune.importance.BlockScores` used.
        budget: the parameter accounting.
        pruning: the decision.
        params_after: stored parameters counted on the built model (equals
            ``budget.total_params_after``; kept as a check a reader can see).
        timings: seconds per stage.
    """
    report = {
        "settings": settings,
        "scores": scores.to_dict(),
        "decision": pruning.to_dict(),
        "plan_table": pruning.plan.describe().splitlines(),
        "params": {**budget.to_dict(), "total_params_after_counted": params_after},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    if pruning.distances is not None:
        report["distances"] = {
            "rows_pruned": pruning.pruned,
            "columns_kept": pruning.kept,
            "values": pruning.distances.tolist(),
        }
    return report


def write_report(folder: Path, report: dict) -> Path:
    path = Path(folder) / REPORT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def summary(budget: Budget, pruning: Pruning) -> str:
    """The table printed at the end: what was pruned, what replaces it, parameters before/after."""
    rows: list[tuple[str, object]] = [
        ("method", pruning.method),
        ("blocks pruned", f"{len(pruning.pruned)} of {pruning.num_blocks}: {pruning.pruned}"),
        ("positions", f"{pruning.num_blocks} -> {len(pruning.plan)}"),
    ]
    if pruning.sources:
        rows.append(("pruned -> source", ", ".join(f"{i}->{j}" for i, j in pruning.sources.items())))
    if pruning.window is not None:
        first, last = pruning.window
        rows.append(("window", f"blocks {first}..{last}"))
        if pruning.method == "streamline":
            rows.append(("new block", f"position {pruning.trainable_positions[0]}, initialised from block {first}"))
    ranks = [p.lora_rank for p in pruning.plan.positions if p.has_lora]
    if len(ranks) != budget.adapted_positions or len(set(ranks)) > 1:  # flexigpt hybrid (--kept-lora)
        on_kept = sum(p.lora_rank for i, p in enumerate(pruning.plan.positions) if p.has_lora and i not in pruning.sources)
        rows.append(("adapters", f"ranks {min(ranks)}-{max(ranks)} on 7 linears at {len(ranks)} positions "
                                 f"({on_kept} of {sum(ranks)} rank units on kept blocks)"))  # fmt: skip
    elif budget.adapter_rank:
        rows.append(("adapters", f"rank {budget.adapter_rank} on 7 linears at {budget.adapted_positions} positions"))
    rows += [
        ("block params", f"{budget.block_params_before:,} -> {budget.block_params_after:,}"),
        ("all params", f"{budget.total_params_before:,} -> {budget.total_params_after:,}"),
        ("overhead", f"{budget.overhead_params:,} (adapters {budget.adapter_params:,}, out-norms {budget.norm_params:,})"),
        (
            "net removed",
            f"{budget.net_removed:,} = {budget.block_fraction:.2%} of block params, {budget.total_fraction:.2%} of all params",
        ),
    ]
    return format_table(rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_importance(scores, pruning: Pruning, path: Path) -> Path:
    """Bar chart of the scores; pruned blocks (bi) or the removed window (angular/streamline) in red."""
    plt = _pyplot()
    values = scores.scores
    if scores.window == 1:
        marked = set(pruning.pruned)
        xlabel = "block"
    else:
        marked = {pruning.window[0]} if pruning.window is not None else set()
        xlabel = f"first block of a window of {scores.window}"
    colors = ["tab:red" if i in marked else "tab:blue" for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(values)), 3.5))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xlabel(xlabel)
    ylabel = {"bi": "block influence (1 - cos)", "bi-iterative": "BI when removed (1 - cos)",
              "ppl": "calibration loss without the block", "angular": "angular distance / pi", "streamline": "cosine in/out"}
    ax.set_ylabel(ylabel.get(scores.metric, scores.metric))
    ax.set_title(f"{pruning.method}: importance ({scores.metric}, {scores.tokens:,} tokens); red = pruned")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_distances(pruning: Pruning, path: Path) -> Path:
    """Heatmap of d(i, j), pruned i (rows) x kept j (columns), each row's chosen source boxed."""
    plt = _pyplot()
    d = pruning.distances.numpy()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(pruning.kept) + 2), max(3.0, 0.35 * len(pruning.pruned) + 1.5)))
    image = ax.imshow(d, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="d(i, j)")
    ax.set_xticks(range(len(pruning.kept)), [str(j) for j in pruning.kept], fontsize=7)
    ax.set_yticks(range(len(pruning.pruned)), [str(i) for i in pruning.pruned], fontsize=7)
    ax.set_xlabel("kept block j")
    ax.set_ylabel("pruned block i")
    for row, i in enumerate(pruning.pruned):
        col = pruning.kept.index(pruning.sources[i])
        ax.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_title("replacement distance; red box = chosen source")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
