"""Shared pieces of the training tests: a tiny weight-shared model, a small text file, launcher commands.

Importable from the tests and from the helper scripts they run in subprocesses
(tests/ and tests/train/ on ``sys.path``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
PYTHON = sys.executable
BIN = Path(sys.executable).parent
LAUNCH = REPO / "launch" / "train.py"
CPU_CONFIG = REPO / "ds_configs" / "zero3_cpu.json"


def tiny_plan():
    """4 source blocks -> 4 positions; block 2 pruned and replaced by block 1 + LoRA + output norms.

    ::

        positions: P0  P1  P2          P3
        source:    B0  B1  B1+A/B+norm B3
    """
    from prunext.core.plan import LINEAR_NAMES, Plan, Position

    return Plan(
        (Position(0), Position(1), Position(1, lora_rank=4, lora_targets=LINEAR_NAMES, out_norm=True), Position(3)),
        num_source_blocks=4,
    )


def build_tiny_pruned(folder: Path, seed: int = 0) -> Path:
    """Save the tiny shared-weight model (hidden 32, vocab 128) with the tiny tokenizer as a native folder."""
    import torch

    sys.path.insert(0, str(TESTS))
    from conftest import make_tiny_hf, make_tiny_tokenizer

    from prunext.core.checkpoint import build_from_hf, save_native

    hf = make_tiny_hf("llama", layers=4, hidden=32, seed=seed)
    torch.manual_seed(seed)
    model = build_from_hf(hf, tiny_plan(), out_norm_init=0.1)
    with torch.no_grad():  # a nonzero adapter start, so both A and B get gradients from step 1
        for module in model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.normal_(0, 0.02)
    save_native(model, folder, tokenizer=make_tiny_tokenizer())
    return folder


def write_text(path: Path, chars: int = 8000) -> Path:
    """A few KB of real text (the start of builtin:wiki:train), paragraphs separated by blank lines."""
    from prunext.data import load_text_dataset

    out, size = [], 0
    for text in load_text_dataset("builtin:wiki:train")["text"]:
        for para in text.split("\n"):
            if para.strip():
                out.append(para.strip())
                size += len(para)
        if size >= chars:
            break
    path.write_text("\n\n".join(out)[:chars] + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    """The environment for launcher subprocesses: the repo and tests importable, one thread per rank."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), str(TESTS / "train"), e.get("PYTHONPATH", "")])
    e.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for key in ("WANDB_API_KEY", "WANDB_MODE"):  # --report-to wandb in tests logs offline into the run folder
        e.pop(key, None)
    return e


def torchrun(nproc: int, *args: str, program: tuple[str, ...] = (str(LAUNCH),)) -> list[str]:
    """torchrun on the local host running ``program`` (launch/train.py; or ``("-m", "prunext", "train")``, a script)."""
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *program, *map(str, args)]


def run(cmd: list[str], timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    """Run a launcher command; on failure the assertion shows the tail of its output."""
    kwargs.setdefault("env", env())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kwargs)


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Common flags for the tiny runs: blocks of 32 tokens, 2 per rank, fp32 ZeRO-3 on CPU."""
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--seq-len", "32",
            "--micro-batch", "2", "--deepspeed", str(CPU_CONFIG), "--warmup", "0", *extra]


def tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-n:]}\n--- stderr ---\n{proc.stderr[-n:]}"
