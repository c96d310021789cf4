"""Perplexity after healing against healing tokens, from a ``bench/quality.py`` results folder.

Usage (after the runs BENCHMARKS.md "Healing recipe, second round" lists)::

    .venv/bin/python bench/heal_plot.py --results bench_out/heal2 --out docs/img/heal_ppl_vs_tokens.png

One panel per ratio; one line per recipe in :data:`CURVES` (a recipe's runs are read from each run's
``stage.json``, so labels that share a pruned model are read where ``quality.py`` wrote them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: curve name -> {ratio: (run folder, heal folder suffixes)}; heal folders are ``heal-<tokens><suffix>``, the
#: first suffix found per budget is read (the same recipe ran under several labels).
CURVES = {
    "ShortGPT + LoRA, as its authors (bi, lm)": {0.3: ("shortgpt-lora", ("", "-lm", "-base250")),
                                                 0.4: ("shortgpt-lora", ("-lm",))},
    "prunext round 1 default (bi, lm+kd)": {0.3: ("flexigpt-hybrid", ("-kd",)), 0.4: ("flexigpt-hybrid", ("-kd",))},
    "prunext default (best, lm+kd)": {0.3: ("flexigpt", ("",)), 0.4: ("flexigpt-hybrid", ("-kd",))},
}
BUDGETS = (15000, 60000, 250000)
#: the issue's goal, as a fraction of the baseline's perplexity
GOAL = 0.9


def points(results: Path, ratio: float, run: str, suffixes: tuple[str, ...]) -> list[tuple[int, float]]:
    out = []
    for tokens in BUDGETS:
        for suffix in suffixes:
            stage = results / "runs" / f"r{ratio:g}" / run / f"heal-{tokens}{suffix}" / "stage.json"
            if stage.exists():
                out.append((tokens, json.loads(stage.read_text())["result"]["perplexity"]["ppl"]))
                break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", required=True, help="the --out folder of bench/quality.py")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    results = Path(args.results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, ratio in zip(axes, (0.3, 0.4)):
        for i, (label, where) in enumerate(CURVES.items()):
            pts = points(results, ratio, *where[ratio])
            if pts:  # round 1's curve dashed and drawn under the default's, so one lying on the other stays visible
                ax.plot(*zip(*pts), marker="o", label=label, linestyle="--" if i == 1 else "-", zorder=3 - i)
            if pts and i == 0:
                ax.plot([t for t, _ in pts], [GOAL * ppl for _, ppl in pts], color="grey", linestyle=":",
                        label=f"goal: {GOAL:g}x the baseline")  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="healing tokens", ylabel="perplexity (builtin:wiki:test)",
               title=f"SmolLM2-135M pruned {ratio:.0%}", xticks=BUDGETS)  # fmt: skip
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}K"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_major_locator(matplotlib.ticker.MultipleLocator(10))  # perplexity in tens, log-spaced
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
