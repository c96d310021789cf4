"""Load a model straight into DeepSpeed ZeRO-3 partitions: no rank ever holds the whole model.

::

    config.json ──► PrunextForCausalLM(config) under deepspeed.zero.Init
                    (each Parameter is partitioned as its module is built;
                     a shared block stays one Parameter in every position that runs it)
    *.safetensors ─► one stored tensor at a time, read by rank 0:
                    GatheredParameters([p], modifier_rank=0) -> rank 0 copies -> re-partitioned

Peak memory on any rank: its partitions plus one tensor (the largest, usually the
embedding), whatever the model's size. This is what transformers' own
``from_pretrained`` does under ``HfDeepSpeedConfig`` (``deepspeed.zero.Init``, then
``GatheredParameters(..., modifier_rank=0)`` module by module), except that the
stored tensors are read one by one instead of as one merged state dict on rank 0.

A native folder loads as it is; a plain Hugging Face folder (or a hub id,
downloaded first) as the identity plan, whose tensor names are the same. A GGUF
file has to be dequantized whole by transformers' GGUF loader, so it is loaded
whole on every rank, with a warning saying how to avoid it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from prunext.errors import ModelError

log = logging.getLogger(__name__)


def numel(param: torch.Tensor) -> int:
    """Elements of a parameter, partitioned by ZeRO-3 (``ds_numel``) or not."""
    return getattr(param, "ds_numel", None) or param.numel()


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def modify(params):
    """A context in which ``params`` may be changed in place, partitioned or not (rank 0's change is kept)."""
    params = [p for p in params if p is not None]
    if not any(is_partitioned(p) for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def load_partitioned(folder: Path, ds_config: dict, dtype: torch.dtype):
    """The model of ``spec`` built under ``deepspeed.zero.Init`` and filled one stored tensor at a time.

    Every rank calls this (it runs collectives). Loading is strict: a stored tensor the model
    does not have, or a parameter no stored tensor fills, is a :class:`ModelError`.

    Args:
        folder: a local model folder of safetensors weights (:func:`prunext.core.loading.local_folder`).
        ds_config: the run's DeepSpeed config (ZeRO-3).
        dtype: the parameters' dtype.

    Returns:
        ``(model, tokenizer)``; the model in eval mode, its parameters partitioned.

    Raises:
        ModelError: the folder is incomplete, or its weights do not fit its plan.
    """
    import deepspeed
    import torch.distributed as dist
    from tqdm.auto import tqdm
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    from prunext.core.checkpoint import iter_safetensors, read_config, read_safetensors_keys
    from prunext.core.families import family_of
    from prunext.core.loading import _load_tokenizer
    from prunext.core.model import PrunextForCausalLM
    from prunext.train.dsconfig import config_dtype

    config = read_config(folder)
    files = read_safetensors_keys(folder)
    rank = dist.get_rank()
    # Import the family's modeling module before zero.Init: a class created inside it gets DeepSpeed's
    # __init__ wrapper, and its exit restores the class's first __init__, dropping what decorators
    # added after (the kernels hub's per-instance forward wrappers), which breaks every later instance.
    family = family_of(config.base_model_type)
    family.layer_cls(), family.model_cls()
    # zero.Init is given the dtype through the config only: it reads an explicit ``dtype`` as
    # ``(dtype or half) if fp16_supported else bf16``, so on a CPU without fp16 kernels (AMD EPYC) an
    # fp32 run got bf16 weights, and the frozen base came back from training rounded to 8 bits.
    if config_dtype(ds_config) != str(dtype).removeprefix("torch."):
        raise ValueError(f"dtype {dtype} differs from the DeepSpeed config's {config_dtype(ds_config)}")
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = PrunextForCausalLM(config)
    wrong = {p.ds_tensor.dtype for p in model.parameters()} - {dtype}
    if wrong:
        raise RuntimeError(f"deepspeed.zero.Init built {wrong} parameters for a {dtype} run; report this DeepSpeed version")
    model.tie_weights()  # lm_head to the embedding where the config ties them, as from_pretrained does
    params = dict(model.named_parameters(remove_duplicate=False))  # every name of a shared tensor
    check_shapes(folder, files, params)  # on every rank, from the headers: no rank fails alone inside a gather
    files = dict(sorted(files.items(), key=lambda kv: kv[1]))  # file by file: the order iter_safetensors reads in
    filled: set[int] = set()
    stored = iter_safetensors(folder, files) if rank == 0 else ((k, None) for k in files)
    for key, tensor in tqdm(stored, total=len(files), desc="loading partitioned", unit="tensor", disable=rank != 0):
        param = params[key]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    param.data.copy_(tensor)
        filled.add(id(param))
    missing = sorted({n for n, p in params.items() if id(p) not in filled})
    if missing:
        raise ModelError(f"{folder} has no stored tensor for {', '.join(missing[:3])}...; re-create the folder")
    release_freed_memory()
    log.info("loaded %s into ZeRO-3 partitions (%d stored tensors, %s parameters)", folder, len(files),
             f"{sum(numel(p) for p in model.parameters()):,}")
    return model.eval(), _load_tokenizer(folder)


def release_freed_memory() -> None:
    """Hand memory freed by the gathers back to the OS (glibc keeps freed heap memory for reuse; elsewhere a no-op).

    Each gathered tensor is freed after its partition is kept, but the C allocator may hold
    on to the pages, so a rank's resident memory would keep the largest tensors it gathered.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_shapes(folder: Path, files: dict[str, str], params: dict[str, torch.Tensor]) -> None:
    """Refuse stored tensors the model does not have, or of another shape, reading only the safetensors headers.

    Raises:
        ModelError: naming the first few offending tensors.
    """
    from safetensors import safe_open

    unknown = sorted(k for k in files if k not in params)
    if unknown:
        raise ModelError(f"{folder} stores tensors the model does not have ({', '.join(unknown[:3])}); re-create the folder")
    by_file: dict[str, list[str]] = {}
    for key, name in files.items():
        by_file.setdefault(name, []).append(key)
    for name, keys in by_file.items():
        with safe_open(str(folder / name), framework="pt") as f:
            for key in keys:
                shape, want = tuple(f.get_slice(key).get_shape()), tuple(params[key].ds_shape if is_partitioned(params[key]) else params[key].shape)
                if shape != want:
                    raise ModelError(f"{key} in {folder} has shape {shape}, the plan needs {want}; re-create the folder")


def load_for_zero3(spec: str, ds_config: dict, dtype: torch.dtype):
    """:func:`load_partitioned`, or for a GGUF file the whole model on every rank (with a warning); ``(model, tokenizer)``."""
    from prunext.core.loading import load_model, local_folder

    folder = local_folder(spec)
    if folder is None:
        log.warning(
            "%s is a GGUF file: it is dequantized whole on every rank before ZeRO-3 partitions it; for large models "
            "convert it once (prunext convert --from %s --to DIR) and train from DIR, which loads partitioned", spec, spec,
        )
        return load_model(spec, dtype=dtype)
    return load_partitioned(folder, ds_config, dtype)
