"""``prunext extend``: deepen a model to N positions (FlexiGPT Sec. 3.4, LLaMA Pro, SOLAR).

Setup (check every flag, load the source), run (lay out the new positions,
build the model), save (native folder + ``extend_report.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math

from prunext.core.model import DEFAULT_OUT_NORM_INIT
from prunext.core.plan import LINEAR_NAMES
from prunext.errors import UserError

log = logging.getLogger(__name__)

HELP = "deepen a model by repeating blocks (FlexiGPT: shared weights + adapters) or copying them (LLaMA Pro, SOLAR)"
EPILOG = f"""\
examples:
  prunext extend --model builtin:smollm2-135m --to-layers 40 --out smol-40/
  prunext extend --model tinyllama/ --to-layers 36 --mode sequential --span 6:20 --out tl-36/
  prunext extend --model builtin:smollm2-135m --to-layers 48 --method solar --out smol-solar/

methods:
  flexigpt   new positions reuse an existing block's weights (stored once) and own a
             LoRA adapter (B = 0) and output norms (scale --out-norm-init): only adapters
             and norms are new parameters. The first occurrence of a block is untouched.
  llama-pro  new positions are independent copies with o_proj and down_proj zeroed, so the
             model computes the same function at init (Wu et al. 2024). Plain dense model.
  solar      depth up-scaling (Kim et al. 2023): two copies of the model, the first without
             its last m blocks, the second without its first m, stacked: N = 2(L - m).
             Plain dense model.

