"""How much memory a ZeRO-3 run needs per accelerator and per node, before anything is loaded.

In the spirit of DeepSpeed's ``estimate_zero3_model_states_mem_needs``, for
prunext's runs: only the trainable tensors carry gradients, fp32 masters and
Adam moments (``--trainable replacement`` trains a few percent), and a
``--loss kd`` teacher adds its working weights. Per rank, with W ranks::

    working weights  (student + teacher) x dtype bytes / W         (GPU; host with offload_param)
    trainable        trainable x (dtype grad + 4 master + 8 Adam) / W   (the optimizer part on host with offload_optimizer)
    gathered layer   largest block or embedding x dtype bytes x 2   (the tensors ZeRO-3 assembles for one module)

and x 1.5 on what is offloaded to host, DeepSpeed's buffer factor. Loading
adds only one tensor (prunext/train/partitioned.py). Activations are not
counted: they depend on --seq-len and --micro-batch, and gradient
checkpointing bounds them. docs/scaling.md has the numbers for 7B, 13B, 70B.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from prunext.errors import UserError

GIB = 2**30
#: DeepSpeed's additional_buffer_factor for what is offloaded to host memory.
HOST_BUFFER_FACTOR = 1.5
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Sizes:
    """Parameter counts of a model, each shared tensor once.

    Args:
        total: stored parameters.
        trainable: those ``--trainable`` trains.
        largest_module: parameters of the largest position block or of the embedding, whichever is larger.
    """

    total: int
    trainable: int
    largest_module: int


@dataclass(frozen=True)
class Estimate:
    """Bytes a run needs: on each accelerator (or each rank's share of host memory on CPU) and per node on the host."""

    device_per_rank: int
    host_per_node: int

    def describe(self) -> str:
        return f"{self.device_per_rank / GIB:.1f} GiB per rank and {self.host_per_node / GIB:.1f} GiB of host memory per node"


def sizes_of(config, trainable: str | None) -> Sizes:
    """The :class:`Sizes` of a :class:`PrunextConfig`'s model, built on the meta device (no memory, no weights).

    ``trainable`` None: nothing trains (a teacher).
    """
    import torch

    from prunext.core.model import PrunextForCausalLM
    from prunext.train.trainable import wants

    with torch.device("meta"):
        model = PrunextForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for n, p in model.named_parameters() if trainable and wants(n, trainable))
    blocks = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    largest = max([*blocks, model.get_input_embeddings().weight.numel()])
    return Sizes(total, trained, largest)


def estimate(student: Sizes, teacher: Sizes | None, world: int, ranks_per_node: int, dtype: str,
             offload_optimizer: bool = False, offload_param: bool = False) -> Estimate:
    """The model-state memory of a ZeRO-3 run (the module docstring has the formula)."""
    b = DTYPE_BYTES[dtype]
    working = (student.total + (teacher.total if teacher else 0)) * b / world
    grads = student.trainable * b / world
    optimizer = student.trainable * (4 + 8) / world  # fp32 master + Adam's two moments
    gathered = 2 * b * max(student.largest_module, teacher.largest_module if teacher else 0)
    device, host = gathered + grads, 0.0
    if offload_param:
        host += working * ranks_per_node * HOST_BUFFER_FACTOR
    else:
        device += working
    if offload_optimizer:
        host += optimizer * ranks_per_node * HOST_BUFFER_FACTOR
    else:
        device += optimizer
    return Estimate(math.ceil(device), math.ceil(host))


def available_memory() -> tuple[int | None, int]:
    """``(bytes free on this rank's accelerator or None on CPU, bytes of host memory available on this node)``."""
    import torch

    device = None
    if torch.cuda.is_available():
        device, _ = torch.cuda.mem_get_info()
    host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except OSError:
        pass
    return device, host


def check_fits(need: Estimate, ranks_per_node: int, config_name: str, world: int) -> None:
    """Refuse, in one line, a run whose model states cannot fit the memory it has.

    On CPU the ranks of a node share host memory, so their model states and the host
    part are added up against it.

    Raises:
        UserError: with the estimate, what is available, and what would fit.
    """
    device_free, host_free = available_memory()
    if device_free is not None:
        short = need.device_per_rank > device_free or need.host_per_node > host_free
        have = f"{device_free / GIB:.1f} GiB free on this GPU and {host_free / GIB:.1f} GiB of host memory"
    else:
        short = need.device_per_rank * ranks_per_node + need.host_per_node > host_free
        have = f"{host_free / GIB:.1f} GiB of host memory for {ranks_per_node} rank(s) on this node"
    if short:
        raise UserError(
            f"the model will not fit: it needs about {need.describe()} ({config_name}, {world} rank(s)), and this node has "
            f"{have}; use more ranks or nodes, ds_configs/zero3_offload.json, --trainable replacement, or --loss lm"
        )


def check_run(model: str, teacher: str | None, trainable: str, ds_config: dict, world: int, config_name: str) -> Estimate | None:
    """The estimate of a run whose models are local folders (checked against this node's memory), else None."""
    from prunext.core.checkpoint import read_config
    from prunext.core.loading import resolve_model_path
    from prunext.train.dsconfig import config_dtype

    def config_of(spec: str | None):
        if spec is None:
            return None
        where = resolve_model_path(spec)
        return read_config(where) if not isinstance(where, str) and (where / "config.json").is_file() else None

    student, teacher_config = config_of(model), config_of(teacher)
    if student is None or (teacher is not None and teacher_config is None):
        return None  # a hub id or a GGUF file: its size is known only once it is read
    zero = ds_config.get("zero_optimization", {})
    offloaded = {k: zero.get(k, {}).get("device", "none") not in (None, "none") for k in ("offload_optimizer", "offload_param")}
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", min(world, os.cpu_count() or 1)))
    need = estimate(sizes_of(student, trainable), sizes_of(teacher_config, None) if teacher else None, world,
                    ranks_per_node, config_dtype(ds_config), **offloaded)
    check_fits(need, ranks_per_node, config_name, world)
    return need
