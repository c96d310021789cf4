"""Quality of every depth method at equal data and token budget: perplexity before/after healing, zero-shot.

Usage (from the repository root)::

    .venv/bin/python bench/quality.py --preset smoke --methods shortgpt,flexigpt,shortgpt-lora --out quality_smoke
    .venv/bin/python bench/quality.py --preset cpu --out bench_out/quality_cpu        # about an hour on 2 CPU cores
    .venv/bin/python bench/quality.py --preset gpu --out bench_out/quality_gpu        # one H100, --device cuda
    .venv/bin/python bench/quality.py --preset cpu --budgets 15K,60K,250K --ratios 0.3 --out sweep/   # issue 9 sweep

Flow, per prune ratio and method (every step is the real command)::

    builtin:smollm2-135m ──prunext prune --method M --ratio r──► OUT/runs/r0.3/M/pruned/
        perplexity on builtin:wiki:test                      (the "before healing" column)
        for each budget B:
            prunext train --tokens B --trainable T ──► OUT/runs/r0.3/M/heal-B/final/
            perplexity + zero-shot average (piqa, hellaswag, winogrande, arc_easy, arc_challenge)
    OUT/results.json, OUT/quality.md (one table per budget and ratio), OUT/ppl_vs_tokens.png (>= 2 budgets)

Every method sees the same calibration text (builtin:wiki:train, first
--calib-tokens tokens), the same healing data (builtin:wiki:train, shuffled by
the same --seed), the same token budget and the same evaluation windows.

What heals (``prunext train --trainable``, from each method's
``decision.trainable_positions`` in prune_report.json):
  flexigpt                   ``replacement``: prunext's default recipe: prune's defaults (the hybrid,
                             --kept-lora 0.5) and train's (--loss auto: lm + distillation from the source)
  flexigpt-paper, ablations  ``replacement``: the paper's pure replacement (--kept-lora 0), trained with lm
  shortgpt-lora              ``replacement``: the LoRA adapters on the kept blocks (B = 0 at init)
  flexigpt-hybrid            the default's structure spelt out (prune --kept-lora 0.5: half the adapter
                             rank on LoRA on the kept blocks, same adapter params), healed with lm
                             unless --loss says otherwise; not in --methods all
  flexigpt-fit               the default with output norms fitted by least squares (prune --out-norm-init fit)
  streamline                 ``all`` at train's default lr for it (1e-4): ``prunext train`` has no
                             "this position only" mode, so the whole pruned model trains (LLM-Streamline
                             trains only the new block); its trainable-parameter column says so
  shortgpt, angular          nothing to train: not healed ("n/a"), as FlexiGPT's paper compares
                             against ShortGPT without healing and ShortGPT + LoRA with healing

Presets (each value can still be overridden by its flag):
  smoke  ratio 0.3, budget 2K tokens, seq-len 128, 1K calibration tokens, 2 evaluation windows,
         zero-shot limit 5, 1 training process: checks the pipeline in a few minutes on 2 CPU cores
  cpu    ratios 0.3,0.4, budget 4096 tokens (8 steps of 2 ranks x 1 x 256 tokens), seq-len 256, 2048
         calibration tokens, 16 evaluation windows (4096 tokens), zero-shot limit 10, 2 training
         processes (ZeRO-3 over gloo): dense + all 11 methods, estimated about an hour on 2 shared CPU
         cores from the smoke timings (flexigpt pruning ~2 min each is the largest fixed cost)
  gpu    ratios 0.3,0.4, budgets 1M,20M tokens, seq-len 1024, 32K calibration tokens, 64 evaluation
         windows (64K tokens), zero-shot limit 100, 1 process on --device cuda (ZeRO-3 config
         ds_configs/zero3.json), for one H100-class GPU

Re-invoking with the same --out reuses every finished stage whose settings match
(each stage writes a ``stage.json`` with its settings), so an interrupted sweep resumes
and adding a budget only runs the new healing runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from inference import machine  # the CPU's model name, cores, GPU, torch, threads (bench/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent
EVAL_DATA = "builtin:wiki:test"
TRAIN_DATA = "builtin:wiki:train"
TASKS = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge"]

#: bench name -> (prune --method, extra prune flags, train --trainable or None = not healed)
METHODS = {
    "shortgpt": ("shortgpt", [], None),
    "angular": ("angular", [], None),
    "streamline": ("streamline", [], "all"),
    "shortgpt-lora": ("shortgpt-lora", [], "replacement"),
    "flexigpt": ("flexigpt", [], "replacement"),
    "flexigpt-paper": ("flexigpt", ["--kept-lora", "0"], "replacement"),
    "flexigpt-nofilter": ("flexigpt", ["--kept-lora", "0", "--no-filter"], "replacement"),
    "flexigpt-nonorm": ("flexigpt", ["--kept-lora", "0", "--out-norm", "none"], "replacement"),
    "flexigpt-nosvd": ("flexigpt", ["--kept-lora", "0", "--no-svd-init"], "replacement"),
    "flexigpt-fit": ("flexigpt", ["--out-norm-init", "fit"], "replacement"),
    "flexigpt-hybrid": ("flexigpt", ["--kept-lora", "0.5"], "replacement"),  # the default, spelt out
    "flexigpt-kept75": ("flexigpt", ["--kept-lora", "0.75"], "replacement"),
}
LABELS = {
    "flexigpt": "flexigpt (prunext default)",
    "flexigpt-paper": "flexigpt --kept-lora 0 (paper)",
    "flexigpt-nofilter": "flexigpt --kept-lora 0 --no-filter",
    "flexigpt-nonorm": "flexigpt --kept-lora 0 --out-norm none",
    "flexigpt-nosvd": "flexigpt --kept-lora 0 --no-svd-init",
    "flexigpt-fit": "flexigpt --out-norm-init fit",
    "flexigpt-hybrid": "flexigpt --kept-lora 0.5",
    "flexigpt-kept75": "flexigpt --kept-lora 0.75",
}
#: Healed the way prunext heals by default (train --loss auto); every other method as its authors do (lm).
DEFAULT_RECIPE = ("flexigpt",)
#: Run by --methods all (flexigpt-hybrid is the default spelt out).
ALL = [m for m in METHODS if m not in ("flexigpt-hybrid", "flexigpt-kept75")]
ABLATIONS = ("flexigpt-nofilter", "flexigpt-nonorm", "flexigpt-nosvd")

PRESETS = {
    "smoke": {"ratios": "0.3", "budgets": "2K", "calib_tokens": 1024, "seq_len": 128, "eval_tokens": 256,
              "limit": 5, "nproc": 1, "micro_batch": 2, "device": "cpu"},
    "cpu": {"ratios": "0.3,0.4", "budgets": "4096", "calib_tokens": 2048, "seq_len": 256, "eval_tokens": 4096,
            "limit": 10, "nproc": 2, "micro_batch": 1, "device": "cpu"},
    "gpu": {"ratios": "0.3,0.4", "budgets": "1M,20M", "calib_tokens": 32768, "seq_len": 1024, "eval_tokens": 65536,
            "limit": 100, "nproc": 1, "micro_batch": 16, "device": "cuda"},
}  # fmt: skip

#: FlexiGPT (arXiv 2501.14713) at 30% on Llama-2-7B, MiniPile perplexity after healing (docs/method.md).
PAPER = {"flexigpt": 6.55, "shortgpt-lora": 6.71, "shortgpt": 22.76,
         "flexigpt-nofilter": 6.77, "flexigpt-nonorm": 6.68, "flexigpt-nosvd": 6.63}  # fmt: skip


def parse_tokens(text: str) -> int:
    """``"15K"`` -> 15000, ``"2M"`` -> 2000000, ``"4096"`` -> 4096."""
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise SystemExit(f"quality.py: error: not a token count: {text!r} (e.g. 15K, 2M, 4096)") from None
    if value < 1:
        raise SystemExit(f"quality.py: error: a token budget must be positive, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults for the budget flags (default cpu)")
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--methods", default="all", help=f"comma list of {', '.join(METHODS)} (default all); dense always runs")
    p.add_argument("--ratios", help="comma list of prune ratios, e.g. 0.3,0.4")
    p.add_argument("--budgets", help="comma list of healing token budgets, e.g. 15K,60K,250K (one table each)")
    p.add_argument("--calib-tokens", type=int, help="calibration tokens for prune")
    p.add_argument("--seq-len", type=int, help="window length for calibration, training and perplexity")
    p.add_argument("--eval-tokens", type=int, help="perplexity tokens of builtin:wiki:test (windows of --seq-len)")
    p.add_argument("--limit", type=int, help="zero-shot items per task")
    p.add_argument("--nproc", type=int, help="training processes (torchrun when > 1)")
    p.add_argument("--micro-batch", type=int, help="training blocks per rank per step")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--lr", type=float, help="peak lr of the adapter/norm healing runs (default: prunext train's, 4e-3)")
    p.add_argument("--norm-lr", type=float, help="peak lr of the output-norm scales in adapter/norm healing runs (default: --lr)")
    p.add_argument("--adapter-lr", type=float, help="peak lr of the LoRA adapters in adapter/norm healing runs (default: --lr)")
    p.add_argument("--norm-open", type=float, help="train --norm-open W for the methods with output norms (default: off)")
    p.add_argument("--norm-open-factor", type=float, help="train --norm-open-factor F with --norm-open (default: train's, 10)")
    p.add_argument("--out-norm-init", type=float, help="prune --out-norm-init for the flexigpt methods (default: prune's)")
    p.add_argument("--loss", choices=["lm", "kd", "lm+kd", "auto"], default=None,
                   help="healing loss of every method (prunext train --loss). Default: each as it is run - "
                   "prunext's default flexigpt with train's default (auto: lm+kd), the others with lm as their authors")
    p.add_argument("--lr-all", type=float, help="peak lr of --trainable all runs (streamline; default: prunext train's, 1e-4)")
    p.add_argument("--prune-args", default="", help="extra flags for every prune, e.g. \"--reconstruct-epochs 2\" "
                   "(needs --label: the pruned models then sit under the label's own folder)")
    p.add_argument("--pruned-as", default=None, help="with --prune-args: share the pruned models of this earlier --label "
                   "(same prune flags) instead of pruning again under --label")
    p.add_argument("--train-args", default="", help="extra flags for every healing run, e.g. \"--kd-temperature 2\" (default none)")
    p.add_argument("--label", default="", help="name of this healing recipe: its runs sit beside other labels' in one --out, "
                   "sharing the pruned models (default: none)")
    p.add_argument("--seed", type=int, default=0, help="prune and train seed (default 0)")
    p.add_argument("--keep-models", action="store_true", help="keep healed model weights (default: deleted after evaluation)")
    p.add_argument("--out", required=True, help="results folder; re-using it resumes")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from the preset and validate everything before any work."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = list(ALL) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS and m != "dense"]
    if unknown:
        raise SystemExit(f"quality.py: error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    args.method_list = [m for m in names if m != "dense"]
    try:
        args.ratio_list = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        raise SystemExit(f"quality.py: error: --ratios must be numbers, got {args.ratios!r}") from None
    if any(not 0 < r < 1 for r in args.ratio_list):
        raise SystemExit("quality.py: error: every ratio must be in (0, 1)")
    if not all(c.isalnum() or c in "._+-" for c in args.label):
        raise SystemExit(f"quality.py: error: --label {args.label!r} may hold letters, digits and . _ + - only")
    if args.prune_args and not args.label:
        raise SystemExit("quality.py: error: --prune-args changes the pruned models; give it a --label")
    args.prune_extra, args.train_extra = shlex.split(args.prune_args), shlex.split(args.train_args)
    args.budget_list = sorted({parse_tokens(b) for b in args.budgets.split(",")})
    for name in ("calib_tokens", "seq_len", "eval_tokens", "limit", "nproc", "micro_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"quality.py: error: --{name.replace('_', '-')} must be at least 1")
    if args.eval_tokens < args.seq_len:
        raise SystemExit("quality.py: error: --eval-tokens must hold at least one --seq-len window")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("quality.py: error: --device cuda but no GPU is visible; use --device cpu")
    return args


def commit() -> str:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def verb_defaults(verb: str) -> dict:
    """The defaults of ``prunext VERB``'s flags: part of every stage key, so a changed default redoes the stage."""
    import importlib

    from prunext.cli import VERBS

    parser = argparse.ArgumentParser()
    importlib.import_module(VERBS[verb]).add_arguments(parser)
    return {a.dest: a.default for a in parser._actions if a.dest != "help" and a.default is not argparse.SUPPRESS}


