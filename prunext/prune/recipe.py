"""``prunext prune``: remove transformer blocks by importance (FlexiGPT and the depth-pruning baselines).

Setup (check every flag, load the model and its sizes, work out how many
blocks the ratio prunes), run (score the blocks on calibration text, decide
what goes and what replaces it, build the model), save (rank 0 only: native
folder + ``prune_report.json`` + plots, atomically).

Under ``torchrun --nproc_per_node N`` the calibration windows are split over
the ranks and the scores all-reduced (:mod:`prunext.prune.importance`); every
rank then makes the same decision, and rank 0 writes.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time

from prunext.core.model import DEFAULT_OUT_NORM_INIT
from prunext.errors import UserError
from prunext.prune.ratio import METHODS
from prunext.prune.reconstruct import DEFAULT_LR as RECONSTRUCT_LR
from prunext.prune.reconstruct import DEFAULT_TOKENS as RECONSTRUCT_TOKENS
from prunext.prune.replace import SOLVERS

log = logging.getLogger(__name__)

HELP = "prune transformer blocks: FlexiGPT (weight-shared replacements + SVD-initialised LoRA) or a depth baseline"
EPILOG = f"""\
examples:
  prunext prune --model builtin:smollm2-135m --ratio 0.3 --out smol-30/
  prunext prune --model builtin:smollm2-135m --ratio 0.3 --kept-lora 0 --out smol-30-paper/   # pure replacement
  prunext prune --model llama-2-7b/ --ratio 0.3 --method shortgpt-lora --offload --out l2-30-short-lora/
  torchrun --nproc_per_node 4 -m prunext prune --model llama-2-7b/ --ratio 0.4 --calib-tokens 262144 --out l2-40/

methods (L blocks; r = --ratio; see docs/method.md "The prune path"):
  flexigpt       drop the k lowest-Block-Influence blocks; each pruned position is REPLACED IN
                 PLACE by the kept block j minimising sum over the 7 linears of
                 ||W^_i - (W^_j + SVD_ra(W^_i - W^_j))||_F^2 (W^ = rank --filter-rank
                 reconstruction), whose weights it shares (stored once), plus its own LoRA
                 (rank --adapter-rank, init = truncated SVD of W_i - W_j) and output norms.
                 Same depth, fewer stored blocks. By default a hybrid: half of that adapter rank
                 moves to LoRA (B = 0) on the kept blocks, same adapter parameters in total
                 (--kept-lora 0.5; it healed faster at every measured budget; --kept-lora 0 is
                 the paper's pure replacement).
  shortgpt       drop the k lowest-BI blocks (Men et al. 2024).
  shortgpt-lora  drop the lowest-BI blocks, then LoRA (B = 0) on every kept block, at the rank
                 that spends the adapter parameters flexigpt would add at the same ratio.
  streamline     replace the n-block window with the highest input/output cosine by ONE block
                 initialised from the window's first block, to be trained (LLM-Streamline).
  angular        drop the n-block window with the lowest angular distance (Gromov et al. 2024).

which blocks (flexigpt, shortgpt, shortgpt-lora; --importance): bi, ShortGPT's Block Influence
  (one pass); bi-iterative, BI recomputed after each removal (one pass per pruned block);
  ppl, Shortened LLaMA's calibration loss with each block skipped (one pass per block, over
  the first 4096 calibration tokens); best, whichever of the three leaves the lowest
  calibration loss with its blocks skipped together (one-shot ppl can pick a set that is
  poor together; all three on the first 4096 calibration tokens).

local reconstruction (--reconstruct-epochs E, flexigpt and shortgpt-lora): after building,
  each position's adapters and output norms are fitted, position by position, so that its
  output matches the source's state at the same depth on the pruned model's own inputs
  (no backward through the whole model). It costs about --reconstruct-tokens x (E + 1)
  healing tokens, reported in prune_report.json.

