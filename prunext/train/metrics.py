"""``OUT/metrics.jsonl``, throughput and model FLOPs utilisation, and optional wandb logging.

One JSON object per optimizer step (rank 0 writes): ``step``, ``loss`` (mean
over the global batch), ``lr`` (the rate that step used), ``tokens``
(cumulative), ``tokens_per_s`` (this step), ``grad_norm``, ``epoch``,
``elapsed_s``, on GPU ``mfu``, and ``eval_loss``/``eval_ppl`` on evaluation
steps.

MFU = 6 * N * tokens/s / peak, with N the parameters the forward pass
multiplies with (a shared block counted once per position that runs it) and
the peak dense bf16/fp16 tensor-core rate of the GPU. 6N is the usual
all-trainable estimate (2N forward, 4N backward); with frozen base weights
the backward skips their weight gradients (about 4N in all), so MFU then
understates how busy the GPU is. Attention's sequence-length term is left out.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from prunext.fsutil import write_text_atomic

log = logging.getLogger(__name__)

#: Dense bf16/fp16 peak FLOP/s per GPU (vendor datasheets, without sparsity).
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
}


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The peak for a GPU name such as "NVIDIA H100 80GB HBM3", or None (unknown GPU, fp32)."""
    if dtype not in ("bfloat16", "float16"):
        return None
    if "H100" in device_name and "PCIe" in device_name:
        return 756e12
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None


def mfu(executed_params: int, tokens_per_s: float, peak: float | None) -> float | None:
    return None if not peak else 6 * executed_params * tokens_per_s / peak


class MetricsLog:
    """Append-only ``metrics.jsonl`` on rank 0 (other ranks hold a no-op instance).

    On resume the lines after the checkpoint's step are dropped, since those
    steps are redone, so the file reads like one uninterrupted run; the kept
    lines go to a temporary file renamed over the old one.
    """

    def __init__(self, path: Path, active: bool, resume_step: int | None = None) -> None:
        self.path = path
        self.active = active
        if not active:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    break  # a line cut by a kill: everything after it is redone
        # a new file renamed over the old one: a kill during resume leaves one or the other, whole
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Wandb:
    """wandb on rank 0 when ``--report-to wandb``; offline (files under OUT/wandb) without an API key."""

    def __init__(self, enabled: bool, out: Path, config: dict, project: str, resume: bool) -> None:
        self.run = None
        if not enabled:
            return
        if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
            log.info("wandb: no WANDB_API_KEY, logging offline into %s (sync later with `wandb sync`)", out / "wandb")
        import wandb

        self.run = wandb.init(project=project, name=out.resolve().name, dir=str(out), config=config, resume="allow" if resume else None)

    def log(self, record: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux ``/proc``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last :func:`reset_peak_rss`, in MiB.

    The kernel's high-water mark (``VmHWM``); ``getrusage`` (the peak since the start) where
    ``/proc`` cannot be read.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current resident memory (Linux: 5 into ``clear_refs``); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryStages:
    """Resident MiB at each stage boundary of a run, and the peak within each stage.

    ``mark(stage)`` records the memory now and the peak since the previous mark, then
    restarts the peak, so a transient (a gathered parameter, a logits buffer) is charged
    to the stage that caused it. The first stage, ``start``, is taken at construction.
    """

    def __init__(self) -> None:
        self.rss = {"start": rss_mb()}
        self.peaks: dict[str, float] = {}
        reset_peak_rss()

    def mark(self, stage: str) -> None:
        self.rss[stage] = rss_mb()
        self.peaks[stage] = max(peak_rss_mb(), self.rss[stage])
        reset_peak_rss()


def memory_record(rank: int, stages: MemoryStages) -> dict:
    """One rank's memory: resident MiB at each stage of the run (``start`` first: libraries loaded),
    the peak within each stage and overall, and CUDA's peak on a GPU."""
    import torch

    record = {"rank": rank, "rss_start_mb": round(stages.rss["start"], 1),
              "rss_peak_mb": round(max([*stages.peaks.values(), *stages.rss.values()]), 1),
              "rss_mb": {k: round(v, 1) for k, v in stages.rss.items()},
              "rss_stage_peak_mb": {k: round(v, 1) for k, v in stages.peaks.items()}}
    if torch.cuda.is_available():
        record["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return record