where the new positions go (L = current depth, N = --to-layers, k = N - L new positions):
  block mode       each block in --blocks is repeated right after itself; list exactly k
                   blocks, a block listed twice is repeated twice.
  sequential mode  the half-open span --span a:b (blocks a..b-1) runs again right after
                   itself; b - a must equal k.
  defaults         the paper fixes none; they never repeat the first and last
                   e = max(1, L // 10) blocks, which ShortGPT's Block Influence and Gromov et
                   al. (2024) find the most influential and least redundant, and use the
                   interior, whose blocks barely change the hidden state:
                   block mode spreads the k repeats evenly over blocks e..L-e-1;
                   sequential mode repeats the k blocks ending right before the last e
                   (span L-e-k : L-e), the middle-to-late blocks Gromov et al. find the
                   most redundant; llama-pro copies the last block of each of k equal
                   groups (its paper's interleaving: L = 32, k = 8 -> after 3, 7, ..., 31).

defaults: --adapter-rank hidden/16 (the paper uses 256 at hidden 4096), all 7 linears,
  output norms on with initial scale {DEFAULT_OUT_NORM_INIT:g} (0 makes the new positions add exactly 0).
"""

DTYPES = ("float32", "bfloat16", "float16")
REPORT_FILE = "extend_report.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="source model: builtin:smollm2-135m, HF or native folder, .gguf, hub id")
    parser.add_argument("--to-layers", type=int, required=True, metavar="N", help="target depth N in positions; must exceed the current depth")
    parser.add_argument("--out", required=True, help="output folder (native model + extend_report.json)")
    parser.add_argument(
        "--method", choices=("flexigpt", "llama-pro", "solar"), default="flexigpt", help="how to deepen (default flexigpt; see below)"
    )
    parser.add_argument(
        "--mode",
        choices=("block", "sequential"),
        default=None,
        help="block: repeat single blocks; sequential: repeat a contiguous span (default: sequential if --span is given, else block)",
    )
    parser.add_argument("--blocks", metavar="I,J,...", help="block mode: blocks to repeat, exactly N - L entries (default: see below)")
    parser.add_argument(
        "--span", metavar="A:B", help="sequential mode: half-open span, blocks A..B-1 run again after B-1; B - A = N - L (default: see below)"
    )
    parser.add_argument("--adapter-rank", type=int, default=None, help="flexigpt: LoRA rank of each new position (default hidden/16; 0 = none)")
    parser.add_argument(
        "--adapter-targets", default=None, metavar="NAMES", help=f"flexigpt: comma-separated linears with LoRA (default all: {','.join(LINEAR_NAMES)})"
    )
    parser.add_argument("--out-norm", choices=("layernorm", "none"), default=None, help="flexigpt: output feature normalization on new positions (default layernorm)")
    parser.add_argument(
        "--out-norm-init", type=float, default=None, help=f"flexigpt: initial output-norm scale (default {DEFAULT_OUT_NORM_INIT:g}; 0 = function unchanged at init)"
    )
    parser.add_argument("--solar-overlap", type=int, default=None, metavar="M", help="solar: blocks m dropped at the seam (default L - N/2)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="load and save in this dtype (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the adapters' A initialisation (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


# ------------------------------------------------------------ checking
def parse_blocks(text: str) -> tuple[int, ...]:
    """``"3,7,7"`` -> ``(3, 7, 7)``; raises UserError on anything else."""
    try:
        blocks = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"--blocks {text!r} is not a comma-separated list of block numbers, e.g. --blocks 5,9,9") from None
    return blocks


def parse_span(text: str) -> tuple[int, int]:
    """``"10:24"`` -> ``(10, 24)`` (half-open); raises UserError on anything else."""
    try:
        a, b = (int(t) for t in text.split(":"))
    except ValueError:
        raise UserError(f"--span {text!r} is not A:B (half-open: blocks A..B-1), e.g. --span 10:24") from None
    return a, b


def parse_targets(text: str | None) -> tuple[str, ...]:
    if text is None or text == "all":
        return LINEAR_NAMES
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in targets if t not in LINEAR_NAMES]
    if unknown or not targets or len(set(targets)) != len(targets):
        raise UserError(f"--adapter-targets {text!r} must list distinct names from {','.join(LINEAR_NAMES)} (or 'all')")
    return tuple(t for t in LINEAR_NAMES if t in targets)


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model; fills in ``args.mode``. Raises UserError."""
    from prunext.fsutil import check_out_dir

    if args.to_layers < 1:
        raise UserError(f"--to-layers {args.to_layers} must be a positive number of positions")
    if args.method != "flexigpt":
        given = [f for f in ("adapter_rank", "adapter_targets", "out_norm", "out_norm_init") if getattr(args, f) is not None]
        if given:
            raise UserError(
                f"--{given[0].replace('_', '-')} applies to --method flexigpt only; "
                f"{args.method} copies whole blocks without adapters or norms"
            )
    if args.method == "solar":
        given = [f for f in ("mode", "blocks", "span") if getattr(args, f) is not None]
        if given:
            raise UserError(f"--method solar fixes its own layout (N = 2(L - m)); drop --{given[0]} and use --solar-overlap")
    elif args.solar_overlap is not None:
        raise UserError("--solar-overlap applies to --method solar only")
    if args.method != "solar":
        if args.mode is None:
            args.mode = "sequential" if args.span is not None else "block"
        if args.mode == "block" and args.span is not None:
            raise UserError("--span belongs to --mode sequential; in block mode list blocks with --blocks")
        if args.mode == "sequential" and args.blocks is not None:
            raise UserError("--blocks belongs to --mode block; in sequential mode give --span A:B")
    if args.blocks is not None:
        args.blocks = parse_blocks(args.blocks)
    if args.span is not None:
        args.span = parse_span(args.span)
    if args.adapter_rank is not None and args.adapter_rank < 0:
        raise UserError(f"--adapter-rank {args.adapter_rank} must be >= 0 (0 means no adapter)")
    args.adapter_targets = parse_targets(args.adapter_targets)
    if args.out_norm_init is not None and not (math.isfinite(args.out_norm_init) and args.out_norm_init >= 0):
        raise UserError(f"--out-norm-init {args.out_norm_init} must be a finite number >= 0 (small, e.g. {DEFAULT_OUT_NORM_INIT:g})")
    check_out_dir(args.out, args.overwrite)


def peek_plan(spec: str):
    """The source's plan read from its ``config.json`` without loading weights; None when it has none (GGUF, hub id).

    Lets every depth-dependent check run before a large model is loaded.
    """
    from prunext.core.checkpoint import read_plan
    from prunext.core.loading import resolve_model_path
    from prunext.core.plan import Plan

    where = resolve_model_path(spec)
    config = where / "config.json" if not isinstance(where, str) else None
    if config is None or not config.is_file():
        return None
    native = read_plan(where)
    if native is not None:
        return native
    try:
        return Plan.identity(int(json.loads(config.read_text())["num_hidden_layers"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # load_model reports a damaged folder in its own words


def layout(args: argparse.Namespace, num_blocks: int):
    """The expansion for this method and mode, from the flags or the documented defaults."""
    from prunext.extend import plans

    n = args.to_layers
    if args.method == "solar":
        return plans.solar_expansion(num_blocks, n, args.solar_overlap)
    if args.mode == "sequential":
        span = args.span if args.span is not None else plans.default_span(num_blocks, n)
        return plans.span_expansion(num_blocks, n, span)
    if args.blocks is not None:
        blocks = args.blocks
    elif args.method == "llama-pro":
        blocks = plans.llama_pro_default_blocks(num_blocks, n)
    else:
        blocks = plans.default_blocks(num_blocks, n)
    return plans.block_expansion(num_blocks, n, blocks)


def layout_settings(args: argparse.Namespace, expansion) -> dict:
    """The layout as the report records it: the repeated blocks, the span, or SOLAR's overlap."""
    if args.method == "solar":
        return {"mode": None, "solar_overlap": expansion.num_source_blocks - len(expansion) // 2}
    added = [expansion.sources[i] for i in expansion.new_positions]
    if args.mode == "block":
        return {"mode": "block", "blocks": added}
    return {"mode": "sequential", "span": [added[0], added[-1] + 1]}


# ----------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    import torch

    from prunext.core.checkpoint import save_native
    from prunext.core.loading import load_model
    from prunext.data import check_tokenizer
    from prunext.extend import methods, plans
    from prunext.fsutil import atomic_dir

    # setup
    check_args(args)
    peeked = peek_plan(args.model)
    if peeked is not None:
        methods.check_plan(peeked)
        layout(args, len(peeked))
    source, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    methods.check_plan(source.plan)
    if tokenizer is not None:  # copied into --out: refuse it here rather than at the first train or eval
        check_tokenizer(tokenizer, source.config.vocab_size, args.model)
    num_blocks = len(source.plan)
    expansion = layout(args, num_blocks)
    settings = {"method": args.method, "dtype": args.dtype, **layout_settings(args, expansion)}
    plan, out_norm_init = None, DEFAULT_OUT_NORM_INIT
    if args.method == "flexigpt":
        rank = args.adapter_rank if args.adapter_rank is not None else max(1, source.config.hidden_size // 16)
        out_norm = (args.out_norm or "layernorm") == "layernorm"
        if args.out_norm_init is not None:
            out_norm_init = args.out_norm_init
        plan = plans.flexigpt_plan(expansion, rank, args.adapter_targets, out_norm)
        settings.update(
            adapter_rank=rank,
            adapter_targets=list(args.adapter_targets) if rank else [],
            out_norm=out_norm,
            out_norm_init=out_norm_init if out_norm else None,
            seed=args.seed,
        )
    log.info("extending %s from %d to %d positions: %s", args.model, num_blocks, args.to_layers, settings)

    # run
    torch.manual_seed(args.seed)
    model = methods.extend_model(source, args.method, expansion, plan, out_norm_init)
    table = plan.describe() if plan is not None else expansion.describe("copy, o/down=0" if args.method == "llama-pro" else "copy")
    params = {
        "before": methods.stored_params(source),
        "after": methods.stored_params(model),
        "executed_after": methods.executed_params(model),
    }
    params["new_stored"] = params["after"] - params["before"]

    # save
    report = {
        "model": args.model,
        "source_layers": num_blocks,
        "to_layers": len(model.plan),
        "settings": settings,
        "expansion": expansion.to_dict(),
        "plan": model.plan.to_dict(),
        "plan_table": table.splitlines(),
        "params": params,
    }
    with atomic_dir(args.out, args.overwrite) as tmp:
        save_native(model, tmp, tokenizer=tokenizer)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")

    print(table)
    print(
        f"{args.method}: {num_blocks} -> {len(model.plan)} positions; stored parameters "
        f"{params['before']:,} -> {params['after']:,} (+{params['new_stored']:,}); wrote {args.out}"
    )
    return 0
