"""``prunext train``: heal a pruned model or grow an extended one by continued pretraining on DeepSpeed ZeRO-3.

Setup (check every flag and the DeepSpeed config, start the process group,
load the model, freeze what does not train, tokenize the budget once per
node), run (the step loop: metrics, evaluation, checkpoints that are complete
whenever ``latest`` names them), save (gather the ZeRO-3 partitions and write
``OUT/final/`` as a native folder, shared tensors once).

The same code runs under ``torchrun``, the ``deepspeed`` launcher (one or
many nodes) and plain ``python`` (one process); see docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

from prunext.errors import UserError
from prunext.tables import format_table

log = logging.getLogger(__name__)

HELP = "heal or grow a model with DeepSpeed ZeRO-3 continued pretraining (FlexiGPT's healing step)"
EPILOG = """\
examples:
  prunext train --model pruned/ --data builtin:wiki --tokens 2M --seq-len 512 --micro-batch 8 --out run/
  torchrun --nproc_per_node 8 -m prunext train --model pruned/ --data corpus.jsonl --tokens 1B \\
      --deepspeed ds_configs/zero3.json --lr 4e-3 --out run/
  deepspeed --hostfile hostfile launch/train.py --model extended/ --data my/hub-set --token-fraction 0.003 \\
      --trainable all --lr 1e-4 --out /shared/run/        (then the same command with --resume)

budget: --tokens N (50000, 50M, 1B) or --token-fraction F of the base model's pretraining tokens
  (known for builtin:smollm2-135m and models pruned/extended from it; else give --pretrain-tokens).
  steps = floor(tokens / (seq-len x micro-batch x grad-accum x ranks)); whole steps only. Data is
  packed into --seq-len blocks (EOS between documents, no padding, labels = inputs), shuffled by
  --seed, repeated with a new shuffle per epoch when the budget needs more blocks than the data has.

per-group learning rates: the output-norm scales, the LoRA adapters and the base weights are three
  AdamW groups; --norm-lr / --adapter-lr (and --norm-warmup / --adapter-warmup) set a group's peak lr
  and warmup, the rest follow --lr / --warmup. The schedule's shape (--schedule) is shared.
  --norm-open W opens the output norms by schedule: their scales grow by a factor rising from 1 to
  --norm-open-factor (10) over the first W steps, on top of what they learn.

loss: lm trains on the next token; kd distils the logits of --teacher (default: the model the folder
  was pruned/extended from, per its prune/extend report), run on the same batch as a second ZeRO-3
  engine (sharded, no optimizer; about one more forward per step); lm+kd adds both. The default, auto,
  is lm+kd when that report names a source that can be found, else lm (BENCHMARKS.md: lm+kd healed
  better at every measured budget); --loss lm skips the teacher's extra forward.

