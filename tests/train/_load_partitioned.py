"""Load a model folder into ZeRO-3 partitions on a CPU that reports no fp16 kernels; rank 0 writes what it got.

Launched by tests/train/test_zero3.py::test_partitioned_load_keeps_fp32_where_the_cpu_has_no_fp16::

    torchrun --nproc_per_node 2 tests/train/_load_partitioned.py MODEL_DIR OUT_JSON

DeepSpeed's CPU accelerator answers ``is_fp16_supported`` from the CPU's kernels (yes on Xeons
with AMX-FP16, no on AMD EPYC); it is set to no here, so the test holds on every CPU.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from safetensors import safe_open

import tiny  # tests/train is on the launcher's PYTHONPATH (tiny.env)

from prunext.train.dsconfig import load_config
from prunext.train.partitioned import load_partitioned


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    try:
        get_accelerator().is_fp16_supported = lambda: False
        config = load_config(tiny.CPU_CONFIG)
        config["train_micro_batch_size_per_gpu"] = 1
        model, _ = load_partitioned(folder, config, torch.float32)
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
        got = {}
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                got[name] = [str(param.dtype), bool(torch.equal(param.data, stored[name]))]
        if dist.get_rank() == 0:
            out.write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