how many blocks: --ratio is the NET fraction of block parameters removed, adapters and
  norms counted; the smallest count whose net removal is at least r is used, for every
  method (shortgpt-lora's adapters count too). Both fractions are reported:
  of block parameters and of all parameters (embeddings included).

defaults (the paper's, scaled to the hidden size): --adapter-rank and --filter-rank
  hidden/16 (FlexiGPT uses 256 at hidden 4096), output norms with initial scale
  {DEFAULT_OUT_NORM_INIT:g} (0: the model starts exactly as the block-dropped one; 'fit': least
  squares against each pruned block's own output), calibration
  32768 tokens of builtin:wiki:train in windows of 512 (our choice: on SmolLM2-135M at
  30%, 4096 and 32768 tokens agree on 10 of the 11 blocks; more tokens, steadier scores).

models larger than memory: --offload never loads the model. Scoring runs one block at a
  time on --device; matching and the SVD start read one weight at a time; the pruned
  model is built on the meta device and saved one tensor at a time, read from the
  source's shards. Peak host memory: about one block plus the embedding and the
  calibration activations (0.25x of a 1.3 GB model, BENCHMARKS.md). Same result as
  without it, tensor for tensor; --out-norm-init fit needs the whole model and is refused.

speed: the distances and SVD init are many small float64 eigendecompositions on --device;
  on a CPU shared with other jobs, OMP_NUM_THREADS=1 or OMP_WAIT_POLICY=PASSIVE keeps OpenMP
  from spin-waiting (several times faster there). --svd-solver randomized is 1.8-3x faster
  (float32, randomized) but may pick differently where two kept blocks are within ~1% (1
  of 11 picks on SmolLM2-135M at 30%). Under torchrun the scoring windows, the distance
  rows and the SVD starts are split over the ranks; every rank ends with the same result.

outputs: DIR (native model + tokenizer), DIR/prune_report.json, DIR/importance.png,
  DIR/distances.png (flexigpt).
"""

DTYPES = ("float32", "bfloat16", "float16")
#: Flags that only flexigpt uses (the ablation switches and its replacement parts).
#: ``--kept-lora`` default: the hybrid healed faster than pure replacement at every measured budget (BENCHMARKS.md).
DEFAULT_KEPT_LORA = 0.5
#: Methods whose adapters ``--reconstruct-epochs`` fits, and its default (0 = off).
RECONSTRUCTS = ("flexigpt", "shortgpt-lora")
#: ``--importance``: how the per-block methods choose blocks (:mod:`prunext.prune.importance`).
CRITERIA = ("bi", "bi-iterative", "ppl", "best")
#: Methods that choose blocks one by one (``--importance``), and its default.
PER_BLOCK = ("flexigpt", "shortgpt", "shortgpt-lora")
#: flexigpt's default is the measured best (BENCHMARKS.md "Healing recipe, second round"); the baselines
#: choose as their authors do (ShortGPT: Block Influence).
DEFAULT_IMPORTANCE = {"flexigpt": "best", "shortgpt": "bi", "shortgpt-lora": "bi"}
#: ``--importance ppl`` runs the whole model once per block: on the first this many calibration tokens.
PPL_TOKENS = 4096
DEFAULT_RECONSTRUCT_EPOCHS = 0
FLEXIGPT_ONLY = ("filter_rank", "out_norm", "out_norm_init", "no_filter", "no_svd_init", "kept_lora", "svd_solver")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="source model: builtin:smollm2-135m, HF or native folder, .gguf, hub id")
    parser.add_argument("--ratio", type=float, required=True, help="net fraction of block parameters to remove, in (0, 1), e.g. 0.3")
    parser.add_argument("--out", required=True, help="output folder (native model + prune_report.json + plots)")
    parser.add_argument("--method", choices=METHODS, default="flexigpt", help="how to prune (default flexigpt; see below)")
    parser.add_argument("--calib", default="builtin:wiki:train", help="calibration text (default builtin:wiki:train)")
    parser.add_argument("--calib-tokens", type=int, default=32768, metavar="N", help="calibration tokens (default 32768)")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration window length in tokens (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass when scoring (default 8)")
    parser.add_argument("--device", default="cpu", help="where scoring runs: cpu, cuda, cuda:1 (default cpu; torchrun ranks use cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="load, score and save in this dtype (default float32)")
    parser.add_argument(
        "--adapter-rank", type=int, default=None, help="flexigpt: LoRA rank r_a per replacement; shortgpt-lora: sets its budget (default hidden/16)"
    )
    parser.add_argument("--filter-rank", type=int, default=None, help="flexigpt: rank k of the low-rank filtering in the distance (default hidden/16)")
    parser.add_argument("--out-norm", choices=("layernorm", "none"), default=None, help="flexigpt: output feature normalization on replacements (default layernorm)")
    parser.add_argument(
        "--out-norm-init", type=_norm_init, default=None, metavar="{fit,SCALE}",
        help=f"flexigpt: start of the output norms: a scale (default {DEFAULT_OUT_NORM_INIT:g}, as the paper) or 'fit' "
        "(least squares against each pruned block's own output on the calibration windows)",
    )
    parser.add_argument(
        "--kept-lora", type=float, default=None, metavar="F",
        help="flexigpt: move fraction F of the adapter rank from the replacements to LoRA on the kept blocks, "
        f"same adapter parameters in total (default {DEFAULT_KEPT_LORA:g}, the measured best; 0 = the paper's pure replacement)",
    )
    parser.add_argument("--no-filter", action="store_true", default=None, help="flexigpt ablation: distance on raw weights (no low-rank filtering)")
    parser.add_argument("--no-svd-init", action="store_true", default=None, help="flexigpt ablation: adapters at LoRA's usual init (B = 0)")
    parser.add_argument(
        "--offload", action="store_true",
        help="prune a model larger than memory: score, match, initialise and save reading one tensor at a time from disk (model folders only)",
    )
    parser.add_argument(
        "--svd-solver", choices=SOLVERS, default=None,
        help="flexigpt: how the matching and SVD start compute top singular vectors: exact (float64, default) or "
        "randomized (float32 torch.svd_lowrank on --device; faster for large weights on a GPU)",
    )
    parser.add_argument(
        "--importance", choices=CRITERIA, default=None,
        help=f"flexigpt, shortgpt, shortgpt-lora: how blocks are chosen: bi (one pass), bi-iterative (BI "
        f"recomputed after each removal) or ppl (calibration loss with each block skipped; one pass per block) "
        "(default: best for flexigpt, the measured best, or bi with --offload; bi, as their authors, for shortgpt and shortgpt-lora)",
    )
    parser.add_argument(
        "--reconstruct-epochs", type=int, default=None, metavar="E",
        help="flexigpt, shortgpt-lora: after building, fit each position's adapters and output norms to the source "
        "model's state at the same depth, position by position, E passes over --reconstruct-tokens (default 0: off)",
    )
    parser.add_argument(
        "--reconstruct-tokens", type=int, default=None, metavar="N",
        help=f"calibration tokens the reconstruction fits on, the first of --calib-tokens (default {RECONSTRUCT_TOKENS})",
    )
    parser.add_argument("--reconstruct-lr", type=float, default=None, help=f"peak Adam lr of the reconstruction (default {RECONSTRUCT_LR:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed for adapter A matrices that are not SVD-initialised (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


# ------------------------------------------------------------ checking
def _norm_init(text: str) -> float | str:
    """``--out-norm-init``: ``fit`` or a number."""
    if text.strip().lower() == "fit":
        return "fit"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither 'fit' nor a number (e.g. 0.01)") from None


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model; fills in flexigpt's switches. Raises UserError."""
    from prunext.fsutil import check_out_dir
    from prunext.prune.ratio import check_ratio

    check_ratio(args.ratio)
    if args.method != "flexigpt":
        given = [f for f in FLEXIGPT_ONLY if getattr(args, f) is not None]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} applies to --method flexigpt only")
        if args.adapter_rank is not None and args.method != "shortgpt-lora":
            raise UserError(f"--adapter-rank applies to flexigpt and shortgpt-lora; {args.method} adds no adapters")
    if args.no_filter and args.filter_rank is not None:
        raise UserError("--no-filter and --filter-rank contradict each other; give one")
    for flag in ("calib_tokens", "seq_len", "batch_size", "adapter_rank", "filter_rank"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value} must be a positive integer")
    if args.seq_len > args.calib_tokens:
        raise UserError(f"--calib-tokens {args.calib_tokens} is less than one window of --seq-len {args.seq_len}; give more tokens")
    if args.out_norm_init == "fit" and args.out_norm == "none":
        raise UserError("--out-norm-init fit needs output norms; drop --out-norm none")
    if args.out_norm_init == "fit" and args.offload:
        raise UserError("--out-norm-init fit runs the whole model forward, which --offload avoids; give a scale (e.g. 0.01) or drop --offload")
    if isinstance(args.out_norm_init, float) and not (math.isfinite(args.out_norm_init) and args.out_norm_init >= 0):
        raise UserError(f"--out-norm-init {args.out_norm_init} must be a finite number >= 0 (small, e.g. {DEFAULT_OUT_NORM_INIT:g})")
    if args.kept_lora is not None and not (math.isfinite(args.kept_lora) and 0 <= args.kept_lora < 1):
        raise UserError(f"--kept-lora {args.kept_lora} must be in [0, 1): the fraction of adapter rank moved to kept blocks")
    _check_reconstruct(args)
    if args.importance is not None and args.method not in PER_BLOCK:
        raise UserError(f"--importance applies to {', '.join(PER_BLOCK)}; {args.method} scores windows of blocks")
    if args.importance is None:  # offloaded scoring holds one block at a time: Block Influence only
        args.importance = "bi" if args.offload else DEFAULT_IMPORTANCE.get(args.method, "bi")
    if args.importance != "bi" and args.offload:
        raise UserError(f"--importance {args.importance} runs the whole model, which --offload avoids; add --importance bi")
    if args.kept_lora is None:
        args.kept_lora = DEFAULT_KEPT_LORA if args.method == "flexigpt" else 0.0
    args.out_norm = args.out_norm or "layernorm"
    args.no_filter = bool(args.no_filter)
    args.no_svd_init = bool(args.no_svd_init)
    args.svd_solver = args.svd_solver or "exact"
    check_out_dir(args.out, args.overwrite)


def _check_reconstruct(args: argparse.Namespace) -> None:
    """``--reconstruct-*``: refused where there is nothing to fit or no model in memory; fills the defaults."""
    given = args.reconstruct_tokens is not None or args.reconstruct_lr is not None
    if args.reconstruct_epochs is None:
        if given:
            raise UserError("--reconstruct-tokens and --reconstruct-lr need --reconstruct-epochs E (E >= 1)")
        args.reconstruct_epochs = DEFAULT_RECONSTRUCT_EPOCHS
    if args.reconstruct_epochs < 0:
        raise UserError(f"--reconstruct-epochs {args.reconstruct_epochs} must be 0 (off) or more")
    if args.reconstruct_epochs and args.method not in RECONSTRUCTS:
        raise UserError(f"--reconstruct-epochs fits adapters, which {args.method} does not add; use flexigpt or shortgpt-lora")
    if args.reconstruct_epochs and args.offload:
        raise UserError("--reconstruct-epochs runs the whole model, which --offload avoids; "
                        "add --reconstruct-epochs 0 or drop --offload")  # fmt: skip
    args.reconstruct_tokens = RECONSTRUCT_TOKENS if args.reconstruct_tokens is None else args.reconstruct_tokens
    args.reconstruct_lr = RECONSTRUCT_LR if args.reconstruct_lr is None else args.reconstruct_lr
    if args.reconstruct_epochs and args.reconstruct_tokens < args.seq_len:
        raise UserError(f"--reconstruct-tokens {args.reconstruct_tokens} is less than one window of --seq-len {args.seq_len}")
    if not (math.isfinite(args.reconstruct_lr) and args.reconstruct_lr > 0):
        raise UserError(f"--reconstruct-lr {args.reconstruct_lr} must be a positive number (e.g. {RECONSTRUCT_LR:g})")


def _offload_folder(spec: str):
    """The folder ``--offload`` streams from (a hub id is downloaded first); refuses what is not a model folder."""
    from prunext.core.loading import local_folder

    where = local_folder(spec)
    if where is None:
        raise UserError(f"--offload reads a model folder with config.json and safetensors; '{spec}' is not one (drop --offload)")
    return where


def _skeleton(folder, dtype):
    """The folder's model on the meta device, in ``dtype``, and its config; refuses non-identity plans."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunext.core.families import check_family
    from prunext.core.model import PrunextConfig, register

    register()
    config = AutoConfig.from_pretrained(folder)
    if isinstance(config, PrunextConfig):
        if not config.plan.is_identity:
            raise UserError(f"{folder} is already pruned or extended (its plan is not the identity); prune/extend a plain or identity-plan model")
        config = config.base_config()
    check_family(config.model_type)
    with init_empty_weights(include_buffers=False):  # rotary buffers are computed, small and needed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval(), config


def _tokenizer(folder):
    from transformers import AutoTokenizer

    from prunext.errors import ModelError

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ModelError(f"no usable tokenizer in '{folder}' ({str(e).splitlines()[0]}); save the tokenizer with the model") from e


def calibration_windows(args: argparse.Namespace, data, tokenizer, vocab_size: int):
    """The ``--calib`` data set -> (n, seq_len) token windows, at most ``--calib-tokens`` tokens."""
    from prunext.data import check_vocab, token_stream, windows

    tokens = token_stream(data["text"], tokenizer, max_tokens=args.calib_tokens)
    if tokens.numel() < args.calib_tokens:
        log.warning("--calib %s holds only %d tokens (asked for %d)", args.calib, tokens.numel(), args.calib_tokens)
    out = windows(tokens, args.seq_len)  # (n, seq_len)
    check_vocab(out, vocab_size)
    return out


# ---------------------------------------------------------- distributed
def _init_distributed(device: str) -> tuple[int, int, str, bool]:
    """``(rank, world, device, created)``; starts a process group when torchrun set WORLD_SIZE > 1."""
    import datetime

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    dist = torch.distributed
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    created = not dist.is_initialized()
    if created:
        # rank 0 may write a large model while the others wait at the final barrier
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), device, created


# ----------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    import torch

    check_args(args)
    rank, world, device, created = _init_distributed(args.device)
    try:
        prune(args, rank, world, device)
        if world > 1:
            torch.distributed.barrier()
    finally:
        if created:
            torch.distributed.destroy_process_group()
    return 0


def prune(args: argparse.Namespace, rank: int = 0, world: int = 1, device: str = "cpu") -> None:
    import torch

    from prunext.core.checkpoint import write_native
    from prunext.core.loading import load_model, require_tokenizer
    from prunext.data import check_tokenizer, load_text_dataset
    from prunext.fsutil import atomic_dir
    from prunext.prune import methods, report
    from prunext.tables import format_table
    from prunext.prune.importance import (
        score_blocks,
        score_blocks_best,
        score_blocks_iterative,
        score_blocks_offloaded,
        score_blocks_ppl,
    )
    from prunext.prune.ratio import ModelSizes, plan_budget

    # setup
    calib_data = load_text_dataset(args.calib)  # a bad --calib is refused before the model loads
    dtype = getattr(torch, args.dtype)
    source = folder = None
    if args.offload:
        folder = _offload_folder(args.model)
        source, config = _skeleton(folder, dtype)  # on the meta device: the weights stay on disk
        sizes, tokenizer = ModelSizes.from_model(source), _tokenizer(folder)
    else:
        source, tokenizer = load_model(args.model, dtype=dtype, device=device)
        methods.check_source(source)
        sizes, config = ModelSizes.from_model(source), source.config
    tokenizer = require_tokenizer(tokenizer, args.model)
    check_tokenizer(tokenizer, config.vocab_size, args.model)
    flexigpt = args.method == "flexigpt"
    adapter_rank = args.adapter_rank or max(1, sizes.hidden_size // 16)
    filter_rank = None if args.no_filter else (args.filter_rank or max(1, sizes.hidden_size // 16))
    if adapter_rank > sizes.max_rank:
        raise UserError(f"--adapter-rank {adapter_rank} exceeds the smallest linear dimension {sizes.max_rank}; use a smaller rank")
    out_norm = args.out_norm == "layernorm"
    out_norm_init = DEFAULT_OUT_NORM_INIT if args.out_norm_init is None else args.out_norm_init
    budget = plan_budget(args.method, sizes, args.ratio, adapter_rank, out_norm if flexigpt else True)
    if flexigpt and args.kept_lora:  # refuse a split that starves a replacement before any scoring
        methods.split_ranks(budget.adapter_rank, list(range(budget.count)), list(range(sizes.num_blocks - budget.count)), args.kept_lora)
    metric, window = methods.metric_for(budget)
    settings = {
        "model": args.model,
        "method": args.method,
        "ratio": args.ratio,
        "blocks": sizes.num_blocks,
        "hidden_size": sizes.hidden_size,
        "metric": metric if args.method not in PER_BLOCK else args.importance,
        "window": window,
        "adapter_rank": budget.adapter_rank or None,
        "filter_rank": filter_rank if flexigpt else None,
        "out_norm": (args.out_norm if flexigpt else None),
        "out_norm_init": out_norm_init if flexigpt and out_norm else None,
        "svd_init": (not args.no_svd_init) if flexigpt else None,
        "kept_lora": args.kept_lora if flexigpt else None,
        "svd_solver": args.svd_solver if flexigpt else None,
        "reconstruct_epochs": args.reconstruct_epochs or None,
        "reconstruct_tokens": args.reconstruct_tokens if args.reconstruct_epochs else None,
        "reconstruct_lr": args.reconstruct_lr if args.reconstruct_epochs else None,
        "calib": args.calib,
        "calib_tokens": args.calib_tokens,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "device": device,
        "dtype": args.dtype,
        "offload": args.offload,
        "world_size": world,
        "seed": args.seed,
    }
    if rank == 0:
        print("prunext prune settings:\n" + format_table([(k, v) for k, v in settings.items() if v is not None]), flush=True)

    # run: score
    calib = calibration_windows(args, calib_data, tokenizer, config.vocab_size)
    settings["calib_windows"] = calib.shape[0]
    timings = {}
    start = time.perf_counter()
    if args.offload:
        scores = score_blocks_offloaded(str(folder), calib, metric, window, args.batch_size, device, dtype)
    elif args.method in PER_BLOCK and args.importance in ("ppl", "best"):  # a pass per block: on the first PPL_TOKENS
        use = calib[: max(1, PPL_TOKENS // calib.shape[1])]
        if args.importance == "ppl":
            scores = score_blocks_ppl(source, use, args.batch_size, device, progress=rank == 0)
        else:
            scores = score_blocks_best(source, use, budget.count, args.batch_size, device, progress=rank == 0)
    elif args.method in PER_BLOCK and args.importance == "bi-iterative":
        scores = score_blocks_iterative(source, calib, budget.count, args.batch_size, device, progress=rank == 0)
    else:
        scores = score_blocks(source, calib, metric, window, args.batch_size, device)
    timings["scoring"] = time.perf_counter() - start

    # run: decide, build, initialise
    start = time.perf_counter()
    meta_source = weights = None
    if args.offload:
        from prunext.core.checkpoint import read_safetensors_keys, read_tensor
        from prunext.prune.offload import StoredWeights, load_vectors, source_key

        files = read_safetensors_keys(folder)
        load_vectors(source, folder, files)
        if flexigpt:
            weights = StoredWeights(folder, files, methods.linear_slots(source), sizes.num_blocks, device)
    elif flexigpt:
        weights = methods.block_weights(source, range(sizes.num_blocks))
    pruning = methods.decide(scores, budget, weights, filter_rank, out_norm, args.kept_lora if flexigpt else 0.0, args.svd_solver)
    timings["matching_svd"] = time.perf_counter() - start
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = methods.build_model(source, pruning, DEFAULT_OUT_NORM_INIT if out_norm_init == "fit" else out_norm_init)
    if args.offload:
        def meta_source(key: str, plan=pruning.plan):
            return read_tensor(folder, files, source_key(key, plan)).to(dtype)
    timings["build_save"] = time.perf_counter() - start
    if flexigpt and not args.no_svd_init:
        start = time.perf_counter()
        methods.init_adapters_svd(model, pruning, weights, args.svd_solver)
        timings["matching_svd"] += time.perf_counter() - start
    fitted = None
    if flexigpt and out_norm_init == "fit":
        from prunext.prune.fitnorm import fit_out_norms

        start = time.perf_counter()
        fitted = fit_out_norms(model, source, pruning.sources, calib, args.batch_size, device, progress=rank == 0)
        timings["fit_norms"] = time.perf_counter() - start
    rebuilt = None
    if args.reconstruct_epochs and rank == 0:  # only rank 0 writes: the others need not fit
        from prunext.prune.reconstruct import reconstruct

        use = calib[: max(1, args.reconstruct_tokens // calib.shape[1])]
        rebuilt = reconstruct(model, source, use, args.reconstruct_epochs, args.reconstruct_lr, device=device,
                              seed=args.seed, progress=True)  # fmt: skip
        timings["reconstruct"] = rebuilt["seconds"]
    params_after = methods.stored_params(model)
    if params_after != budget.total_params_after:
        raise RuntimeError(f"built model stores {params_after:,} parameters, the accounting says {budget.total_params_after:,}")

    # save (rank 0)
    if rank != 0:
        return
    start = time.perf_counter()
    with atomic_dir(args.out, args.overwrite) as tmp:
        write_native(model, tmp, tokenizer=tokenizer, meta_source=meta_source)
        report.plot_importance(scores, pruning, tmp / report.IMPORTANCE_PLOT)
        if pruning.distances is not None:
            report.plot_distances(pruning, tmp / report.DISTANCE_PLOT)
        timings["build_save"] += time.perf_counter() - start
        built = report.build_report(settings, scores, budget, pruning, params_after, timings)
        if rebuilt is not None:
            built["reconstruction"] = rebuilt
        if fitted is not None:
            built["out_norm_fit"] = {str(i): {k: round(v, 6) for k, v in row.items()} for i, row in fitted.items()}
        report.write_report(tmp, built)
    print(report.summary(budget, pruning))
    print(
        "timings: "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
        + f"; wrote {args.out}",
        flush=True,
    )
