"""How far healing opened each replacement position, against the block it replaced.

A replacement's output norms start small (``prune --out-norm-init``), so at first the position adds
little to the residual stream. This prints, for each replacement position of one or more pruned or
healed flexigpt folders, the RMS of what its attention and MLP branches add to the residual stream,
as a fraction of what the removed block's branches add in the source model at the same depth, on
the same evaluation windows (each model on its own inputs). 1.0 means the position adds as much as
the block it stands for; 0.0 that it adds nothing.

Usage::

    .venv/bin/python bench/out_norm_open.py --source builtin:smollm2-135m \\
        bench_out/lev0/runs/r0.3/flexigpt/pruned bench_out/lev0/runs/r0.3/flexigpt/heal-15000-keep/run/final
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from prunext.core.loading import load_model
from prunext.data.sources import load_text_dataset
from prunext.data.tokens import token_stream, windows
from prunext.prune.report import REPORT_FILE
from prunext.train.lineage import lineage


def branch_rms(model, positions: list[int], batch: torch.LongTensor) -> dict[tuple[int, str], float]:
    """RMS of what each branch of ``positions`` adds to the residual stream, over ``batch``."""
    layers = model.model.layers
    seen: dict[tuple[int, str], float] = {}
    hooks = []
    for i in positions:
        for branch in ("attn", "mlp"):
            own = getattr(layers[i], f"{branch}_out_norm", None)
            module = own if own is not None else (layers[i].self_attn if branch == "attn" else layers[i].mlp)

            def hook(_mod, _inp, out, key=(i, branch)):
                out = out[0] if isinstance(out, tuple) else out
                seen[key] = out.float().pow(2).mean().sqrt().item()

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=batch)
    for h in hooks:
        h.remove()
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="builtin:smollm2-135m", help="the unpruned model")
    p.add_argument("--data", default="builtin:wiki:test")
    p.add_argument("--tokens", type=int, default=1024, help="evaluation tokens (windows of --seq-len)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("folders", nargs="+", help="pruned or healed flexigpt folders of one pruning (its prune_report.json is found through their lineage)")
    args = p.parse_args()
    # the pruning's report: in a pruned folder, or in the one a healed folder's training started from
    candidates = [Path(c) for f in args.folders for c in [f] + [src for how, src in lineage(f) if how == "train"]]
    found = next((c / REPORT_FILE for c in candidates if (c / REPORT_FILE).is_file()), None)
    if found is None:
        raise SystemExit("no prune_report.json in the folders or the folders they were trained from; give the pruned folder too")
    report = json.loads(found.read_text())
    source, tokenizer = load_model(args.source)
    texts = (row["text"] for row in load_text_dataset(args.data))
    batch = windows(token_stream(texts, tokenizer, max_tokens=args.tokens, progress=False), args.seq_len)
    pruned = report["decision"]["pruned"]
    dense = branch_rms(source, pruned, batch)
    del source
    print(f"replacement positions {pruned}; RMS added to the residual stream, as a fraction of the removed block's")
    print("| folder | attn mean | mlp mean | attn min-max | mlp min-max |")
    print("|---|---:|---:|---:|---:|")
    for folder in args.folders:
        model, _ = load_model(folder)
        got = branch_rms(model, pruned, batch)
        del model
        row = [folder]
        fracs = {b: [got[(i, b)] / dense[(i, b)] for i in pruned] for b in ("attn", "mlp")}
        row += [f"{sum(fracs[b]) / len(fracs[b]):.3f}" for b in ("attn", "mlp")]
        row += [f"{min(fracs[b]):.3f}-{max(fracs[b]):.3f}" for b in ("attn", "mlp")]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
