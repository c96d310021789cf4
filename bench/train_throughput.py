"""ZeRO-3 training throughput: prunext's loop vs Hugging Face ``Trainer``, shared-block vs dense model.

Runs under any launcher, like ``launch/train.py``::

    python bench/train_throughput.py                                  # one process
    torchrun --nproc_per_node 8 bench/train_throughput.py --deepspeed ds_configs/zero3.json --seq-len 2048 --micro-batch 8

Cases, each with the same DeepSpeed config, batch, data and ``--trainable all``,
timed over ``--steps`` optimizer steps after ``--warmup-steps`` untimed ones:

- ``prunext dense``: the model as given (identity plan), prunext's step loop;
- ``prunext shared``: the same depth, but every other position from
  ``--share-from`` on runs the previous position's block (stored once) plus
  its own LoRA (rank hidden/16, all 7 linears) and output norms (FlexiGPT's
  layout after pruning ~30% of the blocks), prunext's step loop;
- ``HF Trainer shared``: the shared model under ``transformers.Trainer`` with
  the same DeepSpeed config (it wraps DeepSpeed through accelerate).

Prints one table (tokens/s per rank-group, ratios) and, with ``--json``, writes it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--data", default="builtin:wiki:train")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config (default: the recipe's default for the device)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per case")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (allocation, hooks, caches)")
    p.add_argument("--share-from", type=int, default=None, help="first shared position (default: 40%% of the depth)")
    p.add_argument("--cases", default="dense,shared,trainer", help="comma-separated subset of dense,shared,trainer")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def shared_plan(depth: int, hidden: int, share_from: int):
    """Same depth; positions share_from+1, share_from+3, ... run the previous position's block + LoRA + norms."""
    from prunext.core.plan import LINEAR_NAMES, Plan, Position

    rank = max(1, hidden // 16)
    positions = []
    for i in range(depth):
        if i > share_from and (i - share_from) % 2 == 1:
            positions.append(Position(i - 1, lora_rank=rank, lora_targets=LINEAR_NAMES, out_norm=True))
        else:
            positions.append(Position(i))
    return Plan(tuple(positions), num_source_blocks=depth)


def load(spec: str, dtype, plan=None):
    """The model (identity plan) or, with ``plan``, the shared-block model built from its tensors."""
    import torch

    from prunext.core.checkpoint import build_from_hf
    from prunext.core.loading import load_model

    model, tokenizer = load_model(spec, dtype=getattr(torch, dtype))
    if plan is not None:
        torch.manual_seed(0)
        model = build_from_hf(model, plan)
    model.config.use_cache = False
    return model.train(), tokenizer


def stored_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def time_prunext(model, ds_config: dict, order, steps: int, warmup: int, rank: int, world: int) -> float:
    """Seconds per optimizer step of prunext's loop (mean over the timed steps)."""
    import deepspeed
    import torch.distributed as dist

    from prunext.train.loop import train_step
    from prunext.train.recipe import make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, {"lr": 1e-5, "weight_decay": 0.0}, ds_config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=dict(ds_config))
    for step in range(warmup):
        train_step(engine, order, step, rank, world)
    dist.barrier()
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        train_step(engine, order, step, rank, world)
    dist.barrier()
    seconds = (time.perf_counter() - start) / steps
    engine.destroy()
    return seconds


