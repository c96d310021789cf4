"""The model, its DeepSpeed ZeRO-3 engine, the optimizer, the teacher, and saving ``final/``.

Build order matters under ZeRO-3: the graph (sharing, adapters, what trains)
is final before ``deepspeed.initialize``, which partitions every
``nn.Parameter`` once; a shared tensor stays one parameter registered in every
position that runs it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from prunext.errors import UserError

log = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def load_for_training(settings, ds_config: dict, grad_checkpointing: bool):
    """The model, partitioned by ZeRO-3 as it loads, with ``--trainable`` applied; its tokenizer; parameter counts.

    Args:
        settings: :class:`prunext.train.settings.TrainSettings`.
        ds_config: the run's DeepSpeed config (:func:`prunext.train.partitioned.load_for_zero3` builds under it).
        grad_checkpointing: recompute activations in backward (non-reentrant).
    """
    import torch

    from prunext.core.loading import require_tokenizer
    from prunext.data import check_tokenizer
    from prunext.train.partitioned import load_for_zero3
    from prunext.train.trainable import executed_params, freeze

    torch.manual_seed(settings.seed)
    model, tokenizer = load_for_zero3(settings.model, ds_config, getattr(torch, settings.dtype))
    tokenizer = require_tokenizer(tokenizer, settings.model)
    check_tokenizer(tokenizer, model.config.vocab_size, settings.model)  # before --out is made or any text is read
    trainable, total = freeze(model, settings.trainable)
    counts = {"trainable_params": trainable, "total_params": total, "executed_params": executed_params(model)}
    model.config.use_cache = False
    if grad_checkpointing:
        # Reentrant checkpointing fires a shared parameter's gradient hook twice (DeepSpeed #2103).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), tokenizer, counts


def group_lrs(settings: Mapping, groups) -> list[tuple[float, int]]:
    """(peak lr, warm-up steps) of each optimizer group: ``--norm-lr``/``--adapter-lr`` where given, else ``--lr``."""
    out = []
    for g in groups:
        key = {"norms": "norm", "adapters": "adapter"}.get(g)
        lr = settings.get(f"{key}_lr") if key else None
        warmup = settings.get(f"{key}_warmup_steps") if key else None
        out.append((settings["lr"] if lr is None else lr, settings["warmup_steps"] if warmup is None else warmup))
    return out


def make_optimizer(params: list | dict[str, list], settings: Mapping, ds_config: dict):
    """AdamW over the trainable tensors: DeepSpeed's CPU Adam when optimizer states are offloaded, else torch's.

    ``params``: a list (one group at ``settings["lr"]``) or :func:`prunext.train.trainable.param_groups`'s
    dict, which becomes one parameter group per kind with its own peak lr (see :func:`group_lrs`).
    ``settings``: :meth:`TrainSettings.as_dict` or any mapping with its optimizer keys.
    """
    import torch

    from prunext.train.dsconfig import offloads_optimizer

    if isinstance(params, dict):
        params = [{"params": ps, "lr": lr, "name": g} for (g, ps), (lr, _) in zip(params.items(), group_lrs(settings, params))]
    kwargs = {"lr": settings["lr"], "betas": ADAM_BETAS, "eps": ADAM_EPS, "weight_decay": settings["weight_decay"]}
    if offloads_optimizer(ds_config):
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
        except Exception as e:  # the op needs a C++ toolchain to JIT-build
            log.warning("DeepSpeedCPUAdam is unavailable (%s); using torch AdamW on the offloaded states (slower)", str(e).splitlines()[0])
            ds_config["zero_force_ds_cpu_optimizer"] = False
    return torch.optim.AdamW(params, **kwargs)


def start_engine(model, settings, ds_config: dict, budget):
    """``deepspeed.initialize`` on the finished graph: sharing and freezing must not change after this."""
    import deepspeed

    from prunext.train.schedule import make_scheduler
    from prunext.train.trainable import param_groups

    recorded = settings.as_dict()
    groups = param_groups(model)
    optimizer = make_optimizer(groups, recorded, ds_config)
    warmups = [w for _, w in group_lrs(recorded, groups)]
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: make_scheduler(opt, budget.steps, warmups, settings.schedule, settings.min_lr_ratio),
        config=ds_config,
    )
    return engine


def make_objective(settings, ds_config: dict, vocab_size: int, plan=None):
    """The ``--loss`` objective; for kd the teacher becomes a ZeRO-3 engine without an optimizer (None for lm).

    ``plan``: the student's plan (None: a plain model), which says the teacher depth each position matches
    for ``--hidden-weight``.
    """
    if settings.loss == "lm":
        return None
    import deepspeed
    import torch

    from prunext.train.objective import Objective
    from prunext.train.partitioned import load_for_zero3

    teacher, _ = load_for_zero3(settings.teacher, ds_config, getattr(torch, settings.dtype))
    if teacher.config.vocab_size != vocab_size:
        raise UserError(
            f"--teacher {settings.teacher} has a vocabulary of {teacher.config.vocab_size} and the model {vocab_size}; "
            "distillation needs the same tokenizer: give the model it was pruned or extended from"
        )
    teacher.config.use_cache = False
    teacher.requires_grad_(False)
    config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    engine, _, _, _ = deepspeed.initialize(model=teacher.eval(), config=config)
    engine.eval()
    targets = None
    if settings.hidden_weight:
        targets = _depth_targets(plan, teacher.config.num_hidden_layers, settings.teacher)
    return Objective(settings.loss, engine, settings.kd_weight, settings.kd_temperature, settings.hidden_weight or 0.0, targets)


def _depth_targets(plan, teacher_blocks: int, teacher: str) -> list[int]:
    """Per student position, the teacher block at the same depth (``--hidden-weight``); refused when there is none."""
    from prunext.prune.reconstruct import targets

    if plan is None or plan.num_source_blocks != teacher_blocks:
        raise UserError(f"--hidden-weight matches the model's positions to the blocks of the model it was pruned from; "
                        f"--teacher {teacher} is not that model: drop --hidden-weight")  # fmt: skip
    return targets(plan, "--hidden-weight")


def resume_engine(engine, ckpt_dir: Path, state: dict, rank: int) -> int:
    """Load the checkpoint ``state`` names; drop newer unfinished ones; return the step it ends at."""
    import torch.distributed as dist

    from prunext.train import checkpoints

    engine.load_checkpoint(str(ckpt_dir), tag=state["tag"])
    step = int(state["step"])
    if rank == 0:
        dropped = checkpoints.drop_newer(ckpt_dir, step)
        note = f"; removed unfinished later checkpoints {dropped}" if dropped else ""
        log.info("resuming from %s (step %d)%s", ckpt_dir / state["tag"], step, note)
    dist.barrier()
    return step


def save_final(engine, tokenizer, ckpt_dir: Path, tag: str, folder: Path, rank: int, wait_group=None) -> None:
    """Write ``OUT/final/`` (native, shared tensors once) from the run's last checkpoint, without gathering the model.

    Rank 0 streams the checkpoint's fp32 master partitions into safetensors shards with the
    same code as ``prunext convert --from OUT/checkpoints`` (:func:`prunext.convert.zero.convert_zero_checkpoint`):
    peak extra memory about one tensor (plus the mapped checkpoint pages), on one rank, whatever the model's size. The
    config (with the plan), tokenizer and generation config come from the model being trained, so
    a run started from a hub id or a GGUF file converts too. Every rank learns of a failure.

    Args:
        engine: the DeepSpeed engine (its module gives the config; no parameter is gathered).
        tokenizer: the run's tokenizer.
        ckpt_dir: ``OUT/checkpoints``; ``tag`` must be complete there (the last step's checkpoint).
        folder: ``OUT/final``, replaced atomically.
        rank: global rank.
        wait_group: the process group to wait in (rank 0 may convert for a long time).
    """
    import tempfile

    from prunext.convert.zero import convert_zero_checkpoint
    from prunext.fsutil import atomic_dir
    from prunext.train.dist import all_ok

    error = None
    if rank == 0:
        try:
            model = engine.module
            model.config.use_cache = True
            with tempfile.TemporaryDirectory(prefix=".final-source-", dir=folder.parent) as source:
                model.config.architectures = [type(model).__name__]
                model.config.save_pretrained(source)  # the config and plan only: no weight is written here
                if model.generation_config is not None and model.can_generate():
                    model.generation_config.save_pretrained(source)
                if tokenizer is not None:
                    tokenizer.save_pretrained(source)
                with atomic_dir(folder, overwrite=True) as tmp:
                    done = convert_zero_checkpoint(ckpt_dir, tmp, tag=tag, model=source)
            log.info("wrote %s from %s (%s parameters stored, fp32 masters)", folder, done["tag_dir"], f"{done['params']:,}")
        except Exception as e:  # the others must not wait out the timeout
            error = e
    all_ok(error, group=wait_group)