trainable: replacement (default; adapters + output norms, what prune/extend added), adapters,
  all (everything; a shared block's gradient is the sum over the positions that run it).

outputs: OUT/metrics.jsonl (one line per step), OUT/checkpoints/stepN (DeepSpeed; `latest` names
  the newest complete one), OUT/final/ (native model + tokenizer), OUT/run_config.json,
  OUT/train_summary.json.
"""

DEFAULT_LR = {"replacement": 4e-3, "adapters": 4e-3, "all": 1e-4}  # 4e-3: FlexiGPT's healing lr (DESIGN.md, prune path 6)
ADAM_BETAS = (0.9, 0.95)
DEFAULT_NORM_OPEN_FACTOR = 10.0
ADAM_EPS = 1e-8
#: Settings a resumed run must share with the run it continues (the data order and schedule depend on them).
RESUME_KEYS = (
    "model", "data", "seq_len", "micro_batch", "grad_accum", "world_size", "seed", "tokens",
    "trainable", "lr", "schedule", "warmup_steps", "min_lr_ratio", "weight_decay",
    "norm_lr", "adapter_lr", "norm_warmup_steps", "adapter_warmup_steps", "loss", "teacher", "kd_weight", "kd_temperature",
    "norm_open_steps", "norm_open_factor",
)
#: RESUME_KEYS added after runs were made without them: a missing one means the option was off.
NEW_KEYS = ("norm_open_steps", "norm_open_factor")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prunext.train.objective import LOSSES
    from prunext.train.schedule import SCHEDULES
    from prunext.train.trainable import TRAINABLE

    what = parser.add_argument_group("model and data")
    what.add_argument("--model", required=True, help="model to train: a native folder (prune/extend output), builtin:smollm2-135m, HF folder, .gguf")
    what.add_argument("--data", required=True, help="training text: builtin:wiki, a .txt/.jsonl/.parquet file or folder, a hub data set (streamed)")
    what.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/, final/")
    what.add_argument("--trainable", choices=TRAINABLE, default="replacement", help="what trains (default replacement; see below)")
    budget = parser.add_argument_group("budget and batch")
    size = budget.add_mutually_exclusive_group(required=True)
    size.add_argument("--tokens", help="token budget, e.g. 50M or 1B")
    size.add_argument("--token-fraction", type=float, metavar="F", help="budget as a fraction of the base model's pretraining tokens, e.g. 0.003")
    budget.add_argument("--pretrain-tokens", help="the base model's pretraining tokens, for --token-fraction (e.g. 2T)")
    budget.add_argument("--seq-len", type=int, default=1024, help="tokens per block (default 1024)")
    budget.add_argument("--micro-batch", type=int, default=None, help="blocks per rank per forward (default: the config's, else 1)")
    budget.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default: the config's, else 1)")
    opt = parser.add_argument_group("optimizer and schedule (AdamW, betas 0.9/0.95)")
    opt.add_argument("--lr", type=float, default=None, help="peak learning rate (default 4e-3 for replacement/adapters as in FlexiGPT, 1e-4 for all)")
    opt.add_argument("--norm-lr", type=float, default=None, metavar="LR",
                     help="peak lr of the output-norm scales (default --lr); a larger one lets a small initial scale open quickly")
    opt.add_argument("--adapter-lr", type=float, default=None, metavar="LR", help="peak lr of the LoRA adapters (default --lr)")
    opt.add_argument("--norm-warmup", type=float, default=None, metavar="W", help="warmup of the output-norm group, as --warmup (default --warmup)")
    opt.add_argument("--adapter-warmup", type=float, default=None, metavar="W", help="warmup of the adapter group, as --warmup (default --warmup)")
    opt.add_argument("--norm-open", type=float, default=None, metavar="W",
                     help="open the output norms over the first W steps (a fraction of the steps when < 1): their scales are "
                     "multiplied by a factor rising linearly from 1 to --norm-open-factor, on top of what they learn (default off)")
    opt.add_argument("--norm-open-factor", type=float, default=None, metavar="F", help="the factor --norm-open reaches (default 10)")
    opt.add_argument("--loss", choices=("auto", *LOSSES), default="auto",
                     help="auto (default: lm+kd when the model's prune/extend report names a source to distil from, "
                     "else lm), lm (next-token), kd (logit distillation from --teacher), lm+kd (lm + --kd-weight x kd)")
    opt.add_argument("--teacher", default=None, metavar="MODEL",
                     help="teacher for kd (default: the model --model was pruned or extended from, per its report)")
    opt.add_argument("--kd-weight", type=float, default=1.0, help="weight of the kd term in lm+kd (default 1)")
    opt.add_argument("--kd-temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    opt.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="decay after warmup (default cosine)")
    opt.add_argument("--warmup", type=float, default=0.05, help="warmup steps, or a fraction of the steps when < 1 (default 0.05)")
    opt.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr for cosine/linear (default 0.1)")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    opt.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping, 0 = off (default: the config's, else 1.0)")
    opt.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (non-reentrant) to save memory")
    run = parser.add_argument_group("run")
    run.add_argument("--deepspeed", metavar="CONFIG", help="DeepSpeed config (default: ds_configs/zero3.json settings on GPU, zero3_cpu.json on CPU)")
    run.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps, and at the end (default 500)")
    run.add_argument("--keep-checkpoints", type=int, default=0, help="keep only the newest K checkpoints (default 0 = all)")
    run.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (default 0 = off)")
    run.add_argument("--eval-data", default="builtin:wiki:test", help="held-out text for --eval-every (default builtin:wiki:test)")
    run.add_argument("--eval-windows", type=int, default=16, help="fixed held-out windows of --seq-len (default 16)")
    run.add_argument("--log-every", type=int, default=10, help="a log line every N steps (default 10)")
    run.add_argument("--seed", type=int, default=0, help="data order and adapter init seed (default 0)")
    run.add_argument("--report-to", choices=("none", "wandb"), default="none", help="also log to wandb (offline without WANDB_API_KEY)")
    run.add_argument("--wandb-project", default="prunext", help="wandb project (default prunext)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its newest complete checkpoint")
    run.add_argument("--stop-at", type=int, default=None, metavar="STEP", help="stop after this step with a checkpoint (the schedule stays the full budget's); continue with --resume")
    run.add_argument("--dist-timeout", type=float, default=1800, help="seconds a collective waits for a dead or stuck rank before failing (default 1800)")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


# ------------------------------------------------------------ checking
def _builtin_base(spec: str, hops: int = 5) -> str | None:
    """The built-in model a spec is or was pruned/extended from (via prune/extend reports), or None."""
    from prunext.core.loading import BUILTIN_MODELS, BUILTIN_PREFIX

    for _ in range(hops):
        if spec.startswith(BUILTIN_PREFIX):
            name = spec[len(BUILTIN_PREFIX) :]
            return name if name in BUILTIN_MODELS else None
        folder = Path(spec).expanduser()
        reports = [folder / name for name in ("prune_report.json", "extend_report.json") if (folder / name).is_file()]
        if not reports:
            return None
        try:
            spec = str(json.loads(reports[0].read_text())["model"])
        except (OSError, json.JSONDecodeError, KeyError):
            return None
    return None


def _report_source(model: str) -> str | None:
    """The model a native folder was pruned or extended from, per its report (None: no report)."""
    folder = Path(model).expanduser()
    for name in ("prune_report.json", "extend_report.json"):
        try:
            report = json.loads((folder / name).read_text())
            return str(report.get("model") or report["settings"]["model"])  # extend: top level; prune: settings
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue
    return None


def _findable(spec: str) -> bool:
    """Whether ``spec`` resolves without error (a builtin name, an existing path, a hub id)."""
    from prunext.core.loading import resolve_model_path

    try:
        resolve_model_path(spec)
    except UserError:
        return False
    return True


def resolve_teacher(args: argparse.Namespace) -> str | None:
    """The teacher model spec for ``--loss kd|lm+kd``: ``--teacher``, else the model's source per its report.

    Raises:
        UserError: kd without a teacher to find, or ``--teacher`` with ``--loss lm``.
    """
    from prunext.core.loading import resolve_model_path

    loss = getattr(args, "loss", "lm")
    if loss == "auto":
        found = _report_source(args.model) if getattr(args, "teacher", None) is None else args.teacher
        if found is not None and _findable(found):
            args.loss = loss = "lm+kd"
            log.info("--loss auto: lm+kd, distilling from %s (the model's source; --loss lm to train without it)", found)
        else:
            args.loss = loss = "lm"
            if found is not None:
                log.warning("--loss auto: the source %s named by the model's report is not available; training with lm", found)
    if loss == "lm":
        if getattr(args, "teacher", None) is not None:
            raise UserError("--teacher goes with --loss kd or lm+kd; with --loss lm it means nothing")
        return None
    for flag in ("kd_weight", "kd_temperature"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag.replace('_', '-')} {value} must be a positive number")
    teacher = args.teacher
    if teacher is None:
        teacher = _report_source(args.model)
        if teacher is None:
            raise UserError(f"--loss {loss} needs a teacher and '{args.model}' has no prune/extend report naming its source; give --teacher")
    resolve_model_path(teacher)  # a missing path is refused here, before any work
    return teacher


def resolve_tokens(args: argparse.Namespace) -> int:
    """The requested token budget from --tokens or --token-fraction."""
    from prunext.core.loading import BUILTIN_MODELS
    from prunext.train.data import parse_tokens

    if args.tokens is not None:
        return parse_tokens(args.tokens)
    if not (0 < args.token_fraction <= 1):
        raise UserError(f"--token-fraction {args.token_fraction} must be in (0, 1], e.g. 0.003")
    if args.pretrain_tokens is not None:
        pretrain = parse_tokens(args.pretrain_tokens)
    else:
        base = _builtin_base(args.model)
        if base is None:
            raise UserError(
                f"--token-fraction needs the base model's pretraining tokens, unknown for '{args.model}'; "
                "give --pretrain-tokens (e.g. 2T) or --tokens"
            )
        pretrain = BUILTIN_MODELS[base].pretrain_tokens
    return max(1, int(args.token_fraction * pretrain))


def check_args(args: argparse.Namespace, world: int) -> dict:
    """Every check that needs no model and no process group. Returns the resolved settings.

    Raises:
        UserError: the first problem found, in one sentence.
    """
    from prunext.core.loading import resolve_model_path
    from prunext.data import load_text_dataset
    from prunext.fsutil import check_out_dir
    from prunext.train import checkpoints, dsconfig
    from prunext.train.data import make_budget
    from prunext.train.dist import on_gpu
    from prunext.train.schedule import warmup_steps
    from prunext.core.checkpoint import read_plan
    from prunext.train.trainable import check_plan

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
        value = getattr(args, flag, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag.replace('_', '-')} {value} must be a positive number")
    for flag in ("norm_warmup", "adapter_warmup"):
        value = getattr(args, flag, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{flag.replace('_', '-')} {value} must be a number >= 0")
    norm_open = getattr(args, "norm_open", None)
    if norm_open is not None and not (math.isfinite(norm_open) and norm_open > 0):
        raise UserError(f"--norm-open {norm_open} must be a number > 0 (steps, or a fraction of the steps when < 1)")
    factor = getattr(args, "norm_open_factor", None)
    if factor is not None and norm_open is None:
        raise UserError("--norm-open-factor goes with --norm-open; without it it means nothing")
    factor = DEFAULT_NORM_OPEN_FACTOR if factor is None else factor
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

    gpu = on_gpu()
    if args.deepspeed:
        raw, source = dsconfig.load_config(args.deepspeed), f"--deepspeed {args.deepspeed}"
    else:
        raw, source = dsconfig.default_config(gpu), "the default DeepSpeed config"
    ds_config = dsconfig.resolve_config(raw, args.micro_batch, args.grad_accum, args.max_grad_norm, world, source)

    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    resume_state = None
    if args.resume:
        if args.overwrite:
            raise UserError("--resume continues the run in --out and --overwrite would delete it; give one of them")
        resume_state = checkpoints.latest_state(ckpt_dir)
        if resume_state is None:
            raise UserError(f"--resume found no complete checkpoint in {ckpt_dir}; run without --resume to start")
    else:
        check_out_dir(out, args.overwrite)

    where = resolve_model_path(args.model)
    plan = read_plan(where) if isinstance(where, Path) and where.is_dir() else None
    check_plan(plan, args.trainable)
    if norm_open is not None and not (plan is not None and any(p.out_norm for p in plan.positions)):
        raise UserError(f"--norm-open opens output norms, and {args.model} has none; drop --norm-open")
    tokens = resolve_tokens(args)
    teacher = resolve_teacher(args)
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    budget = make_budget(tokens, args.seq_len, micro, accum, world)
    norm_open_steps = None if norm_open is None else max(1, warmup_steps(norm_open, budget.steps))
    if norm_open_steps is not None and norm_open_steps > budget.steps:
        raise UserError(f"--norm-open {norm_open:g} is more than the run's {budget.steps} steps; give at most {budget.steps}, or a fraction")
    # Last, the data sets are opened (streamed, except the small built-in text) and checked, on every rank.
    dataset = load_text_dataset(args.data, streaming=not args.data.startswith("builtin:"))
    if args.eval_every:
        load_text_dataset(args.eval_data, streaming=not args.eval_data.startswith("builtin:"))
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.trainable]
    settings = {
        "model": args.model,
        "data": args.data,
        "out": str(out),
        "trainable": args.trainable,
        "tokens": tokens,
        "seq_len": args.seq_len,
        "micro_batch": micro,
        "grad_accum": accum,
        "world_size": world,
        "lr": lr,
        "schedule": args.schedule,
        "min_lr_ratio": args.min_lr_ratio,
        "weight_decay": args.weight_decay,
        "max_grad_norm": ds_config["gradient_clipping"],
        "seed": args.seed,
        "deepspeed_config": source,
        "dtype": dsconfig.config_dtype(ds_config),
        "zero_stage": dsconfig.zero_stage(ds_config),
        "warmup_steps": warmup_steps(args.warmup, budget.steps),
        "loss": getattr(args, "loss", "lm"),
        "teacher": teacher,
        "kd_weight": getattr(args, "kd_weight", 1.0),
        "kd_temperature": getattr(args, "kd_temperature", 1.0),
        "norm_lr": getattr(args, "norm_lr", None),
        "adapter_lr": getattr(args, "adapter_lr", None),
        "norm_warmup_steps": None if getattr(args, "norm_warmup", None) is None else warmup_steps(args.norm_warmup, budget.steps),
        "adapter_warmup_steps": None if getattr(args, "adapter_warmup", None) is None else warmup_steps(args.adapter_warmup, budget.steps),
        "norm_open_steps": norm_open_steps,
        "norm_open_factor": None if norm_open_steps is None else factor,
        "_ds_config": ds_config,
        "_budget": budget,
        "_dataset": dataset,
        "_resume": resume_state,
        "_out_created": not out.exists(),  # every rank checks before any makes it (the process group forms after)
    }
    if resume_state is not None:
        check_resume(resume_state, settings)
    return settings


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


# ------------------------------------------------------------ pieces of the run
def group_lrs(settings: dict, groups) -> list[tuple[float, int]]:
    """(peak lr, warm-up steps) of each optimizer group: ``--norm-lr``/``--adapter-lr`` where given, else ``--lr``."""
    out = []
    for g in groups:
        key = {"norms": "norm", "adapters": "adapter"}.get(g)
        lr = settings.get(f"{key}_lr") if key else None
        warmup = settings.get(f"{key}_warmup_steps") if key else None
        out.append((settings["lr"] if lr is None else lr, settings["warmup_steps"] if warmup is None else warmup))
    return out


def make_optimizer(params: list | dict[str, list], settings: dict, ds_config: dict):
    """AdamW over the trainable tensors: DeepSpeed's CPU Adam when optimizer states are offloaded, else torch's.

    ``params``: a list (one group at ``settings["lr"]``) or :func:`prunext.train.trainable.param_groups`'s
    dict, which becomes one parameter group per kind with its own peak lr (see :func:`group_lrs`).
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


def prepare_tokens(dataset, tokenizer, settings: dict, budget, folder: Path, local_rank: int, wait_group):
    """Tokenize the budget once per node (node-local rank 0) into ``folder`` (OUT/data); every rank memory-maps it.

    A file there from an earlier run with the same data, tokenizer and budget is reused (``--resume``).
    """
    import numpy as np

    from prunext.train.data import cache_name, tokenize_to_file
    from prunext.train.dist import all_ok

    path = folder / cache_name(settings["data"], tokenizer, budget.tokens)
    error = None
    if local_rank == 0 and not path.exists():
        try:
            start = time.perf_counter()
            count = tokenize_to_file(dataset, tokenizer, budget.tokens, path, settings["vocab_size"])
            log.info("tokenized %s tokens of %s in %.1f s into %s", f"{count:,}", settings["data"], time.perf_counter() - start, path)
        except Exception as e:  # every rank learns of it, instead of waiting out the timeout
            error = e
    all_ok(error, group=wait_group)
    return np.load(path, mmap_mode="r")


def save_final(engine, tokenizer, folder: Path, rank: int) -> None:
    """Gather every ZeRO-3 partition and write the native folder on rank 0 (shared tensors once)."""
    import deepspeed
    import torch.distributed as dist

    from prunext.core.checkpoint import save_native

    model = engine.module
    model.config.use_cache = True
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if rank == 0:
            save_native(model, folder, tokenizer=tokenizer, overwrite=True)
    dist.barrier()


# ------------------------------------------------------------ the recipe
def run(args: argparse.Namespace) -> int:
    from prunext.train.dist import launcher_world

    _, _, world = launcher_world()
    settings = check_args(args, world)  # before any process group, model or data

    from prunext.train import dist as pdist

    rank, local_rank, world = pdist.init(args.dist_timeout, debug=getattr(args, "debug", False))
    if rank != 0:
        logging.getLogger("prunext").setLevel(logging.WARNING)
    try:
        return train(args, settings, rank, local_rank, world)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def load_for_training(args: argparse.Namespace, settings: dict):
    """The model in the config's dtype with ``--trainable`` applied, its tokenizer, and parameter counts."""
    import torch

    from prunext.core.loading import load_model, require_tokenizer
    from prunext.data import check_tokenizer
    from prunext.train.trainable import executed_params, freeze

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=getattr(torch, settings["dtype"]))
    tokenizer = require_tokenizer(tokenizer, args.model)
    check_tokenizer(tokenizer, model.config.vocab_size, args.model)  # before --out is made or any text is read
    trainable, total = freeze(model, args.trainable)
    counts = {"trainable_params": trainable, "total_params": total, "executed_params": executed_params(model)}
    model.config.use_cache = False
    if args.grad_checkpointing:
        # Reentrant checkpointing fires a shared parameter's gradient hook twice (DeepSpeed #2103).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), tokenizer, counts


