"""Peak memory of prunext's big jobs as a ratio to the model's bytes, side by side in one run.

    .venv/bin/python bench/memory.py --out bench_out/memory            # ~300M-parameter random Llama, ~10 min on 2 cores

A random Llama of configurable size (default hidden 1024, 20 blocks, SmolLM2's
49,152-token vocabulary, untied: ~324M parameters, 1.3 GB in fp32) with the
built-in model's tokenizer. Measured, each in processes of its own:

- ``prune --offload`` (flexigpt, 30%) of the model stored in 200 MB shards: the
  peak resident memory the run adds to its process once the libraries are loaded
  (the kernel's high-water mark, restarted just before the run);
- ``train`` of the pruned model with ``--loss auto`` (the dense model as teacher)
  at 1, 2 and 4 ranks: the largest rank's peak resident memory above the start
  of its run (libraries loaded), as each rank records it in ``train_summary.json``,
  and each stage's resident memory;
- ``convert`` of the largest run's last ZeRO-3 checkpoint to a native folder,
  measured as prune is.

Ratios are to the bytes of the model(s) the job handles (train: student plus
teacher). Each rank of train also records its peak within each stage; the
training stage's peak above the memory held when it began is the transient of
a step, printed beside the bytes of the largest parameters ZeRO-3 must gather
whole (``--tie`` ties the embedding and the output layer, to see the transient
follow them). On a GPU, add ``--deepspeed
ds_configs/zero3.json`` to train in bf16 there (the CUDA peak is in each rank's
record). Writes ``OUT/memory.md`` and ``OUT/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# ZeRO-3 keeps up to this many gathered elements alive between uses; DeepSpeed's default (1e9) exceeds
# a 300M model, so it is bounded to about one block, as for a 7B+ model with the default.
ZERO = {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "stage3_max_live_parameters": 2 * 10**7,
        "stage3_max_reuse_distance": 2 * 10**7, "stage3_prefetch_bucket_size": 2 * 10**7}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/memory")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--ranks", default="1,2,4", help="train at these world sizes (default 1,2,4)")
    p.add_argument("--tokens", default="2048", help="training tokens per run (default 2048: a few steps)")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config for train (default: fp32 ZeRO-3 with block-sized gathers)")
    p.add_argument("--tie", action="store_true", help="tie the output layer to the embedding (one 49K x hidden matrix, not two)")
    return p.parse_args(argv)


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    e.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors go back to the OS: resident = held
    return e


def peak_of(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; its peak resident MiB (the largest child's ``ru_maxrss``) and seconds."""
    probe = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:]); "
             "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], env=env(), capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    code, peak = json.loads(proc.stdout.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"memory.py: {' '.join(cmd[:4])} ... failed (exit {code}):\n{proc.stderr[-3000:]}")
    return peak, seconds


# Runs a prunext command in this process once the libraries are loaded; prints [exit code, MiB at the start, peak MiB].
_IN_PROCESS = """
import json, sys
import accelerate, datasets, deepspeed, matplotlib.pyplot, torch, transformers
import prunext.cli, prunext.prune.recipe, prunext.convert.recipe
from transformers.models.llama import modeling_llama
from prunext.train.metrics import peak_rss_mb, reset_peak_rss, rss_mb
start = rss_mb()
reset_peak_rss()
code = prunext.cli.main(sys.argv[1:])
print(json.dumps([code, start, peak_rss_mb()]))
"""


