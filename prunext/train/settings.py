"""``prunext train``'s settings: every flag checked and resolved into one frozen object before any work.

:func:`check_args` needs no model and no process group: it reads the flags,
the DeepSpeed config, the model folder's plan and lineage, and opens the data
sets. What it returns, :class:`CheckedRun`, is all the run needs to start; its
:class:`TrainSettings` is logged in full, written to ``OUT/run_config.json``
and compared by ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunext.errors import UserError

DEFAULT_LR = {"replacement": 4e-3, "adapters": 4e-3, "all": 1e-4}  # 4e-3: FlexiGPT's healing lr (arXiv 2501.14713, training setup)
DEFAULT_NORM_OPEN_FACTOR = 10.0
#: Settings a resumed run must share with the run it continues (the data order and schedule depend on them).
RESUME_KEYS = (
    "model", "data", "seq_len", "micro_batch", "grad_accum", "world_size", "seed", "tokens",
    "trainable", "lr", "schedule", "warmup_steps", "min_lr_ratio", "weight_decay",
    "norm_lr", "adapter_lr", "norm_warmup_steps", "adapter_warmup_steps", "loss", "teacher", "kd_weight", "kd_temperature",
    "norm_open_steps", "norm_open_factor", "hidden_weight",
)
#: RESUME_KEYS added after runs were made without them: a missing one means the option was off.
NEW_KEYS = ("norm_open_steps", "norm_open_factor", "hidden_weight")


@dataclass(frozen=True)
class TrainSettings:
    """The resolved settings of one training run (what is logged, recorded and compared on resume)."""

    model: str
    data: str
    out: str
    trainable: str
    tokens: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    world_size: int
    lr: float
    schedule: str
    min_lr_ratio: float
    weight_decay: float
    max_grad_norm: float
    seed: int
    deepspeed_config: str
    dtype: str
    zero_stage: int
    warmup_steps: int
    loss: str
    teacher: str | None
    kd_weight: float
    kd_temperature: float
    hidden_weight: float | None
    norm_lr: float | None
    adapter_lr: float | None
    norm_warmup_steps: int | None
    adapter_warmup_steps: int | None
    norm_open_steps: int | None
    norm_open_factor: float | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunOptions:
    """Flags that shape the run but not its result (free to change on ``--resume``)."""

    save_every: int
    keep_checkpoints: int
    eval_every: int
    eval_data: str
    eval_windows: int
    log_every: int
    report_to: str
    wandb_project: str
    stop_at: int | None
    dist_timeout: float
    grad_checkpointing: bool
    overwrite: bool
    resume: bool


@dataclass(frozen=True)
class CheckedRun:
    """Everything :func:`check_args` resolved: settings, options and what they lead to.

    Attributes:
        settings: the run's settings.
        options: the run's options.
        ds_config: the resolved DeepSpeed config.
        budget: steps and tokens (:class:`prunext.train.data.Budget`).
        dataset: the opened training text.
        resume: the checkpoint state ``--resume`` continues from, or None.
        out_created: whether this run creates ``--out`` (checked on every rank before any makes it).
    """

    settings: TrainSettings
    options: RunOptions
    ds_config: dict
    budget: Any
    dataset: Any
    resume: dict | None
    out_created: bool

    @property
    def out(self) -> Path:
        return Path(self.settings.out)


def resolve_tokens(args: argparse.Namespace) -> int:
    """The requested token budget from --tokens or --token-fraction."""
    from prunext.train.data import parse_tokens
    from prunext.train.lineage import pretrain_tokens_of

    if args.tokens is not None:
        return parse_tokens(args.tokens)
    if not (0 < args.token_fraction <= 1):
        raise UserError(f"--token-fraction {args.token_fraction} must be in (0, 1], e.g. 0.003")
    if args.pretrain_tokens is not None:
        pretrain = parse_tokens(args.pretrain_tokens)
    else:
        pretrain = pretrain_tokens_of(args.model)
        if pretrain is None:
            raise UserError(
                f"--token-fraction needs the base model's pretraining tokens, unknown for '{args.model}'; "
                "give --pretrain-tokens (e.g. 2T) or --tokens"
            )
    return max(1, int(args.token_fraction * pretrain))


def resolve_teacher(args: argparse.Namespace) -> str | None:
    """The teacher model spec for ``--loss kd|lm+kd`` (``--loss auto`` is resolved into ``args.loss``).

    Raises:
        UserError: kd without a teacher to find, ``--teacher`` with ``--loss lm``, or a bad kd weight or temperature.
    """
    from prunext.train.lineage import default_teacher, resolve_auto_loss

    if args.loss == "auto":
        args.loss = resolve_auto_loss(args.model, args.teacher)
    if args.loss == "lm":
        if args.teacher is not None:
            raise UserError("--teacher goes with --loss kd or lm+kd; with --loss lm it means nothing")
        if args.hidden_weight:
            raise UserError("--hidden-weight distils hidden states from a teacher; use it with --loss kd or lm+kd")
        return None
    for flag in ("kd_weight", "kd_temperature"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag.replace('_', '-')} {value} must be a positive number")
    if not (math.isfinite(args.hidden_weight) and args.hidden_weight >= 0):
        raise UserError(f"--hidden-weight {args.hidden_weight} must be a number >= 0 (0 = off)")
    return default_teacher(args.model, args.loss, args.teacher)


def _check_numbers(args: argparse.Namespace) -> None:
    """The flags' own ranges, each refused in one sentence."""
    for flag, low in (("seq_len", 2), ("micro_batch", 1), ("grad_accum", 1), ("eval_windows", 1), ("log_every", 1)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise UserError(f"--{flag.replace('_', '-')} {value} must be at least {low}")
    for flag in ("save_every", "eval_every", "keep_checkpoints"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 0 (0 = off)")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr {args.lr} must be a positive number")
    for flag, value in (("warmup", args.warmup), ("weight-decay", args.weight_decay), ("max-grad-norm", args.max_grad_norm)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{flag} {value} must be a number >= 0")
    for flag in ("norm_lr", "adapter_lr"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag.replace('_', '-')} {value} must be a positive number")
    for flag in ("norm_warmup", "adapter_warmup"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{flag.replace('_', '-')} {value} must be a number >= 0")
    if args.norm_open is not None and not (math.isfinite(args.norm_open) and args.norm_open > 0):
        raise UserError(f"--norm-open {args.norm_open} must be a number > 0 (steps, or a fraction of the steps when < 1)")
    if args.norm_open_factor is not None and args.norm_open is None:
        raise UserError("--norm-open-factor goes with --norm-open; without it it means nothing")
    factor = _norm_open_factor(args)
    if not (math.isfinite(factor) and factor > 1):
        raise UserError(f"--norm-open-factor {factor} must be a number > 1")
    if not (0 <= args.min_lr_ratio <= 1):
        raise UserError(f"--min-lr-ratio {args.min_lr_ratio} must be in [0, 1]")
    if args.dist_timeout <= 0:
        raise UserError(f"--dist-timeout {args.dist_timeout} must be positive (seconds)")
    if args.stop_at is not None and args.stop_at < 1:
        raise UserError(f"--stop-at {args.stop_at} must be a step >= 1")
    if args.pretrain_tokens is not None and args.tokens is not None:
        raise UserError("--pretrain-tokens goes with --token-fraction; with --tokens it means nothing")


def _norm_open_factor(args: argparse.Namespace) -> float:
    return DEFAULT_NORM_OPEN_FACTOR if args.norm_open_factor is None else args.norm_open_factor


def check_args(args: argparse.Namespace, world: int) -> CheckedRun:
    """Every check that needs no model and no process group, in the order a user's mistakes are most likely.

    Raises:
        UserError: the first problem found, in one sentence.
    """
    from prunext.core.checkpoint import read_plan
    from prunext.core.loading import resolve_model_path
    from prunext.data import load_text_dataset
    from prunext.fsutil import check_out_dir
    from prunext.train import checkpoints, dsconfig
    from prunext.train.data import make_budget
    from prunext.train.dist import on_gpu
    from prunext.train.estimate import check_run
    from prunext.train.schedule import warmup_steps
    from prunext.train.trainable import check_plan

    _check_numbers(args)
    if args.deepspeed:
        raw, source = dsconfig.load_config(args.deepspeed), f"--deepspeed {args.deepspeed}"
    else:
        raw, source = dsconfig.default_config(on_gpu()), "the default DeepSpeed config"
    ds_config = dsconfig.resolve_config(raw, args.micro_batch, args.grad_accum, args.max_grad_norm, world, source)

    out = Path(args.out)
    resume_state = None
    if args.resume:
        if args.overwrite:
            raise UserError("--resume continues the run in --out and --overwrite would delete it; give one of them")
        resume_state = checkpoints.latest_state(out / "checkpoints")
        if resume_state is None:
            raise UserError(f"--resume found no complete checkpoint in {out / 'checkpoints'}; run without --resume to start")
    else:
        check_out_dir(out, args.overwrite)

    where = resolve_model_path(args.model)
    plan = read_plan(where) if isinstance(where, Path) and where.is_dir() else None
    check_plan(plan, args.trainable)
    if args.norm_open is not None and not (plan is not None and any(p.out_norm for p in plan.positions)):
        raise UserError(f"--norm-open opens output norms, and {args.model} has none; drop --norm-open")
    tokens = resolve_tokens(args)
    teacher = resolve_teacher(args)
    check_run(args.model, teacher, args.trainable, ds_config, world, source)  # from the configs: no weight is read
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    budget = make_budget(tokens, args.seq_len, micro, accum, world)
    norm_open_steps = None if args.norm_open is None else max(1, warmup_steps(args.norm_open, budget.steps))
    if norm_open_steps is not None and norm_open_steps > budget.steps:
        raise UserError(f"--norm-open {args.norm_open:g} is more than the run's {budget.steps} steps; give at most {budget.steps}, or a fraction")
    # Last, the data sets are opened (streamed, except the small built-in text) and checked, on every rank.
    dataset = load_text_dataset(args.data, streaming=not args.data.startswith("builtin:"))
    if args.eval_every:
        load_text_dataset(args.eval_data, streaming=not args.eval_data.startswith("builtin:"))

    def steps_or_none(warmup: float | None) -> int | None:
        return None if warmup is None else warmup_steps(warmup, budget.steps)

    settings = TrainSettings(
        model=args.model,
        data=args.data,
        out=str(out),
        trainable=args.trainable,
        tokens=tokens,
        seq_len=args.seq_len,
        micro_batch=micro,
        grad_accum=accum,
        world_size=world,
        lr=args.lr if args.lr is not None else DEFAULT_LR[args.trainable],
        schedule=args.schedule,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=ds_config["gradient_clipping"],
        seed=args.seed,
        deepspeed_config=source,
        dtype=dsconfig.config_dtype(ds_config),
        zero_stage=dsconfig.zero_stage(ds_config),
        warmup_steps=warmup_steps(args.warmup, budget.steps),
        loss=args.loss,
        teacher=teacher,
        kd_weight=args.kd_weight,
        kd_temperature=args.kd_temperature,
        hidden_weight=args.hidden_weight or None,
        norm_lr=args.norm_lr,
        adapter_lr=args.adapter_lr,
        norm_warmup_steps=steps_or_none(args.norm_warmup),
        adapter_warmup_steps=steps_or_none(args.adapter_warmup),
        norm_open_steps=norm_open_steps,
        norm_open_factor=None if norm_open_steps is None else _norm_open_factor(args),
    )
    options = RunOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RunOptions)})  # flags of the same names
    if resume_state is not None:
        check_resume(resume_state, settings.as_dict())
    return CheckedRun(settings, options, ds_config, budget, dataset, resume_state, out_created=not out.exists())


def check_resume(state: dict, settings: dict) -> None:
    """Refuse to resume with settings that would change the data order or the schedule."""
    saved = state.get("settings", {})
    for key in RESUME_KEYS:
        # A NEW_KEYS setting missing from a run made before it existed means the option was off (None).
        if (key in saved or key in NEW_KEYS) and saved.get(key) != settings[key]:
            raise UserError(
                f"--resume with {key} = {settings[key]!r}, but the run in --out used {saved.get(key)!r}; "
                "resume with the same settings or start a new --out"
            )