def start_engine(model, settings: dict, ds_config: dict, budget, args: argparse.Namespace):
    """``deepspeed.initialize`` on the finished graph: sharing and freezing must not change after this."""
    import deepspeed

    from prunext.train.schedule import make_scheduler
    from prunext.train.trainable import param_groups

    groups = param_groups(model)
    optimizer = make_optimizer(groups, settings, ds_config)
    warmups = [w for _, w in group_lrs(settings, groups)]
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: make_scheduler(opt, budget.steps, warmups, args.schedule, args.min_lr_ratio),
        config=ds_config,
    )
    return engine


def make_objective(settings: dict, ds_config: dict, vocab_size: int):
    """The ``--loss`` objective; for kd the teacher becomes a ZeRO-3 engine without an optimizer (None for lm)."""
    if settings["loss"] == "lm":
        return None
    import deepspeed
    import torch

    from prunext.core.loading import load_model
    from prunext.train.objective import Objective

    teacher, _ = load_model(settings["teacher"], dtype=getattr(torch, settings["dtype"]))
    if teacher.config.vocab_size != vocab_size:
        raise UserError(
            f"--teacher {settings['teacher']} has a vocabulary of {teacher.config.vocab_size} and the model {vocab_size}; "
            "distillation needs the same tokenizer: give the model it was pruned or extended from"
        )
    teacher.config.use_cache = False
    teacher.requires_grad_(False)
    config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    engine, _, _, _ = deepspeed.initialize(model=teacher.eval(), config=config)
    engine.eval()
    return Objective(settings["loss"], engine, settings["kd_weight"], settings["kd_temperature"])


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


