"""The native checkpoint format: a Hugging Face folder that stores each shared tensor once.

::

    DIR/config.json                    base config + "prunext_plan", model_type "prunext", "auto_map"
    DIR/configuration_prunext.py,      the model code, for loading with transformers alone
        modeling_prunext.py            (trust_remote_code=True; see prunext.core.portable)
    DIR/model.safetensors              or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    DIR/tokenizer*.json, ...           the tokenizer, when one is given
    DIR/generation_config.json         when the model has one

``transformers.save_pretrained`` refuses tensors shared outside its tied-key
list, so the native writer dedupes by the plan itself
(:func:`prunext.core.mapping.stored_keys`) and the loader re-ties after
loading (:meth:`PrunextForCausalLM.tie_positions`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from prunext.core.mapping import hf_to_plan, stored_keys
from prunext.core.model import DEFAULT_OUT_NORM_INIT, PrunextConfig, PrunextForCausalLM, register
from prunext.core.modules import LoRALinear, OutputNorm
from prunext.core.plan import Plan, PlanError
from prunext.core.portable import CONFIG_FILE, MODELING_FILE, code_differences, write_portable_code
from prunext.errors import ModelError
from prunext.fsutil import atomic_dir

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def stored_state_dict(model: PrunextForCausalLM) -> dict[str, torch.Tensor]:
    """The tensors a native checkpoint holds: each shared tensor once."""
    state = model.state_dict()
    keys = stored_keys(model.plan, state.keys(), model.config.tie_word_embeddings)
    return {k: state[k] for k in keys}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a size such as "5GB", "200MB" or "2GiB"."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def write_safetensors(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> list[str]:
    """Write ``state`` as one file, or as shards plus an HF index when larger than ``max_shard_size``.

    Returns:
        The file names written.
    """
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata=metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + [INDEX_FILE]


@dataclass
class Lazy:
    """A tensor not yet read or assembled: ``shape`` now, ``load()`` -> the tensor (one copy) when asked.

    ``dtype``: what ``load()`` gives when it is not a floating-point tensor (a buffer), else None.
    """

    shape: tuple
    load: Callable
    dtype: object = None


#: safetensors' names of the dtypes a stored tensor can have.
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_stored_streaming(stored: dict[str, Lazy], folder: Path, dtype, max_shard_size, progress: bool = True) -> list[str]:
    """Write safetensors shards (+ index), one tensor in memory at a time.

    Same layout and files as :func:`write_safetensors`. Every shape and dtype is known before
    any tensor is read, so each shard's header is written first and each tensor is appended
    as it is loaded, then dropped (the safetensors format: an 8-byte little-endian header
    length, the JSON header padded to 8 bytes, the tensors' bytes in order). Floating tensors
    are written in ``dtype``.
    """
    from tqdm.auto import tqdm

    def dtype_of(key: str):
        return stored[key].dtype or dtype

    limit = parse_size(max_shard_size)
    size_of = {k: math.prod(v.shape) * dtype_of(k).itemsize for k, v in stored.items()}
    groups: list[list[str]] = [[]]
    size = 0
    for key in stored:
        if groups[-1] and size + size_of[key] > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += size_of[key]
    names = [SINGLE_FILE] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    bar = tqdm(total=len(stored), desc="tensors", unit="tensor", disable=not progress)
    for name, keys in zip(names, groups):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in keys:
            kind = _SAFETENSORS_DTYPES[str(dtype_of(key)).removeprefix("torch.")]
            header[key] = {"dtype": kind, "shape": list(stored[key].shape), "data_offsets": [offset, offset + size_of[key]]}
            offset += size_of[key]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / name, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for key in keys:
                t = stored[key].load()
                t = (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()
                if tuple(t.shape) != tuple(stored[key].shape) or t.dtype != dtype_of(key):
                    raise ValueError(f"{key}: assembled {tuple(t.shape)} {t.dtype}, expected {tuple(stored[key].shape)} {dtype_of(key)}")
                f.write(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes, no copy
                del t
                bar.update(1)
    bar.close()
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(size_of.values())}, "weight_map": {k: n for n, ks in zip(names, groups) for k in ks}}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append(INDEX_FILE)
    return names


def write_native(
    model: PrunextForCausalLM,
    folder: Path,
    tokenizer=None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    meta_source: Callable[[str], torch.Tensor] | None = None,
) -> None:
    """Write the native files into an existing folder (no atomicity; see :func:`save_native`).

    Args:
        meta_source: for a model whose base tensors are still on the meta device (built over a
            folder larger than memory, ``prune --offload``): stored key -> that tensor, called
            when it is written. The shards are then written one tensor at a time
            (:func:`write_stored_streaming`), in the model's dtype.
    """
    folder = Path(folder)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    write_portable_code(folder)
    if model.generation_config is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    state = stored_state_dict(model)
    if meta_source is None:
        write_safetensors(state, folder, max_shard_size)
    else:
        stored = {
            key: Lazy(tuple(t.shape), (lambda key=key: meta_source(key)) if t.is_meta else (lambda t=t: t), None if t.is_floating_point() else t.dtype)
            for key, t in state.items()
        }
        write_stored_streaming(stored, folder, next(model.parameters()).dtype, max_shard_size, progress=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_native(
    model: PrunextForCausalLM,
    save_directory: str | os.PathLike,
    tokenizer=None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = True,
    is_main_process: bool = True,
    **_hf_kwargs,
) -> Path:
    """Write ``model`` (and ``tokenizer``) as a native folder, atomically.

    Args:
        model: the model to save.
        save_directory: target folder; written under a temporary name and renamed.
        tokenizer: saved beside the weights when given.
        max_shard_size: shard above this many bytes (int or "5GB").
        overwrite: replace an existing non-empty folder (HF ``save_pretrained`` does).
        is_main_process: only the main process writes (HF convention).

    Returns:
        The folder written.
    """
    path = Path(save_directory)
    if not is_main_process:
        return path
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_native(model, tmp, tokenizer, max_shard_size)
    log.debug("wrote native model to %s", path)
    return path


def read_plan(folder: str | os.PathLike) -> Plan | None:
    """The plan of a native folder read from its ``config.json`` without loading weights.

    Returns None for anything that is not a readable native folder (plain HF
    folders, GGUF files, hub ids, damaged configs); loading reports those in
    its own words.
    """
    try:
        data = json.loads((Path(folder) / "config.json").read_text())
        if data.get("model_type") != "prunext":
            return None
        if data.get("prunext_plan") is None:
            return Plan.identity(int(data["num_hidden_layers"]))
        return Plan.from_dict(data["prunext_plan"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_config(folder: Path) -> PrunextConfig:
    """The :class:`PrunextConfig` of a native folder, or the identity-plan config of a plain HF folder, from
    ``config.json`` alone (no weight is read).

    Raises:
        ModelError: ``config.json`` is not valid JSON, or the family has no entry.
    """
    from transformers import AutoConfig

    from prunext.core.families import check_family

    register()
    folder = Path(folder)
    try:
        data = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{folder / 'config.json'} is not valid JSON ({e}); re-copy or re-create the model folder") from e
    if data.get("model_type") == "prunext":
        return PrunextConfig.from_pretrained(folder)
    check_family(data.get("model_type", "?"))
    base = AutoConfig.from_pretrained(folder)
    return PrunextConfig.from_base(base, Plan.identity(base.num_hidden_layers))


def read_safetensors_keys(folder: Path) -> dict[str, str]:
    """Map every stored tensor name to the file holding it (single file or sharded)."""
    index = folder / INDEX_FILE
    try:
        if index.exists():
            return dict(json.loads(index.read_text())["weight_map"])
        single = folder / SINGLE_FILE
        if not single.exists():
            raise ModelError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}; it is not a complete model folder")
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    except (SafetensorError, json.JSONDecodeError, KeyError, OSError) as e:
        raise ModelError(f"the weights in {folder} are corrupt or truncated ({e}); re-create or re-copy the folder") from e


def read_tensor(folder: Path, files: dict[str, str], key: str) -> torch.Tensor:
    """One stored tensor, from a file opened for it alone.

    safetensors maps the whole file and hands out tensors backed by the mapping; pages a read
    touches stay resident until the file is closed. Opening the file per tensor releases them
    with the tensor, so reading a model tensor by tensor holds one tensor, not one shard.

    Raises:
        ModelError: the tensor is not stored, or its file is corrupt or truncated.
    """
    if key not in files:
        raise ModelError(f"{folder} stores no tensor '{key}' though its config needs it; the folder is incomplete")
    try:
        with safe_open(str(folder / files[key]), framework="pt") as f:
            return f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ModelError(f"the weights file {folder / files[key]} is corrupt or truncated ({e}); re-create or re-copy the folder") from e


def iter_safetensors(folder: Path, files: dict[str, str]):
    """Yield ``(name, tensor)`` one tensor at a time (:func:`read_tensor`), file by file."""
    for key in sorted(files, key=lambda k: files[k]):
        yield key, read_tensor(folder, files, key)


def _materialize_owned(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give adapters and output norms that are still on the meta device real, freshly initialised tensors."""
    for module in model.modules():
        if isinstance(module, LoRALinear) and module.lora_A.device.type == "meta":
            module.lora_A = nn.Parameter(torch.empty(module.lora_A.shape, device=device, dtype=dtype))
            module.lora_B = nn.Parameter(torch.empty(module.lora_B.shape, device=device, dtype=dtype))
            module.reset_lora()
        elif isinstance(module, OutputNorm) and module.weight.device.type == "meta":
            module.weight = nn.Parameter(torch.empty(module.weight.shape, device=device, dtype=dtype))
            if module.bias is not None:  # an RMS output norm has none
                module.bias = nn.Parameter(torch.empty(module.bias.shape, device=device, dtype=dtype))
            module.reset_scale()


def assign_stored(model: PrunextForCausalLM, state: dict[str, torch.Tensor], *, owned_may_be_missing: bool) -> None:
    """Load a native state dict strictly into a model built on the meta device, then re-tie.

    Args:
        model: built under ``init_empty_weights``.
        state: stored tensors (see :func:`stored_state_dict`).
        owned_may_be_missing: when True (building from a plain model), adapters
            and output norms absent from ``state`` are created and initialised;
            otherwise every stored key must be present.

    Raises:
        ModelError: when keys or shapes disagree with the plan.
    """
    expected = set(stored_keys(model.plan, model.state_dict().keys(), model.config.tie_word_embeddings))
    missing = expected - state.keys()
    if owned_may_be_missing:
        from prunext.core.model import is_owned

        missing = {k for k in missing if not is_owned(k)}
    unexpected = state.keys() - expected
    if missing or unexpected:
        raise ModelError(
            "the plan in config.json disagrees with the stored weights "
            f"(missing {sorted(missing)[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {sorted(unexpected)[:3]}{'...' if len(unexpected) > 3 else ''}); "
            "the folder was edited or is from another model"
        )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise ModelError(f"the stored weights do not fit the plan's shapes ({first}); the folder is inconsistent") from e
    some = next(iter(state.values()))
    # over a meta-device source (prune --offload) the new parts are still real, on the CPU
    _materialize_owned(model, torch.device("cpu") if some.is_meta else some.device, some.dtype)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.tie_positions()


def build_from_hf(hf_model: nn.Module, plan: Plan, out_norm_init: float = DEFAULT_OUT_NORM_INIT) -> PrunextForCausalLM:
    """Build the plan's model from a plain HF causal LM of a supported family (or an identity-plan native one).

    Base tensors are taken from ``hf_model`` without copying; adapters start
    at LoRA's usual init (B = 0) and output norms at ``out_norm_init``: callers
    that want another init (SVD, for pruning) set it afterwards.
    """
    base_config = hf_model.config
    if isinstance(hf_model, PrunextForCausalLM):
        # an identity-plan native model has exactly the plain model's keys and blocks
        if not hf_model.plan.is_identity:
            raise PlanError("a new plan is built over a plain model or an identity-plan native model, not over another plan")
        base_config = hf_model.config.base_config()
    config = PrunextConfig.from_base(base_config, plan)
    config.dtype = next(hf_model.parameters()).dtype
    with init_empty_weights(include_buffers=False):
        model = PrunextForCausalLM(config, out_norm_init=out_norm_init)
    state = hf_to_plan(hf_model.state_dict(), plan)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding
    assign_stored(model, state, owned_may_be_missing=True)
    for layer in model.model.layers:
        layer.start_out_norms()  # sandwich and post-norm families: from the gain of the block each runs
    if getattr(hf_model, "generation_config", None) is not None:
        model.generation_config = hf_model.generation_config
    return model.eval()


def _note_stale_code(folder: Path) -> None:
    """Warn when a folder's code files exist but are not what this prunext writes (prunext loads it with its own)."""
    if not any((folder / name).exists() for name in (CONFIG_FILE, MODELING_FILE)):
        return  # written before folders carried their code
    differ = code_differences(folder)
    if differ:
        log.warning(
            "%s: %s differ from what this prunext writes; prunext loads the folder with its own code, but others "
            "(trust_remote_code=True) would run the folder's; `prunext convert --from %s --to NEW` writes current code",
            folder, ", ".join(differ), folder,
        )


def load_native(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    config: PrunextConfig | None = None,
    **hf_kwargs,
) -> PrunextForCausalLM:
    """Load a native folder or hub id through transformers' ``from_pretrained``, in eval mode.

    Args:
        path: a local folder or a hub id.
        dtype: load in this dtype; default the dtype it was saved in (``"auto"``).
        device: where to put the weights when no ``device_map`` is given.
        config: use this config instead of the folder's.
        **hf_kwargs: any other ``from_pretrained`` argument (``revision``, ``device_map``,
            ``attn_implementation``, ...).

    Raises:
        ModelError: the folder is missing, incomplete, corrupt, or its plan disagrees with its weights.
    """
    register()
    folder = Path(path)
    if folder.exists() and not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a prunext model folder (no config.json)")
    if folder.is_dir():
        read_safetensors_keys(folder)  # a missing or truncated weights file, in prunext's words
        _note_stale_code(folder)
    dtype = hf_kwargs.pop("torch_dtype", dtype)
    if "device_map" not in hf_kwargs and str(device) != "cpu":
        hf_kwargs["device_map"] = str(device)
    model = PrunextForCausalLM.from_pretrained(
        str(path), dtype="auto" if dtype is None else dtype, **({"config": config} if config is not None else {}), **hf_kwargs
    )
    return model.eval()