def in_process_growth(args: list[str]) -> tuple[float, float, float]:
    """``prunext ARGS`` measured in-process: (peak MiB, MiB the run added above its start, seconds)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _IN_PROCESS, *args], env=env(), capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"memory.py: prunext {' '.join(args[:3])} ... failed:\n{proc.stderr[-3000:]}")
    code, begin, peak = json.loads(proc.stdout.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"memory.py: prunext {' '.join(args[:3])} ... exited {code}:\n{proc.stderr[-3000:]}")
    return peak, peak - begin, seconds


def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def make_model(folder: Path, hidden: int, layers: int, tie: bool) -> None:
    """A random Llama of the given size with the built-in model's tokenizer, saved as a plain HF folder in 200 MB shards."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prunext.core.loading import builtin_folder

    tokenizer = AutoTokenizer.from_pretrained(builtin_folder("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         max_position_embeddings=2048, tie_word_embeddings=tie)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="200MB")
    tokenizer.save_pretrained(folder)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense, pruned = out / "dense", out / "pruned"
    if not (dense / "config.json").is_file():
        make_model(dense, args.hidden, args.layers, args.tie)
    rows = []

    base, _ = peak_of([sys.executable, "-c", "import torch, transformers, deepspeed, prunext.cli, prunext.train.recipe"])
    rows.append(("bare import of the libraries", base, None, None, 0.0))
    size = model_bytes(dense)

    cmd = ["prune", "--model", str(dense), "--ratio", "0.3", "--offload", "--calib-tokens", "2048",
           "--seq-len", "256", "--batch-size", "2", "--out", str(pruned), "--overwrite"]
    peak, growth, seconds = in_process_growth(cmd)
    rows.append((f"prune --offload (flexigpt 30%, {len(list(dense.glob('*.safetensors')))} shards)", peak, growth * 2**20 / size, size, seconds))

    config = args.deepspeed
    if config is None:
        config = out / "zero3_block_gathers.json"
        config.write_text(json.dumps({"zero_optimization": ZERO}))
    both = model_bytes(pruned) + size
    stages = {}
    last_run = None
    for world in [int(w) for w in args.ranks.split(",")]:
        run = out / f"train_{world}"
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(world), "--master_addr", "127.0.0.1", "--master_port",
               str(29600 + world), str(REPO / "launch" / "train.py"), "--model", str(pruned), "--data", "builtin:wiki:train",
               "--tokens", args.tokens, "--seq-len", "128", "--micro-batch", "1", "--loss", "auto", "--deepspeed", str(config),
               "--out", str(run), "--overwrite", "--warmup", "0"]
        _, seconds = peak_of(cmd)
        memory = json.loads((run / "train_summary.json").read_text())["memory"]
        worst = max(memory, key=lambda m: m["rss_peak_mb"] - m["rss_start_mb"])
        growth = worst["rss_peak_mb"] - worst["rss_start_mb"]
        rows.append((f"train, {world} rank(s), --loss auto (largest rank)", worst["rss_peak_mb"], growth * 2**20 / both, both, seconds))
        stages[world] = memory
        last_run = run

    converted = out / "converted"
    peak, growth, seconds = in_process_growth(["convert", "--from", str(last_run / "checkpoints"), "--to", str(converted), "--overwrite"])
    rows.append(("convert (ZeRO-3 checkpoint -> native)", peak, growth * 2**20 / model_bytes(pruned), model_bytes(pruned), seconds))

    lines = [f"Random Llama: hidden {args.hidden}, {args.layers} blocks, {size / 1e9:.2f} GB dense (fp32), "
             f"{model_bytes(pruned) / 1e9:.2f} GB pruned; machine: {os.cpu_count()} CPU cores", "",
             "| job | peak resident MiB | above the start, / model bytes | model bytes | seconds |", "|---|---:|---:|---:|---:|"]
    for name, peak, ratio, nbytes, seconds in rows:
        lines.append(f"| {name} | {peak:,.0f} | {'-' if ratio is None else f'{ratio:.2f}x'} | "
                     f"{'-' if nbytes is None else f'{nbytes / 2**20:,.0f} MiB'} | {seconds:.0f} |")
    config = json.loads((dense / "config.json").read_text())
    gathered = config["vocab_size"] * config["hidden_size"] * 4 / 2**20  # one fp32 embedding or output matrix
    whole = 2 * (1 if config["tie_word_embeddings"] else 2) * gathered  # student and teacher
    lines += ["", f"Largest parameters ZeRO-3 gathers whole: the embedding{'' if config['tie_word_embeddings'] else ' and the output layer'}, "
              f"{gathered:,.0f} MiB each, {whole:,.0f} MiB for student and teacher together.", "",
              "Resident MiB of each rank at each stage of train (start = libraries loaded) and, after ';', the peak",
              "within each stage; 'step transient' = the training stage's peak minus the memory held when it began:", ""]
    for world, memory in stages.items():
        for m in memory:
            peaks = m.get("rss_stage_peak_mb", {})
            transient = peaks.get("trained", 0) - m["rss_mb"].get("engines_started", 0)
            lines.append(f"- {world} rank(s), rank {m['rank']}: " + ", ".join(f"{k} {v:,.0f}" for k, v in m["rss_mb"].items())
                         + "; peaks " + ", ".join(f"{k} {v:,.0f}" for k, v in peaks.items())
                         + f"; step transient {transient:,.0f}")
    text = "\n".join(lines) + "\n"
    (out / "memory.md").write_text(text)
    (out / "memory.json").write_text(json.dumps({"rows": rows, "train_memory": stages}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