def clear_out(out: Path, rank: int, new_data: Path) -> None:
    """``--overwrite``, once the model and data are checked: empty the old run folder but this run's
    tokens (``new_data``, tokenized beside the old run), which then become ``OUT/data``."""
    import torch.distributed as dist

    dist.barrier()  # every rank has memory-mapped the new tokens before they move
    if rank == 0:
        for child in out.iterdir():
            if child.name != new_data.name:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        new_data.rename(out / "data")
    dist.barrier()


def announce(settings: dict, ds_config: dict, budget, order, args: argparse.Namespace, out: Path) -> None:
    """Rank 0: the resolved settings in full, the budget line, and OUT/run_config.json."""
    from prunext.fsutil import write_json_atomic

    print("prunext train settings:\n" + format_table(list(settings.items())), flush=True)
    trainable, total = settings["trainable_params"], settings["total_params"]
    print(
        f"budget: {budget.steps:,} steps x {budget.tokens_per_step:,} tokens/step = {budget.tokens:,} tokens "
        f"(requested {budget.requested:,}); data: {order.n_blocks:,} blocks of {args.seq_len}, "
        f"{order.epochs} epoch(s){' reshuffled each' if order.epochs > 1 else ''}; "
        f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)",
        flush=True,
    )
    log.info("DeepSpeed config: %s", json.dumps(ds_config, sort_keys=True))
    cli = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    write_json_atomic(out / "run_config.json", {"settings": settings, "deepspeed": ds_config, "args": cli})


