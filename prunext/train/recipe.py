"""``prunext train``: heal a pruned model or grow an extended one by continued pretraining on DeepSpeed ZeRO-3.

Setup (check every flag and the DeepSpeed config into frozen settings, start
the process group, load the model, freeze what does not train, tokenize the
budget once per node, start the engines), run (the step loop: metrics,
evaluation, checkpoints that are complete whenever ``latest`` names them), save
(stream the last checkpoint's partitions into ``OUT/final/``, a native folder
with shared tensors once; no rank gathers the model). :func:`train` reads top to bottom; the pieces live in
:mod:`~prunext.train.settings` (flags), :mod:`~prunext.train.lineage`
(budget fraction and teacher), :mod:`~prunext.train.engine` (model, engines,
optimizer, saving) and :mod:`~prunext.train.loop` (the steps).

The same code runs under ``torchrun``, the ``deepspeed`` launcher (one or
many nodes) and plain ``python`` (one process); see docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from prunext.errors import UserError
from prunext.tables import format_table
from prunext.train.engine import group_lrs, make_optimizer  # noqa: F401  (part of the train API)
from prunext.train.settings import CheckedRun, check_args, resolve_teacher, resolve_tokens  # noqa: F401

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
    opt.add_argument("--kd-weight", type=float, default=2.0, help="weight of the kd term in lm+kd (default 2, the measured best)")
    opt.add_argument("--kd-temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    opt.add_argument("--hidden-weight", type=float, default=0.0, metavar="W",
                     help="with kd or lm+kd: add W x the mean relative squared error between each position's output and "
                     "the teacher's state at the same depth (default 0: off)")
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



def run(args: argparse.Namespace) -> int:
    from prunext.train import dist as pdist

    _, _, world = pdist.launcher_world()
    checked = check_args(args, world)  # before any process group, model or data
    rank, local_rank, world = pdist.init(checked.options.dist_timeout, debug=getattr(args, "debug", False))
    if rank != 0:
        logging.getLogger("prunext").setLevel(logging.WARNING)
    try:
        return train(checked, rank, local_rank, world, cli=vars(args))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def train(run: CheckedRun, rank: int, local_rank: int, world: int, cli: dict) -> int:
    """Setup, run, save: one training run on every rank."""
    import torch.distributed as dist

    from prunext.fsutil import write_json_atomic
    from prunext.train.checkpoints import tag_of
    from prunext.train.data import BlockOrder, eval_windows, prepare_tokens
    from prunext.train.dist import long_wait_group
    from prunext.train.engine import load_for_training, make_objective, resume_engine, save_final, start_engine
    from prunext.train.loop import run_steps
    from prunext.train.metrics import MemoryStages, memory_record
    from prunext.train.normopen import prepare

    settings, options, budget, out = run.settings, run.options, run.budget, run.out
    memory_stages = MemoryStages()  # resident MiB at each stage, and each stage's peak; libraries loaded at the start
    long_wait = long_wait_group(max(options.dist_timeout, 6 * 3600))  # tokenizing, writing final/: one rank works

    # ---- setup: model, data, engines
    model, tokenizer, counts = load_for_training(settings, run.ds_config, options.grad_checkpointing)
    memory_stages.mark("model_loaded")
    vocab = model.config.vocab_size
    facts = {**settings.as_dict(), **counts, "vocab_size": vocab, "grad_checkpointing": options.grad_checkpointing}
    out.mkdir(parents=True, exist_ok=True)
    data_dir = overwrite_staging(out, rank) if options.overwrite else out / "data"
    try:  # the data are read only now: a folder this run made is removed again when they are refused
        tokens = prepare_tokens(run.dataset, tokenizer, settings.data, vocab, budget, data_dir, local_rank, long_wait)
        order = BlockOrder(tokens, settings.seq_len, budget, settings.seed)
        held_out = (eval_windows(options.eval_data, tokenizer, settings.seq_len, options.eval_windows, vocab)
                    if options.eval_every else None)
        norms = None
        if settings.norm_open_steps:  # on the plain model, before ZeRO-3 partitions it; a resumed run then loads its raw weights
            norms = prepare(model, settings.norm_open_factor)
            facts["output_norms"] = len(norms)
        engine = start_engine(model, settings, run.ds_config, budget)
        objective = make_objective(settings, run.ds_config, vocab, getattr(model, "plan", None))  # loads and checks the teacher
        memory_stages.mark("engines_started")
    except UserError:
        if rank == 0 and (run.out_created or options.overwrite):
            shutil.rmtree(out if run.out_created else data_dir, ignore_errors=True)
        raise
    if options.overwrite:  # only now, with the data, the engine and the teacher accepted
        clear_out(out, rank, data_dir)
    start_step = resume_engine(engine, out / "checkpoints", run.resume, rank) if run.resume is not None else 0
    facts.update(steps=budget.steps, tokens_per_step=budget.tokens_per_step, tokens_used=budget.tokens,
                 global_batch=budget.global_batch, data_blocks=order.n_blocks, epochs=order.epochs)
    if rank == 0:
        announce(facts, run, order, cli)

    # ---- run
    started = time.perf_counter()
    step, record = run_steps(engine, order, run, start_step, rank, world, objective=objective, held_out=held_out,
                             norms=norms, facts=facts, out=out, executed_params=counts["executed_params"])
    memory_stages.mark("trained")
    if step < budget.steps:
        if rank == 0:
            print(f"stopped at step {step} of {budget.steps} (--stop-at); continue with --resume (and a later or no --stop-at)", flush=True)
        return 0

    # ---- save
    save_final(engine, tokenizer, out / "checkpoints", tag_of(step), out / "final", rank, long_wait)
    memory_stages.mark("saved")
    memory = [None] * world
    dist.all_gather_object(memory, memory_record(rank, memory_stages))
    if rank == 0:
        worst = max(memory, key=lambda m: m["rss_peak_mb"] - m["rss_start_mb"])
        log.info("peak host memory above the start: %.0f MiB on rank %d (of %d ranks)", worst["rss_peak_mb"] - worst["rss_start_mb"], worst["rank"], world)
        summary = {"steps": budget.steps, "tokens": budget.tokens, "final_loss": record.get("loss"),
                   "final_eval_loss": record.get("eval_loss"), "seconds": time.perf_counter() - started,
                   "memory": memory, "settings": facts}
        write_json_atomic(out / "train_summary.json", summary)
        print(f"trained {budget.steps} steps ({budget.tokens:,} tokens); wrote {out / 'final'}", flush=True)
    dist.barrier()
    return 0


# ------------------------------------------------------------ pieces of the run
def overwrite_staging(out: Path, rank: int) -> Path:
    """``--overwrite`` tokenizes beside the old run, which is emptied only once the data are accepted."""
    import torch.distributed as dist

    staging = out / ".data-overwrite"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed here
    dist.barrier()  # before any node writes there
    return staging


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


def announce(facts: dict, run: CheckedRun, order, cli: dict) -> None:
    """Rank 0: the resolved settings in full, the budget line, and OUT/run_config.json."""
    from prunext.fsutil import write_json_atomic

    budget = run.budget
    options = {f"option:{k}": v for k, v in vars(run.options).items()}
    print("prunext train settings:\n" + format_table(list({**facts, **options}.items())), flush=True)
    trainable, total = facts["trainable_params"], facts["total_params"]
    print(
        f"budget: {budget.steps:,} steps x {budget.tokens_per_step:,} tokens/step = {budget.tokens:,} tokens "
        f"(requested {budget.requested:,}); data: {order.n_blocks:,} blocks of {run.settings.seq_len}, "
        f"{order.epochs} epoch(s){' reshuffled each' if order.epochs > 1 else ''}; "
        f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)",
        flush=True,
    )
    log.info("DeepSpeed config: %s", json.dumps(run.ds_config, sort_keys=True))
    args = {k: v for k, v in cli.items() if not k.startswith("_")}
    write_json_atomic(run.out / "run_config.json", {"settings": facts, "deepspeed": run.ds_config, "args": args})
