"""DeepSpeed configs: read (JSON with comments, as DeepSpeed reads hjson), check against the CLI, fill.

The recipe owns what the command line says (batch sizes, clipping, optimizer,
schedule); the config owns how DeepSpeed runs (ZeRO stage, precision,
offload, communication overlap). A value given in both places must agree:
a config that says ``train_micro_batch_size_per_gpu: 8`` with
``--micro-batch 4`` is refused rather than silently overridden. HF-style
``"auto"`` values count as unset.

Shipped configs live in ``ds_configs/`` at the repository root; the defaults
below are the same settings, used when ``--deepspeed`` is not given, so an
installed package needs no repository checkout.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from prunext.errors import UserError

#: ``ds_configs/zero3.json``: bf16 ZeRO-3 for GPUs.
ZERO3_GPU: dict = {
    "bf16": {"enabled": True},
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 50_000_000,
        "stage3_prefetch_bucket_size": 50_000_000,
        "stage3_param_persistence_threshold": 100_000,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}

#: ``ds_configs/zero3_cpu.json``: fp32 ZeRO-3 for CPU runs and the tests (gloo).
ZERO3_CPU: dict = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}

#: Keys the recipe fills from the command line.
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
#: Sections the recipe owns: AdamW from --lr/--weight-decay, the schedule from --schedule/--warmup.
RECIPE_SECTIONS = ("optimizer", "scheduler")


def _no_duplicates(pairs: list[tuple]) -> dict:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate key {dupes[0]!r}")
    return dict(pairs)


def load_config(path: str | Path) -> dict:
    """Read a DeepSpeed config file: JSON, comments allowed (DeepSpeed itself parses hjson).

    Raises:
        UserError: the file is missing, not JSON/hjson, has duplicate keys, or is not an object.
    """
    import hjson

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--deepspeed {path} does not exist; give a DeepSpeed config file such as ds_configs/zero3.json")
    try:
        data = hjson.loads(path.read_text(), object_pairs_hook=_no_duplicates)
    except (hjson.HjsonDecodeError, ValueError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--deepspeed {path} is not valid JSON/hjson ({first}); fix the file") from e
    if not isinstance(data, dict):
        raise UserError(f"--deepspeed {path} must hold a JSON object ({{...}}); fix the file")
    return json.loads(json.dumps(data))  # plain dicts, no OrderedDict


def default_config(on_gpu: bool) -> dict:
    """The shipped config for the device: bf16 ZeRO-3 on GPUs, fp32 ZeRO-3 on CPU."""
    return copy.deepcopy(ZERO3_GPU if on_gpu else ZERO3_CPU)


def _given(config: dict, key: str):
    value = config.get(key)
    return None if value == "auto" else value


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"the DeepSpeed config's {key} is {value!r}; it must be a positive integer or be left out")
    return value


def resolve_config(
    config: dict,
    micro_batch: int | None,
    grad_accum: int | None,
    max_grad_norm: float | None,
    world_size: int,
    source: str = "the DeepSpeed config",
) -> dict:
    """Fill batch sizes and clipping from the CLI; refuse what contradicts it.

    Args:
        config: as read by :func:`load_config` (not modified).
        micro_batch: ``--micro-batch`` or None (then the config's value, else 1).
        grad_accum: ``--grad-accum`` or None (then the config's value, else 1).
        max_grad_norm: ``--max-grad-norm`` or None (then the config's value, else 1.0; 0 = off).
        world_size: data-parallel ranks.
        source: how to name the config in messages.

    Returns:
        A new dict ready for ``deepspeed.initialize``.

    Raises:
        UserError: on a contradiction or an unsupported section.
    """
    config = copy.deepcopy(config)
    for section in RECIPE_SECTIONS:
        if section in config:
            raise UserError(
                f"{source} has an '{section}' section; remove it: prunext sets AdamW from --lr/--weight-decay "
                "and the schedule from --schedule/--warmup"
            )
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{source} sets zero_optimization.stage {stage!r}; use 0, 1, 2 or 3 (3 is what prunext is built for)")
    if config.get("bf16", {}).get("enabled") is True and config.get("fp16", {}).get("enabled") is True:
        raise UserError(f"{source} enables both bf16 and fp16; enable one")

    values = {}
    for key, flag, given in (
        ("train_micro_batch_size_per_gpu", "--micro-batch", micro_batch),
        ("gradient_accumulation_steps", "--grad-accum", grad_accum),
    ):
        in_config = _given(config, key)
        if in_config is not None:
            in_config = _positive_int(in_config, key)
        if given is not None and in_config is not None and given != in_config:
            raise UserError(f"{flag} {given} contradicts {source}'s {key} {in_config}; give one or make them equal")
        values[key] = given if given is not None else (in_config if in_config is not None else 1)
    micro, accum = values["train_micro_batch_size_per_gpu"], values["gradient_accumulation_steps"]
    global_batch = micro * accum * world_size
    train_batch = _given(config, "train_batch_size")
    if train_batch is not None and train_batch != global_batch:
        raise UserError(
            f"{source}'s train_batch_size {train_batch} is not micro-batch {micro} x grad-accum {accum} x "
            f"{world_size} ranks = {global_batch}; remove train_batch_size or make them agree"
        )
    clip_config = _given(config, "gradient_clipping")
    if clip_config is not None and (isinstance(clip_config, bool) or not isinstance(clip_config, (int, float)) or clip_config < 0):
        raise UserError(f"{source}'s gradient_clipping is {clip_config!r}; it must be a number >= 0")
    if max_grad_norm is not None and clip_config is not None and float(max_grad_norm) != float(clip_config):
        raise UserError(f"--max-grad-norm {max_grad_norm} contradicts {source}'s gradient_clipping {clip_config}; give one")
    clip = max_grad_norm if max_grad_norm is not None else (clip_config if clip_config is not None else 1.0)

    config.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accum,
        train_batch_size=global_batch,
        gradient_clipping=float(clip),
    )
    # The optimizer is a client torch.optim.AdamW (or DeepSpeedCPUAdam with offload), see the recipe.
    config.setdefault("zero_allow_untested_optimizer", True)
    # DeepSpeed's own step printing would interleave with the progress bar; the recipe logs steps.
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


def config_dtype(config: dict) -> str:
    """The training dtype a config asks for: "bfloat16", "float16" or "float32"."""
    if config.get("bf16", {}).get("enabled") is True:
        return "bfloat16"
    if config.get("fp16", {}).get("enabled") is True:
        return "float16"
    return "float32"


def offloads_optimizer(config: dict) -> bool:
    """True when the config moves optimizer states to CPU/NVMe (DeepSpeed then wants its CPU Adam)."""
    device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))