def train(args: argparse.Namespace, settings: dict, rank: int, local_rank: int, world: int) -> int:
    import torch
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from prunext.fsutil import write_json_atomic
    from prunext.train import checkpoints
    from prunext.train.data import BlockOrder, eval_windows
    from prunext.train.dist import long_wait_group, on_gpu
    from prunext.train.loop import NonFiniteLoss, evaluate, train_step
    from prunext.train.metrics import MetricsLog, Wandb, mfu, peak_flops
    from prunext.train.normopen import gate_at, prepare, set_gate

    out, ckpt_dir = Path(args.out), Path(args.out) / "checkpoints"
    ds_config, budget = settings.pop("_ds_config"), settings.pop("_budget")
    dataset, resume = settings.pop("_dataset"), settings.pop("_resume")
    created_out = settings.pop("_out_created")

    # ---- setup: model, data, engine
    model, tokenizer, counts = load_for_training(args, settings)
    settings.update(counts, vocab_size=model.config.vocab_size, grad_checkpointing=args.grad_checkpointing)
    out.mkdir(parents=True, exist_ok=True)
    # --overwrite tokenizes beside the old run, which is emptied only once the data are accepted
    data_dir = out / (".data-overwrite" if args.overwrite else "data")
    if args.overwrite:
        if rank == 0:
            shutil.rmtree(data_dir, ignore_errors=True)  # left by a run killed here
        dist.barrier()  # before any node writes there
    try:  # the data are read only now: a folder this run made is removed again when they are refused
        tokens = prepare_tokens(dataset, tokenizer, settings, budget, data_dir, local_rank, long_wait_group(max(args.dist_timeout, 6 * 3600)))
        order = BlockOrder(tokens, args.seq_len, budget, args.seed)
        held_out = eval_windows(args.eval_data, tokenizer, args.seq_len, args.eval_windows, model.config.vocab_size) if args.eval_every else None
        open_steps, factor = settings["norm_open_steps"], settings["norm_open_factor"]
        if open_steps:  # on the plain model, before ZeRO-3 partitions it; a resumed run then loads its raw weights
            norms = prepare(model, factor)
            settings["output_norms"] = len(norms)
        engine = start_engine(model, settings, ds_config, budget, args)
        objective = make_objective(settings, ds_config, model.config.vocab_size)  # loads and checks the teacher
    except UserError:
        if rank == 0 and (created_out or args.overwrite):
            shutil.rmtree(out if created_out else data_dir, ignore_errors=True)
        raise
    if args.overwrite:  # only now, with the data, the engine and the teacher accepted
        clear_out(out, rank, data_dir)
    start_step = resume_engine(engine, ckpt_dir, resume, rank) if resume is not None else 0
    settings.update(steps=budget.steps, tokens_per_step=budget.tokens_per_step, tokens_used=budget.tokens,
                    global_batch=budget.global_batch, data_blocks=order.n_blocks, epochs=order.epochs)
    if rank == 0:
        announce(settings, ds_config, budget, order, args, out)

    # ---- run
    peak = peak_flops(torch.cuda.get_device_name() if on_gpu() else "cpu", settings["dtype"])
    metrics = MetricsLog(out / "metrics.jsonl", active=rank == 0, resume_step=start_step if resume else None)
    wandb = Wandb(rank == 0 and args.report_to == "wandb", out, settings, args.wandb_project, resume is not None)
    bar = tqdm(total=budget.steps, initial=start_step, disable=rank != 0, unit="step", dynamic_ncols=True)
    stop = budget.steps if args.stop_at is None else min(args.stop_at, budget.steps)
    started = time.perf_counter()
    last_saved = start_step if resume is not None else None
    state = {"settings": settings}
    step, record = start_step, {}
    if open_steps:
        set_gate(norms, gate_at(step, open_steps, factor))
    try:
        while step < stop:
            t0 = time.perf_counter()
            lrs = engine.get_lr()  # one per optimizer group: norms, adapters, base (those present)
            lr = lrs[-1]
            parts: dict = {}
            loss = train_step(engine, order, step, rank, world, skips_allowed=settings["dtype"] == "float16",
                              objective=objective, parts=parts)
            step += 1
            if open_steps:
                set_gate(norms, gate_at(step, open_steps, factor))
            tok_s = budget.tokens_per_step / (time.perf_counter() - t0)
            grad_norm = engine.get_global_grad_norm()
            record = {
                "step": step,
                "loss": loss,
                "lr": lr,
                **({"group_lrs": lrs} if len(lrs) > 1 else {}),
                **{f"{k}_loss": v for k, v in parts.items()},
                "tokens": step * budget.tokens_per_step,
                "tokens_per_s": tok_s,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "epoch": step * budget.global_batch / order.n_blocks,
                "elapsed_s": time.perf_counter() - started,
                "mfu": mfu(settings["executed_params"], tok_s, peak),
                **({"norm_open": gate_at(step, open_steps, factor) * factor} if open_steps else {}),  # in effect after this step
            }
            if held_out is not None and (step % args.eval_every == 0 or step == budget.steps):
                record["eval_loss"] = evaluate(engine, held_out, settings["micro_batch"], rank, world)
                record["eval_ppl"] = math.exp(min(record["eval_loss"], 50))
            metrics.write(record)
            wandb.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            if rank == 0 and (step % args.log_every == 0 or step == stop):
                extra = f" eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
                extra += f" mfu {record['mfu']:.1%}" if record["mfu"] is not None else ""
                log.info("step %d/%d loss %.4f lr %.3e tokens/s %s%s", step, budget.steps, loss, lr, f"{tok_s:,.0f}", extra)
            if (args.save_every and step % args.save_every == 0) or step == stop:
                state.update(step=step, tokens=step * budget.tokens_per_step)
                checkpoints.save(engine, ckpt_dir, step, state, rank, args.keep_checkpoints)
                last_saved = step
    except NonFiniteLoss as e:
        good = ckpt_dir / checkpoints.tag_of(last_saved) if last_saved else "none (no checkpoint was saved yet)"
        raise NonFiniteLoss(f"{e}; stopped before applying it. Last good checkpoint: {good}; lower --lr and --resume, or restart") from None
    finally:
        bar.close()
        wandb.finish()
    if step < budget.steps:
        if rank == 0:
            print(f"stopped at step {step} of {budget.steps} (--stop-at); continue with --resume (and a later or no --stop-at)", flush=True)
        return 0

    # ---- save
    save_final(engine, tokenizer, out / "final", rank)
    if rank == 0:
        summary = {"steps": budget.steps, "tokens": budget.tokens, "final_loss": record.get("loss"),
                   "final_eval_loss": record.get("eval_loss"), "seconds": time.perf_counter() - started, "settings": settings}
        write_json_atomic(out / "train_summary.json", summary)
        print(f"trained {budget.steps} steps ({budget.tokens:,} tokens); wrote {out / 'final'}", flush=True)
    dist.barrier()
    return 0
