"""Time ``prunext prune --method flexigpt --ratio 0.3`` on the built-in SmolLM2-135M.

Usage (from the repository root)::

    .venv/bin/python bench/prune_time.py                      # CLI defaults: 32768 calibration tokens
    .venv/bin/python bench/prune_time.py --calib-tokens 4096 --seq-len 256
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/prune_time.py   # on a CPU shared with other jobs

Runs the real command (through ``prunext.cli.main``) into a temporary folder
and prints the breakdown it records in ``prune_report.json``:

    scoring       calibration forward passes (Block Influence)
    matching_svd  replacement distances for pruned x kept blocks + SVD adapter init
    build_save    building the weight-shared model + writing the native folder and plots

plus the machine (CPU count, torch threads, load average), so a number is
never quoted without where it came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from prunext.cli import main as cli

    with tempfile.TemporaryDirectory(prefix="prune-bench-") as tmp:
        out = Path(tmp) / "out"
        cmd = ["prune", "--model", "builtin:smollm2-135m", "--method", "flexigpt", "--ratio", str(args.ratio),
               "--calib-tokens", str(args.calib_tokens), "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--device", args.device, "--out", str(out)]  # fmt: skip
        start = time.perf_counter()
        if cli(cmd) != 0:
            return 1
        wall = time.perf_counter() - start
        report = json.loads((out / "prune_report.json").read_text())

    timings = report["timings_s"]
    load = os.getloadavg()
    print()
    print(f"prunext prune {' '.join(cmd[1:-2])}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")  # fmt: skip
    print(f"pruned {len(report['decision']['pruned'])} of {report['decision']['num_blocks']} blocks")
    for name in ("scoring", "matching_svd", "build_save"):
        print(f"  {name:<13} {timings[name]:8.1f} s")
    print(f"  {'total (wall)':<13} {wall:8.1f} s  (includes loading the model and tokenising the calibration text)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
