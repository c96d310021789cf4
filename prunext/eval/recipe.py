"""``prunext eval``: perplexity of any model on any text, by one documented convention.

Flow: check arguments -> load model and data -> score -> print a table -> write JSON.
"""

from __future__ import annotations

HELP = "evaluate a model: perplexity on a data set (zero-shot tasks: coming soon)"
EPILOG = """\
examples:
  prunext eval --model builtin:smollm2-135m --ppl builtin:wiki:test --seq-len 512 --max-tokens 32768 --json dense.json
  prunext eval --model pruned/ --ppl my_corpus.jsonl --seq-len 1024 --json pruned.json

Perplexity convention: each document tokenized as the tokenizer does (BOS only
if it adds one) and followed by EOS; documents concatenated; non-overlapping
windows of --seq-len tokens, remainder dropped, no stride; the first token of
each window is context only. The JSON's "perplexity" key records ppl, tokens,
seq_len, dataset and dtype.
"""

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model: builtin:smollm2-135m, a folder, a .gguf file or a hub id")
    parser.add_argument("--ppl", metavar="DATA", help="data set for perplexity (e.g. builtin:wiki:test)")
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--max-tokens", type=int, default=None, help="use only the first T tokens of the data (default all)")
    parser.add_argument("--tasks", help="zero-shot tasks (not available yet in this release)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default float32; bf16 is slow on CPU)")
    parser.add_argument("--json", metavar="FILE", help="write results here as JSON")


def check_arguments(args) -> None:
    """Refuse impossible requests before anything is loaded."""
    from prunext.errors import UserError

    if args.tasks:
        raise UserError("zero-shot --tasks are not available yet in this release; use --ppl DATA for perplexity")
    if not args.ppl:
        raise UserError("nothing to evaluate; give --ppl DATA (for example --ppl builtin:wiki:test)")
    if args.seq_len < 2:
        raise UserError(f"--seq-len {args.seq_len} is too short; a window needs at least 2 tokens")
    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise UserError(f"--max-tokens {args.max_tokens} is less than one window of --seq-len {args.seq_len}; raise it")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")


def evaluate_perplexity(model, tokenizer, data: str, seq_len: int, max_tokens: int | None, batch_size: int):
    """Tokenize ``data`` by the convention and return a :class:`PerplexityResult`."""
    from prunext.data import check_vocab, load_text_dataset, token_stream, windows
    from prunext.eval.perplexity import perplexity

    texts = load_text_dataset(data)["text"]
    tokens = token_stream(texts, tokenizer, max_tokens=max_tokens)
    check_vocab(tokens, model.config.vocab_size)
    return perplexity(model, windows(tokens, seq_len), dataset=data, batch_size=batch_size)


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run(args) -> int:
    import logging

    import torch

    from prunext.core.loading import load_model, require_tokenizer
    from prunext.fsutil import write_json_atomic

    log = logging.getLogger(__name__)
    check_arguments(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    log.info("evaluating %s (%d positions) on %s", args.model, model.config.num_hidden_layers, args.ppl)
    result = evaluate_perplexity(model, require_tokenizer(tokenizer, args.model), args.ppl, args.seq_len, args.max_tokens, args.batch_size)
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
    if args.json:
        write_json_atomic(args.json, {"model": args.model, "perplexity": result.to_dict()})
        log.info("wrote %s", args.json)
    return 0