def stage(folder: Path, key: dict, fn, needs: Path | None = None) -> dict:
    """Run ``fn() -> dict`` unless ``folder/stage.json`` holds a result for the same ``key``.

    ``needs``: a path the cached stage must still have (e.g. a model folder), else it is redone.
    """
    record = folder / "stage.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("key") == key and (needs is None or needs.exists()):
            return saved["result"]
    started = time.perf_counter()
    result = fn()
    result["seconds"] = round(time.perf_counter() - started, 1)
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result


def main() -> int:
    args = resolve(build_parser().parse_args())
    # OpenMP spin-waiting costs several x on a shared CPU (prunext prune --help); set before torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import torch

    from prunext.cli import main as cli_main
    from prunext.core.loading import load_model
    from prunext.data import check_vocab, load_text_dataset, token_stream, windows
    from prunext.eval.perplexity import perplexity
    from prunext.eval.zeroshot import evaluate_tasks

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    batch = 32 if args.device == "cuda" else 8

    dense, tokenizer = load_model(args.model, device=args.device)
    tokens = token_stream(load_text_dataset(EVAL_DATA)["text"], tokenizer, max_tokens=args.eval_tokens)
    check_vocab(tokens, dense.config.vocab_size)
    eval_windows = windows(tokens, args.seq_len)
    eval_key = {"model": args.model, "eval_tokens": args.eval_tokens, "seq_len": args.seq_len, "limit": args.limit,
                "tasks": TASKS, "device": args.device}  # fmt: skip
    prune_defaults, train_defaults = verb_defaults("prune"), verb_defaults("train")

    def evaluate(model, zero_shot: bool) -> dict:
        ppl = perplexity(model, eval_windows, dataset=EVAL_DATA, batch_size=batch, progress=False).to_dict()
        result = {"perplexity": ppl}
        if zero_shot:
            result["zeroshot"] = evaluate_tasks(model, tokenizer, TASKS, limit=args.limit, batch_size=batch)
        return result

    def evaluate_folder(folder: Path, zero_shot: bool) -> dict:
        model, _ = load_model(str(folder), device=args.device)
        try:
            return evaluate(model, zero_shot)
        finally:
            del model
            gc.collect()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {text}", flush=True)

    say("dense: evaluating")
    results = {"dense": stage(out / "runs" / "dense", eval_key, lambda: evaluate(dense, True))}
    del dense
    gc.collect()

    for ratio in args.ratio_list:
        for name in args.method_list:
            method, flags, trainable = METHODS[name]
            run_dir = out / "runs" / f"r{ratio:g}" / name
            if method == "flexigpt" and args.out_norm_init is not None and not any(f.startswith("--out-norm") for f in flags):
                flags = [*flags, "--out-norm-init", str(args.out_norm_init)]
                run_dir = run_dir.with_name(f"{name}-init{args.out_norm_init:g}")  # its own pruned model
            if args.prune_extra:
                flags = [*flags, *args.prune_extra]
                run_dir = run_dir.with_name(f"{run_dir.name}-{args.pruned_as or args.label}")  # its own pruned model
            pruned = run_dir / "pruned"
            prune_cmd = ["prune", "--model", args.model, "--ratio", str(ratio), "--method", method, *flags,
                         "--calib", TRAIN_DATA, "--calib-tokens", str(args.calib_tokens), "--seq-len", str(args.seq_len),
                         "--device", args.device, "--seed", str(args.seed), "--out", str(pruned), "--overwrite"]  # fmt: skip

            def do_prune(cmd=prune_cmd, run_dir=run_dir, pruned=pruned) -> dict:
                run_dir.mkdir(parents=True, exist_ok=True)
                with open(run_dir / "prune.log", "w") as log, contextlib.redirect_stdout(log):
                    code = cli_main(cmd)
                if code:
                    raise SystemExit(f"quality.py: prunext {' '.join(cmd)} failed ({code}); see {run_dir / 'prune.log'}")
                report = json.loads((pruned / "prune_report.json").read_text())
                rebuilt = report.get("reconstruction")  # its token passes come out of every healing budget
                return {"command": "prunext " + " ".join(cmd), "decision": {k: report["decision"][k] for k in
                        ("pruned", "kept", "sources", "window", "trainable_positions")},
                        "params": report["params"], "timings_s": report.get("timings_s", {}),
                        "reconstruction": {k: v for k, v in rebuilt.items() if k != "positions"} if rebuilt else None}  # fmt: skip

            say(f"{ratio:.0%} {name}: pruning")
            pr = stage(run_dir / "prune", {"cmd": prune_cmd, "defaults": prune_defaults}, do_prune, needs=pruned / "config.json")
            say(f"{ratio:.0%} {name}: evaluating before healing")
            before = stage(run_dir / "eval-before", {**eval_key, "prune": pr["command"]},
                           lambda pruned=pruned, heal=trainable: evaluate_folder(pruned, zero_shot=heal is None))  # fmt: skip
            entry = {"prune": pr, "before": before, "healed": {}}
            has_norms = method == "flexigpt" and "none" not in flags  # output norms: --norm-open applies
            for budget in args.budget_list if trainable else []:
                heal = run_dir / (f"heal-{budget}" + (f"-{args.label}" if args.label else ""))
                lr = args.lr if trainable != "all" else args.lr_all
                spent = (pr.get("reconstruction") or {}).get("token_passes", 0)
                if spent >= budget:
                    raise SystemExit(f"quality.py: error: the reconstruction of {name} spends {spent:,} tokens, "
                                     f"more than the budget {budget:,}; give a larger budget or fewer --reconstruct-epochs")  # fmt: skip
                train_cmd = ["train", "--model", str(pruned), "--data", TRAIN_DATA, "--tokens", str(budget - spent),
                             "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--trainable", trainable,
                             "--seed", str(args.seed), "--save-every", "1000000000", "--log-every", "1",
                             *(["--lr", str(lr)] if lr is not None else []),
                             *(["--norm-lr", str(args.norm_lr)] if args.norm_lr is not None and trainable != "all" else []),
                             *(["--adapter-lr", str(args.adapter_lr)] if args.adapter_lr is not None and trainable != "all" else []),
                             *(["--norm-open", str(args.norm_open)] if args.norm_open is not None and has_norms else []),
                             *(["--norm-open-factor", str(args.norm_open_factor)]
                               if args.norm_open_factor is not None and args.norm_open is not None and has_norms else []),
                             "--loss", args.loss or ("auto" if name in DEFAULT_RECIPE else "lm"), *args.train_extra,
                             "--out", str(heal / "run"), "--overwrite"]  # fmt: skip
                key = {"train": train_cmd, "defaults": train_defaults, "nproc": args.nproc, "prune": pr["command"], "device": args.device}

                def do_heal(train_cmd=train_cmd, heal=heal) -> dict:
                    result = train(train_cmd, heal, args.nproc)
                    result.update(evaluate_folder(heal / "run" / "final", zero_shot=True))
                    if not args.keep_models:
                        shutil.rmtree(heal / "run" / "final", ignore_errors=True)
                    return result

                say(f"{ratio:.0%} {name}: healing {budget:,} tokens (--trainable {trainable}) and evaluating")
                entry["healed"][str(budget)] = stage(heal, {**eval_key, **key}, do_heal)
            results.setdefault(f"{ratio:g}", {})[name] = entry

    info = {"machine": machine(), "commit": commit(), "date": datetime.date.today().isoformat(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("ratio_list", "budget_list", "method_list", "prune_extra", "train_extra")},
            "ratios": args.ratio_list, "budgets": args.budget_list, "methods": args.method_list,
            "wall_s": round(time.perf_counter() - started, 1), "stages_s": round(stage_seconds(results), 1)}  # fmt: skip
    suffix = f"-{args.label}" if args.label else ""
    (out / f"results{suffix}.json").write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    report = render(info, results)
    if len(args.budget_list) >= 2:
        plot(out / f"ppl_vs_tokens{suffix}.png", info, results)
        report += f"\n![perplexity after healing vs tokens](ppl_vs_tokens{suffix}.png)\n"
    (out / f"quality{suffix}.md").write_text(report)
    print(report)
    print(f"wall time {info['wall_s']:.0f} s; wrote {out / f'quality{suffix}.md'} and {out / f'results{suffix}.json'}")
    return 0


