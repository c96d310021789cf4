"""Run a process in which prunext cannot be imported (``sitecustomize.py`` here blocks it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def run_without_prunext(command: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``command`` (a Python interpreter or console script and its arguments) with prunext blocked,
    in ``cwd`` (keep it outside the repository), offline, with its own Hugging Face caches under ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_MODULES_CACHE", "HF_DATASETS_CACHE")}
    env.update(PYTHONPATH=str(FOLDER), HF_HOME=str(cwd / "hf_home"), HF_MODULES_CACHE=str(cwd / "hf_modules"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([str(a) for a in command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,  # no prompt waits for an answer
                          capture_output=True, text=True, timeout=timeout)
