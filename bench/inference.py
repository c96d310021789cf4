"""Inference side by side: size, memory, prefill and decode speed, self-speculative decoding, per depth method.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/inference.py --out bench_out/inference          # ratios 0.3,0.4
    OMP_NUM_THREADS=2 .venv/bin/python bench/inference.py --ratios 0.3 --heal-tokens 8K \\
        --models dense,flexigpt --out bench_out/inference_small                            # a short run

Flow (every model is made by the real commands)::

    builtin:smollm2-135m ──prunext prune --method M --ratio r──► OUT/models/r0.3/M/pruned/
        ──torchrun -m prunext train --tokens B (2 ranks, ZeRO-3)──► OUT/models/r0.3/M/heal/final/
    builtin:smollm2-135m ──prunext extend --to-layers N──► heal ──► OUT/models/extend/...
    then, R times, every model in turn (interleaved, so drift hits every row alike):
        prefill 1 x --prefill-len tokens; greedy decode of --decode-tokens at batch 1 (plain, and
        self-speculative for every --draft-tokens K where the model has replacement positions)
        and at batch --batch (transformers' generate)
    once per model, in a fresh process of its own: peak resident memory of loading it, the 1 x --prefill-len
        prefill and a --batch decode, above the same process's memory before loading
    OUT/results.json, OUT/inference.md

Rows: dense, shortgpt, shortgpt-lora, flexigpt (prunext's default, --kept-lora 0.5), flexigpt-paper
(--kept-lora 0), extended (flexigpt extend to --extend-to positions). Healed models, not models at
init: at init the replacements are nearly silent and the draft agrees almost always. Re-invoking with
the same --out reuses every model already made.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = "builtin:smollm2-135m"
TRAIN_DATA = "builtin:wiki:train"
EVAL_DATA = "builtin:wiki:test"

#: bench name -> (prune --method, extra flags, healed)
METHODS = {
    "shortgpt": ("shortgpt", [], False),
    "shortgpt-lora": ("shortgpt-lora", [], True),
    "flexigpt": ("flexigpt", [], True),
    "flexigpt-paper": ("flexigpt", ["--kept-lora", "0"], True),
}
ALL = ["dense", *METHODS, "extended"]


def parse_tokens(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def cli(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "prunext", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def heal(model_dir: Path, out: Path, args) -> Path:
    """``prunext train`` under torchrun (ZeRO-3, gloo on CPU), the same way ``prunext demo`` heals."""
    final = out / "final"
    if (final / "config.json").is_file():
        return final
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
           "-m", "prunext", "train", "--model", str(model_dir), "--data", TRAIN_DATA,
           "--tokens", str(args.heal_tokens), "--seq-len", str(args.seq_len), "--micro-batch", "1",
           "--save-every", "1000000", "--log-every", "4", "--out", str(out), "--overwrite"]  # fmt: skip
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    return final


def make_models(args) -> dict[str, Path | str]:
    """Every model of the run, by row label -> spec; made once, reused on re-runs."""
    models: dict[str, Path | str] = {}
    root = Path(args.out) / "models"
    wanted = args.models.split(",")
    if "dense" in wanted:
        models["dense"] = MODEL
    for ratio in args.ratios:
        for name in [m for m in METHODS if m in wanted]:
            method, extra, healed = METHODS[name]
            folder = root / f"r{ratio}" / name
            pruned = folder / "pruned"
            if not (pruned / "config.json").is_file():
                cli("prune", "--model", MODEL, "--ratio", str(ratio), "--method", method, *extra, "--calib", TRAIN_DATA,
                    "--calib-tokens", str(args.calib_tokens), "--seq-len", str(args.seq_len), "--out", str(pruned), "--overwrite")
            spec = heal(pruned, folder / "heal", args) if healed and args.heal_tokens else pruned
            models[f"{name} {ratio:.0%}"] = spec
    if "extended" in wanted:
        folder = root / f"extend{args.extend_to}"
        ext = folder / "extended"
        if not (ext / "config.json").is_file():
            cli("extend", "--model", MODEL, "--to-layers", str(args.extend_to), "--out", str(ext), "--overwrite")
        models[f"extended {args.extend_to}"] = heal(ext, folder / "heal", args) if args.heal_tokens else ext
    return models


def disk_bytes(spec) -> int | None:
    from prunext.core.loading import resolve_model_path

    folder = resolve_model_path(str(spec))
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) if isinstance(folder, Path) else None


def kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def measure(model, prompt_ids, prefill_ids, args, draft_ks) -> dict:
    """One pass of every measurement on one loaded model."""
    import torch
    from transformers import DynamicCache

    from prunext.core.model import CACHE_ARG
    from prunext.generate import SelfDraft, decode, replacement_positions, speculative_decode

    row: dict = {}
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        model(input_ids=prefill_ids, use_cache=True, logits_to_keep=1, **{CACHE_ARG: cache})
        row["prefill_s"] = time.perf_counter() - start
        row["kv_cache_bytes_prefill"] = kv_bytes(cache)
        del cache
        plain = decode(model, prompt_ids, args.decode_tokens)
        row["decode_s"] = plain.decode_s
        row["decode_tps"] = plain.decode_tokens_per_s
        batch = prompt_ids.repeat(args.batch, 1)
        start = time.perf_counter()
        model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=args.decode_tokens,
                       min_new_tokens=args.decode_tokens, do_sample=False, pad_token_id=0)
        # one generate() call includes its prefill; report decode tokens/s of the whole batch
        row["decode_tps_batch"] = args.batch * args.decode_tokens / (time.perf_counter() - start)
        skip = replacement_positions(model.plan)
        if skip:
            draft = SelfDraft(model, skip)
            row["draft_skip"] = skip
            for k in draft_ks:
                spec = speculative_decode(model, prompt_ids, args.decode_tokens, draft, draft_tokens=k)
                row[f"spec{k}_tps"] = spec.decode_tokens_per_s
                row[f"spec{k}_acceptance"] = spec.acceptance_rate
                row[f"spec{k}_identical"] = spec.tokens == plain.tokens
    return row


def rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_child(spec: str, args) -> None:
    """Run in a fresh process: load ``spec``, prefill, decode a batch; print the peak RSS above the imports'."""
    import resource

    import torch

    from prunext.core.loading import load_model

    base = rss_bytes()
    model, _ = load_model(spec, device=args.device)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.prefill_len))
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        batch = ids[:, :32].repeat(args.batch, 1)
        model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=8, min_new_tokens=8,
                       do_sample=False, pad_token_id=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"base_rss_bytes": base, "peak_rss_bytes": peak, "peak_above_base_bytes": peak - base}))