def time_trainer(model, ds_config: dict, order, steps: int, warmup: int, out: Path) -> float:
    """Seconds per optimizer step of transformers.Trainer with the same DeepSpeed config and blocks."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Blocks(torch.utils.data.Dataset):
        # The same blocks as prunext's cases (the Trainer samples them in its own order).
        def __init__(self):
            self.ids = [int(i) for s in range(warmup + steps) for i in order.global_blocks(s)]

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            block = order.batch([self.ids[i]])[0]
            return {"input_ids": block, "labels": block}

    class Clock(TrainerCallback):
        def __init__(self):
            self.start = None
            self.seconds = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                torch.distributed.barrier()
                self.start = time.perf_counter()
            elif state.global_step == warmup + steps:
                torch.distributed.barrier()
                self.seconds = (time.perf_counter() - self.start) / steps

    clock = Clock()
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=ds_config["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=ds_config["gradient_accumulation_steps"],
        max_steps=warmup + steps,
        learning_rate=1e-5,
        max_grad_norm=ds_config["gradient_clipping"],
        optim="adamw_torch",
        lr_scheduler_type="constant",
        bf16=ds_config.get("bf16", {}).get("enabled", False),
        deepspeed=dict(ds_config),
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        dataloader_drop_last=True,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[clock])
    trainer.train()
    return clock.seconds


def main(argv=None) -> int:
    import numpy as np
    import torch
    import torch.distributed as dist

    from prunext.data import load_text_dataset
    from prunext.train import dist as pdist
    from prunext.train import dsconfig
    from prunext.train.data import BlockOrder, make_budget, tokenize_to_file
    from prunext.train.trainable import executed_params

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _, _, world = pdist.launcher_world()
    raw = dsconfig.load_config(args.deepspeed) if args.deepspeed else dsconfig.default_config(pdist.on_gpu())
    ds_config = dsconfig.resolve_config(raw, args.micro_batch, args.grad_accum, None, world)
    dtype = dsconfig.config_dtype(ds_config)
    rank, local_rank, world = pdist.init(timeout_s=1800)
    cases = args.cases.split(",")

    # The same blocks for every case: (warmup + steps) global batches of builtin text.
    budget = make_budget((args.steps + args.warmup_steps) * args.seq_len * args.micro_batch * args.grad_accum * world,
                         args.seq_len, args.micro_batch, args.grad_accum, world)
    dense, tokenizer = load(args.model, dtype)
    depth, hidden = dense.config.num_hidden_layers, dense.config.hidden_size
    scratch = Path(tempfile.mkdtemp(prefix="prunext-bench-"))
    tokens_file = scratch / "tokens.npy"
    tokenize_to_file(load_text_dataset(args.data), tokenizer, budget.tokens, tokens_file, dense.config.vocab_size)
    order = BlockOrder(np.load(tokens_file), args.seq_len, budget, seed=0)
    plan = shared_plan(depth, hidden, args.share_from if args.share_from is not None else int(0.4 * depth))

    rows = []

    def record(name, counts, seconds):
        tok_s = budget.tokens_per_step / seconds
        rows.append({"case": name, **counts, "s_per_step": seconds, "tokens_per_s": tok_s})
        if rank == 0:
            log.info("%s: %.3f s/step, %.0f tokens/s", name, seconds, tok_s)

    def counts(model):  # before ZeRO-3 partitions the tensors away
        return {"stored_params": stored_params(model), "executed_params": executed_params(model)}

    if "dense" in cases:
        c = counts(dense)
        record("prunext dense", c, time_prunext(dense, ds_config, order, args.steps, args.warmup_steps, rank, world))
    del dense
    gc.collect()
    if "shared" in cases:
        shared, _ = load(args.model, dtype, plan)
        c = counts(shared)
        record("prunext shared", c, time_prunext(shared, ds_config, order, args.steps, args.warmup_steps, rank, world))
        del shared
        gc.collect()
    if "trainer" in cases:
        # Last: TrainingArguments(deepspeed=...) turns on transformers' global ZeRO-3 mode,
        # which would change how later models are built.
        shared, _ = load(args.model, dtype, plan)
        c = counts(shared)
        record("HF Trainer shared", c, time_trainer(shared, ds_config, order, args.steps, args.warmup_steps, scratch / "trainer"))

    if rank == 0:
        by = {r["case"]: r for r in rows}
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads/rank)"
        print(f"\nZeRO-{dsconfig.zero_stage(ds_config)} {dtype}, {world} rank(s) on {device}; model {args.model}, depth {depth}; "
              f"{budget.tokens_per_step:,} tokens/step (seq {args.seq_len} x micro {args.micro_batch} x accum "
              f"{args.grad_accum} x {world}); {args.steps} timed steps after {args.warmup_steps}; --trainable all")
        print(f"{'case':<20} {'stored params':>14} {'executed params':>16} {'s/step':>8} {'tokens/s':>10}")
        for r in rows:
            print(f"{r['case']:<20} {r['stored_params']:>14,} {r['executed_params']:>16,} {r['s_per_step']:>8.3f} {r['tokens_per_s']:>10,.0f}")
        ratios = {}
        if "prunext shared" in by and "HF Trainer shared" in by:
            ratios["prunext / HF Trainer (shared model)"] = by["prunext shared"]["tokens_per_s"] / by["HF Trainer shared"]["tokens_per_s"]
        if "prunext shared" in by and "prunext dense" in by:
            ratios["shared / dense (prunext)"] = by["prunext shared"]["tokens_per_s"] / by["prunext dense"]["tokens_per_s"]
        for name, value in ratios.items():
            print(f"{name}: {value:.2f}x tokens/s")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "ratios": ratios}, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
