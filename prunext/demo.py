"""``prunext demo``: the main job on the built-in model and data, from nothing to a report.

Flow::

    builtin:smollm2-135m ──prune 30% flexigpt──► pruned/ ──ZeRO-3 heal (torchrun, 2 ranks)──► heal/final/
                         └─prune 30% shortgpt──► shortgpt/
    evaluate dense, shortgpt, pruned, healed: perplexity on builtin:wiki:test + a zero-shot subset
    check the native -> plain HF round trip of the dense model
    write OUT/report.md, OUT/results.json and plots (block importance, loss curve, perplexity bars)
"""

from __future__ import annotations

HELP = "run the end-to-end demo: prune the built-in model 30%, heal it with ZeRO-3, evaluate, report"
EPILOG = """\
examples:
  prunext demo                     # what `make demo` runs (about 15 minutes on 2 CPU cores)
  prunext demo --fast              # a shorter run: fewer calibration, training and evaluation tokens
  prunext demo --out /tmp/demo --nproc 1

Writes OUT/report.md (tables and plots), OUT/results.json, and the models it
made (OUT/flexigpt, OUT/shortgpt, OUT/heal/final). The first run converts the
built-in model from GGUF into $PRUNEXT_CACHE (default ~/.cache/prunext).
"""

MODEL = "builtin:smollm2-135m"
EVAL_DATA = "builtin:wiki:test"
TRAIN_DATA = "builtin:wiki:train"
RATIO = 0.3


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo_out", help="report folder (default demo_out; replaced if it exists)")
    parser.add_argument("--fast", action="store_true", help="a shorter run (a few minutes)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (torchrun, gloo on CPU; default 2)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def settings(fast: bool) -> dict:
    """Budgets of the two demo sizes; everything else is shared."""
    if fast:
        return {"calib_tokens": 4096, "calib_seq": 256, "train_tokens": 8192, "train_seq": 256, "eval_windows": 4, "eval_seq": 512, "tasks": ["piqa", "arc_easy"], "limit": 10}
    return {"calib_tokens": 16384, "calib_seq": 512, "train_tokens": 49152, "train_seq": 256, "eval_windows": 16, "eval_seq": 512, "tasks": ["piqa", "arc_easy", "hellaswag"], "limit": 25}


def run(args) -> int:
    import json
    import logging
    import os
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from prunext.cli import main as cli_main
    from prunext.convert.hf import write_dense_hf
    from prunext.core.loading import load_model
    from prunext.data import check_vocab, load_text_dataset, token_stream, windows
    from prunext.errors import UserError
    from prunext.eval.perplexity import perplexity
    from prunext.eval.zeroshot import evaluate_tasks

    log = logging.getLogger(__name__)
    if args.nproc < 1:
        raise UserError("--nproc must be at least 1")
    cfg = settings(args.fast)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # the demo's own folder; it says so in --help
    out.mkdir(parents=True)
    started = time.time()
    timings: dict[str, float] = {}

    def step(name: str, message: str) -> None:
        timings[name] = time.time()
        log.info("%s", message)

    step("setup", f"resolving {MODEL}, {EVAL_DATA} and {TRAIN_DATA}")
    dense, tokenizer = load_model(MODEL, device=device)
    tokens = token_stream(load_text_dataset(EVAL_DATA)["text"], tokenizer, max_tokens=cfg["eval_windows"] * cfg["eval_seq"])
    check_vocab(tokens, dense.config.vocab_size)
    eval_windows = windows(tokens, cfg["eval_seq"])

    def evaluate(name: str, model) -> dict:
        log.info("evaluating %s", name)
        ppl = perplexity(model, eval_windows, dataset=EVAL_DATA)
        tasks = evaluate_tasks(model, tokenizer, cfg["tasks"], limit=cfg["limit"], batch_size=8)
        return {"model": name, "perplexity": ppl.to_dict(), "tasks": tasks}

    step("dense", "evaluating the dense model and checking the plain-HF round trip")
    rows = [evaluate("dense", dense)]
    write_dense_hf(dense, out / "dense-hf", tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(out / "dense-hf", dtype=torch.float32).to(device)
    round_trip = perplexity(plain, eval_windows, dataset=EVAL_DATA, progress=False).ppl
    del plain, dense
    shutil.rmtree(out / "dense-hf")

    for method in ("flexigpt", "shortgpt"):
        step(f"prune_{method}", f"pruning {RATIO:.0%} with {method}")
        code = cli_main(
            ["prune", "--model", MODEL, "--ratio", str(RATIO), "--method", method, "--calib", TRAIN_DATA,
             "--calib-tokens", str(cfg["calib_tokens"]), "--seq-len", str(cfg["calib_seq"]), "--out", str(out / method)]
        )
        if code:
            raise SystemExit(code)
        pruned, _ = load_model(str(out / method), device=device)
        rows.append(evaluate(f"{method} 30%, before healing", pruned))
        del pruned

    step("heal", f"healing the flexigpt model with ZeRO-3 on {args.nproc} process(es), {cfg['train_tokens']} tokens")
    train_cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
        "-m", "prunext", "train", "--model", str(out / "flexigpt"), "--data", TRAIN_DATA,
        "--tokens", str(cfg["train_tokens"]), "--seq-len", str(cfg["train_seq"]), "--micro-batch", "2",
        "--save-every", "1000000", "--log-every", "2", "--out", str(out / "heal"),
    ]
    log.info("%s", " ".join(train_cmd))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    subprocess.run(train_cmd, check=True, env=env)
    shutil.rmtree(out / "heal" / "checkpoints", ignore_errors=True)  # final/ is what the demo keeps
    healed, _ = load_model(str(out / "heal" / "final"), device=device)
    rows.append(evaluate("flexigpt 30%, healed", healed))
    del healed

    step("report", "writing the report and plots")
    timings = {name: round(t_next - t, 1) for (name, t), t_next in zip(timings.items(), [*list(timings.values())[1:], time.time()])}
    results = {
        "model": MODEL,
        "ratio": RATIO,
        "settings": cfg,
        "device": device,
        "rows": rows,
        "dense_plain_hf_round_trip_ppl": round_trip,
        "round_trip_exact": round_trip == rows[0]["perplexity"]["ppl"],
        "timings_s": timings,
        "seconds": round(time.time() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = _plots(out, rows)
    report = _report(results, plots)
    (out / "report.md").write_text(report)
    print(report)
    return 0


def _plots(out, rows) -> list[str]:
    """Block importance, the healing loss curve and perplexity bars, as PNGs in ``out``."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    report = json.loads((out / "flexigpt" / "prune_report.json").read_text())
    scores = report["scores"]["scores"]
    pruned = set(report["decision"].get("pruned", []))
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(range(len(scores)), scores, color=["tab:red" if i in pruned else "tab:blue" for i in range(len(scores))])
    ylabel = {"bi": "Block Influence (log)", "bi-iterative": "BI when removed (log)",
              "ppl": "loss without the block (log)"}.get(report["scores"]["metric"], report["scores"]["metric"])  # fmt: skip
    ax.set(xlabel="block", ylabel=ylabel, yscale="log", title="Block importance (red: pruned and replaced)")
    fig.tight_layout()
    fig.savefig(out / "importance.png", dpi=110)
    plt.close(fig)
    made.append("importance.png")

    metrics = [json.loads(line) for line in (out / "heal" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if "loss" in m]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([m["tokens"] for m in steps], [m["loss"] for m in steps], marker=".")
    ax.set(xlabel="tokens", ylabel="training loss", title="Healing with ZeRO-3")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    made.append("loss.png")

    fig, ax = plt.subplots(figsize=(6, 3))
    names = [r["model"] for r in rows]
    values = [r["perplexity"]["ppl"] for r in rows]
    bars = ax.barh(names, values, color="tab:green")
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=3)
    ax.set_xlim(0, max(values) * 1.2)
    ax.set(xlabel="perplexity (lower is better)", title=f"Perplexity on {EVAL_DATA}")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=110)
    plt.close(fig)
    made.append("perplexity.png")
    return made


def _report(results: dict, plots: list[str]) -> str:
    cfg = results["settings"]
    tasks = cfg["tasks"]
    head = "| model | perplexity | " + " | ".join(f"{t} acc_norm" for t in tasks) + " |"
    lines = [
        "# prunext demo",
        "",
        f"Model `{results['model']}`, pruned {results['ratio']:.0%} (net block parameters, adapters counted).",
        f"Perplexity on `{EVAL_DATA}`: {cfg['eval_windows']} windows of {cfg['eval_seq']} tokens, fp32. "
        f"Zero-shot: first {cfg['limit']} items of each task (lm-eval prompts).",
        f"Healing: {cfg['train_tokens']} tokens of `{TRAIN_DATA}`, ZeRO-3, adapters and output norms trained.",
        "",
        head,
        "|---|---:|" + "---:|" * len(tasks),
    ]
    for row in results["rows"]:
        accs = [row["tasks"]["tasks"][t].get("acc_norm") or row["tasks"]["tasks"][t]["acc"] for t in tasks]
        lines.append(f"| {row['model']} | {row['perplexity']['ppl']:.2f} | " + " | ".join(f"{a:.2f}" for a in accs) + " |")
    verdict = "identical" if results["round_trip_exact"] else "DIFFERENT (a bug: please report it)"
    lines += ["", f"Dense model through a plain Hugging Face folder and back: perplexity {verdict}.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "Time per stage (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()) + f"; total {results['seconds']} s.", ""]
    return "\n".join(lines)