def stage_seconds(node) -> float:
    """Sum of every stage's own time in ``results`` (what the tables cost, reused stages included)."""
    if isinstance(node, dict):
        own = node.get("seconds", 0.0) if isinstance(node.get("seconds"), (int, float)) else 0.0
        return own + sum(stage_seconds(v) for k, v in node.items() if k != "seconds")
    return 0.0


def train(cmd: list[str], heal: Path, nproc: int) -> dict:
    """Run ``prunext train`` as its own process(es); return its summary (steps, tokens, trainable params)."""
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", "-m", "prunext"]  # fmt: skip
    else:
        launcher = [sys.executable, "-m", "prunext"]
    heal.mkdir(parents=True, exist_ok=True)
    # an OMP_NUM_THREADS the caller set wins (two sweeps side by side at 1 thread each)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 2) // nproc))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    with open(heal / "train.log", "w") as log:
        done = subprocess.run([*launcher, *cmd], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = (heal / "train.log").read_text().splitlines()[-15:]
        raise SystemExit("quality.py: prunext train failed:\n  " + "\n  ".join(tail) + f"\n(full log: {heal / 'train.log'})")
    shutil.rmtree(heal / "run" / "checkpoints", ignore_errors=True)
    summary = json.loads((heal / "run" / "train_summary.json").read_text())
    return {"command": " ".join(launcher[1:] + cmd), "steps": summary["steps"], "tokens": summary["tokens"],
            "final_loss": summary["final_loss"], "train_seconds": round(summary["seconds"], 1),
            "trainable_params": summary["settings"]["trainable_params"]}  # fmt: skip


def _rows(results: dict, ratio: float, budget: int, methods: list[str]) -> list[dict]:
    """One dict per method for a (ratio, budget) table: ppl before/after, zero-shot, params."""
    dense = results["dense"]
    rows = [{"name": "dense", "before": dense["perplexity"]["ppl"], "after": None,
             "zs": dense["zeroshot"]["average"], "trainable": 0, "removed": 0.0, "healed": False}]  # fmt: skip
    for name in methods:
        entry = results[f"{ratio:g}"][name]
        healed = entry["healed"].get(str(budget))
        zs_source = healed if healed is not None else entry["before"]
        rows.append({
            "name": name,
            "before": entry["before"]["perplexity"]["ppl"],
            "after": healed["perplexity"]["ppl"] if healed else None,
            "zs": zs_source["zeroshot"]["average"],
            "trainable": healed["trainable_params"] if healed else 0,
            "removed": entry["prune"]["params"]["block_fraction"],
            "healed": healed is not None,
            "steps": healed["steps"] if healed else None,
            "prune_s": entry["prune"].get("seconds"),
            "heal_s": healed.get("train_seconds") if healed else None,
        })  # fmt: skip
    return rows


def compare(rows: list[dict]) -> list[str]:
    """Sentences checking FlexiGPT's claims on these rows (perplexity after healing, lower is better)."""
    after = {r["name"]: r["after"] for r in rows if r["after"] is not None}
    lines = []
    baselines = {n: v for n, v in after.items() if not n.startswith("flexigpt")}
    if "flexigpt" in after and baselines:
        best = min(baselines, key=baselines.get)
        f, b = after["flexigpt"], baselines[best]
        verdict = "met" if f <= 0.9 * b else "not met"
        lines.append(f"- prunext's default (flexigpt) vs the best healed baseline ({best}): {f:.2f} vs {b:.2f} "
                     f"({f / b:.2f}x; target at most 0.90x): **{verdict}**.")  # fmt: skip
    if "flexigpt-paper" in after and "shortgpt-lora" in after:
        f, s = after["flexigpt-paper"], after["shortgpt-lora"]
        verdict = "agrees" if f < s else "disagrees"
        lines.append(f"- flexigpt (paper recipe) vs shortgpt-lora after healing: {f:.2f} vs {s:.2f} ({f / s:.2f}x). "
                     f"The paper reports flexigpt better ({PAPER['flexigpt']} vs {PAPER['shortgpt-lora']} on "
                     f"Llama-2-7B at 30%, 1B tokens): **{verdict}**.")  # fmt: skip
    for ab in ABLATIONS:
        if ab in after and "flexigpt-paper" in after:
            a, f = after[ab], after["flexigpt-paper"]
            verdict = "agrees" if a > f else "disagrees"
            lines.append(f"- {LABELS[ab]} vs the paper recipe after healing: {a:.2f} vs {f:.2f} ({a / f:.2f}x). "
                         f"The paper reports the ablation worse ({PAPER[ab]} vs {PAPER['flexigpt']}): **{verdict}**.")  # fmt: skip
    if lines:
        lines.append("- Differences of a few percent are within the noise of a small evaluation set and one seed.")
    return lines


def render(info: dict, results: dict) -> str:
    s = info["settings"]
    lines = [
        "# Quality at equal budget",
        "",
        f"Machine: {info['machine']}. Commit `{info['commit']}`, {info['date']}. Model `{s['model']}`. "
        f"Compute time of all stages {info['stages_s']:.0f} s (this invocation's wall time {info['wall_s']:.0f} s; "
        "finished stages are reused).",
        f"Calibration: {s['calib_tokens']:,} tokens of `{TRAIN_DATA}`. Healing: `{TRAIN_DATA}`, seq-len {s['seq_len']}, "
        f"micro-batch {s['micro_batch']} x {s['nproc']} process(es), seed {s['seed']}, ZeRO-3, lr "
        f"{s['lr'] or 'default (4e-3)'} for adapters, {s['lr_all'] or 'default (1e-4)'} for `--trainable all`"
        + "".join(f", {flag} {s[key]}" for flag, key in (("--norm-lr", "norm_lr"), ("--adapter-lr", "adapter_lr"),
                  ("--norm-open", "norm_open"), ("--norm-open-factor", "norm_open_factor"),
                  ("--out-norm-init", "out_norm_init")) if s.get(key) is not None)
        + "".join(f", {flag} `{s[key]}`" for flag, key in (("--prune-args", "prune_args"), ("--train-args", "train_args"))
                  if s.get(key))
        + (f", loss {s['loss']} for every method." if s["loss"] else
           ", loss: lm for every method except prunext's default flexigpt (train's default, auto = lm+kd)."),
        f"Perplexity: `{EVAL_DATA}`, {s['eval_tokens'] // s['seq_len']} windows of {s['seq_len']} tokens. "
        f"Zero-shot: mean `acc` over {', '.join(TASKS)}, first {s['limit']} items each (after healing where healed).",
        "",
    ]  # fmt: skip
    for budget in info["budgets"]:
        for ratio in info["ratios"]:
            rows = _rows(results, ratio, budget, info["methods"])
            lines += [
                f"## Budget {budget:,} tokens, ratio {ratio:.0%}",
                "",
                "| method | ppl before healing | ppl after healing | zero-shot avg | trainable params | block params removed "
                "| prune s | heal s |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in rows:
                after = f"{r['after']:.2f}" if r["after"] is not None else "n/a"
                trainable = f"{r['trainable']:,}" if r["healed"] else "-"
                if r["name"] == "streamline" and r["healed"]:
                    trainable += " (all)"
                seconds = [f"{r[k]:.0f}" if r.get(k) is not None else "-" for k in ("prune_s", "heal_s")]
                lines.append(f"| {LABELS.get(r['name'], r['name'])} | {r['before']:.2f} | {after} | {r['zs']:.3f} | "
                             f"{trainable} | {r['removed']:.1%} | {seconds[0]} | {seconds[1]} |")  # fmt: skip
            steps = {r["steps"] for r in rows if r.get("steps")}
            if steps:
                lines += ["", f"Healing steps: {', '.join(map(str, sorted(steps)))}."]
            claims = compare(rows)
            if claims:
                lines += ["", "Against the paper's claims:", *claims]
            lines.append("")
    lines += [
        "Notes: shortgpt and angular have nothing to train (n/a after healing; zero-shot of the pruned model). "
        "streamline heals with `--trainable all` (prunext train cannot train one position only), so it trains "
        "far more parameters than the adapter methods. Block params removed is the net fraction, adapters counted. "
        "prune s: pruning time (a reconstruction included; its token passes come out of the healing budget); "
        "heal s: the healing run.",
        "",
    ]
    return "\n".join(lines)


def plot(path: Path, info: dict, results: dict) -> None:
    """Perplexity after healing against the token budget, one line per healed method, one panel per ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios, budgets = info["ratios"], info["budgets"]
    fig, axes = plt.subplots(1, len(ratios), figsize=(6 * len(ratios), 4), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        for name in info["methods"]:
            healed = results[f"{ratio:g}"][name]["healed"]
            points = [(b, healed[str(b)]["perplexity"]["ppl"]) for b in budgets if str(b) in healed]
            if points:
                ax.plot(*zip(*points), marker="o", label=LABELS.get(name, name))
        ax.axhline(results["dense"]["perplexity"]["ppl"], color="black", linestyle=":", label="dense")
        ax.set(xscale="log", yscale="log", xlabel="healing tokens", ylabel=f"perplexity ({EVAL_DATA})",
               title=f"ratio {ratio:.0%}")  # fmt: skip
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