def peak_memory(spec, args) -> dict:
    """:func:`peak_child` in a subprocess, so each model's peak is its own and not the bench's."""
    cmd = [sys.executable, __file__, "--peak-of", str(spec), "--prefill-len", str(args.prefill_len),
           "--batch", str(args.batch), "--device", args.device]
    proc = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{cpu}, {os.cpu_count()} cores, {device}, torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/inference")
    p.add_argument("--models", default=",".join(ALL), help=f"comma-separated rows (default all: {','.join(ALL)})")
    p.add_argument("--ratios", default="0.3,0.4", type=lambda s: [float(r) for r in s.split(",")])
    p.add_argument("--heal-tokens", default="16K", type=parse_tokens, help="healing budget per model (0 = not healed)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration and training window")
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--extend-to", type=int, default=36, help="positions of the extended model")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="batch of the batched decode row")
    p.add_argument("--draft-tokens", default="1,2,3,4,6", type=lambda s: [int(k) for k in s.split(",")])
    p.add_argument("--repeats", type=int, default=2, help="interleaved passes over all models (medians reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--peak-of", help=argparse.SUPPRESS)  # the peak-memory child (see peak_child)
    args = p.parse_args(argv)
    args.heal_tokens = int(args.heal_tokens)
    if args.peak_of:
        peak_child(args.peak_of, args)
        return 0

    import torch

    from prunext.core.loading import load_model
    from prunext.data import load_text_dataset, token_stream

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    specs = make_models(args)
    made_s = time.time() - started

    loaded = {}
    tokenizer = None
    for label, spec in specs.items():
        model, tokenizer = load_model(str(spec), device=args.device)
        loaded[label] = model.eval()
    text = load_text_dataset(EVAL_DATA)["text"]
    ids = token_stream(text, tokenizer, max_tokens=args.prefill_len + 64)
    ids = torch.as_tensor(ids, dtype=torch.long)
    prefill_ids = ids[: args.prefill_len].unsqueeze(0).to(args.device)
    prompt_ids = ids[:32].unsqueeze(0).to(args.device)  # a 32-token prompt from held-out text

    peaks = {}
    for label, spec in specs.items():
        print(f"peak memory: {label}", flush=True)
        peaks[label] = peak_memory(spec, args)

    passes: dict[str, list[dict]] = {label: [] for label in loaded}
    for r in range(args.repeats):
        for label, model in loaded.items():
            print(f"pass {r + 1}/{args.repeats}: {label}", flush=True)
            passes[label].append(measure(model, prompt_ids, prefill_ids, args, args.draft_tokens))

    rows = []
    for label, model in loaded.items():
        ms = passes[label]
        med = lambda key: statistics.median(m[key] for m in ms)  # noqa: E731
        row = {
            "model": label,
            "positions": len(model.plan),
            "stored_params": sum(p.numel() for p in model.parameters()),
            "disk_bytes": disk_bytes(specs[label]),
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "kv_cache_bytes_prefill": ms[0]["kv_cache_bytes_prefill"],
            "peak_rss_above_base_bytes": peaks[label]["peak_above_base_bytes"],
            "prefill_tps": args.prefill_len / med("prefill_s"),
            "decode_tps": med("decode_tps"),
            "decode_tps_batch": med("decode_tps_batch"),
        }
        if "draft_skip" in ms[0]:
            row["draft_skip"] = ms[0]["draft_skip"]
            for k in args.draft_tokens:
                row[f"spec{k}_tps"] = med(f"spec{k}_tps")
                row[f"spec{k}_acceptance"] = med(f"spec{k}_acceptance")
                row[f"spec{k}_identical"] = all(m[f"spec{k}_identical"] for m in ms)
            best = max(args.draft_tokens, key=lambda k: row[f"spec{k}_tps"])
            row["best_k"] = best
        rows.append(row)
    dense_tps = next((r["decode_tps"] for r in rows if r["model"] == "dense"), None)
    for row in rows:
        if "best_k" in row:
            k = row["best_k"]
            row["speedup_vs_plain"] = row[f"spec{k}_tps"] / row["decode_tps"]
            row["speedup_vs_dense"] = row[f"spec{k}_tps"] / dense_tps if dense_tps else None
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "settings": {k: v for k, v in vars(args).items()},
               "models": {k: str(v) for k, v in specs.items()}, "rows": rows, "passes": passes,
               "seconds_making_models": round(made_s, 1), "seconds": round(time.time() - started, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = report(results, args)
    (out / "inference.md").write_text(md)
    print(md)
    return 0


def report(results: dict, args) -> str:
    rows = results["rows"]
    lines = [f"Machine: {results['machine']}; {results['date']}.",
             f"Healing: {args.heal_tokens} tokens of {TRAIN_DATA} per healed model; greedy decoding of {args.decode_tokens} "
             f"tokens after a 32-token prompt; prefill 1 x {args.prefill_len}; medians of {args.repeats} interleaved passes; fp32.", "",
             "| model | positions | stored params | disk MB | weights + KV(512) MB | peak RSS MB | prefill tok/s | decode tok/s b1 | "
             f"decode tok/s b{args.batch} | self-spec tok/s (best K) | acceptance | vs plain | vs dense | identical |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        spec = ["-"] * 5
        if "best_k" in r:
            k = r["best_k"]
            spec = [f"{r[f'spec{k}_tps']:.1f} (K={k})", f"{r[f'spec{k}_acceptance']:.0%}", f"{r['speedup_vs_plain']:.2f}x",
                    f"{r['speedup_vs_dense']:.2f}x" if r.get("speedup_vs_dense") else "-",
                    "yes" if all(r[f"spec{j}_identical"] for j in args.draft_tokens) else "NO"]
        disk = f"{r['disk_bytes'] / 1e6:.0f}" if r["disk_bytes"] else "-"
        lines.append(f"| {r['model']} | {r['positions']} | {r['stored_params'] / 1e6:.1f}M | {disk} | "
                     f"{(r['weights_bytes'] + r['kv_cache_bytes_prefill']) / 1e6:.0f} | {r['peak_rss_above_base_bytes'] / 1e6:.0f} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | "
                     f"{r['decode_tps_batch']:.1f} | " + " | ".join(spec) + " |")
    ks = [r for r in rows if "best_k" in r]
    if ks:
        lines += ["", "Self-speculative decode tokens/s and acceptance by K (draft tokens per round):", "",
                  "| model | " + " | ".join(f"K={k}" for k in args.draft_tokens) + " |",
                  "|---|" + "---:|" * len(args.draft_tokens)]
        for r in ks:
            lines.append(f"| {r['model']} (plain {r['decode_tps']:.1f}) | " + " | ".join(
                f"{r[f'spec{k}_tps']:.1f} ({r[f'spec{k}_acceptance']:.0%})" for k in args.draft_tokens) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
