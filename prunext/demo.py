"""``prunext demo``: the main job on the built-in model and data, from nothing to a report.

Flow: resolve the built-in model and text -> dense perplexity -> round-trip
through the native format and the plain HF format -> perplexity again (must be
unchanged) -> ``OUT/report.md`` and ``OUT/results.json``.
"""

from __future__ import annotations

HELP = "run the end-to-end demo on the built-in model (SmolLM2-135M) and text (Wikipedia)"
EPILOG = """\
examples:
  prunext demo                     # what `make demo` runs; writes demo_out/report.md
  prunext demo --fast              # fewer evaluation tokens
  prunext demo --out /tmp/demo --overwrite

The first run converts the built-in model from GGUF into $PRUNEXT_CACHE
(default ~/.cache/prunext), about half a minute; later runs reuse it.
"""

MODEL = "builtin:smollm2-135m"
EVAL_DATA = "builtin:wiki:test"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo_out", help="report folder (default demo_out)")
    parser.add_argument("--fast", action="store_true", help="evaluate on fewer tokens (about a minute in all)")
    parser.add_argument("--seq-len", type=int, default=512, help="perplexity window (default 512)")
    parser.add_argument("--overwrite", action="store_true", default=True, help="replace an earlier demo's report (default)")


def run(args) -> int:
    import json
    import logging
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from prunext.convert.hf import write_dense_hf
    from prunext.core.checkpoint import write_native
    from prunext.core.loading import load_model
    from prunext.data import check_vocab, load_text_dataset, token_stream, windows
    from prunext.eval.perplexity import perplexity
    from prunext.fsutil import atomic_dir, check_out_dir

    log = logging.getLogger(__name__)
    check_out_dir(args.out, args.overwrite)
    max_tokens = 4 * args.seq_len if args.fast else 16 * args.seq_len
    started = time.time()

    log.info("step 1/4: resolving %s and %s", MODEL, EVAL_DATA)
    model, tokenizer = load_model(MODEL, dtype=torch.float32)
    tokens = token_stream(load_text_dataset(EVAL_DATA)["text"], tokenizer, max_tokens=max_tokens)
    check_vocab(tokens, model.config.vocab_size)
    eval_windows = windows(tokens, args.seq_len)

    log.info("step 2/4: dense perplexity on %d windows of %d tokens", len(eval_windows), args.seq_len)
    dense = perplexity(model, eval_windows, dataset=EVAL_DATA)

    results = {"model": MODEL, "seq_len": args.seq_len, "rows": []}
    with atomic_dir(args.out, args.overwrite) as out:
        log.info("step 3/4: round trip through the native format")
        write_native(model, out / "native", tokenizer)
        native = AutoModelForCausalLM.from_pretrained(out / "native")
        native_ppl = perplexity(native, eval_windows, dataset=EVAL_DATA)
        del native

        log.info("step 4/4: round trip through a plain Hugging Face folder")
        write_dense_hf(model, out / "hf", tokenizer)
        plain = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
        plain_ppl = perplexity(plain, eval_windows, dataset=EVAL_DATA)
        del plain

        rows = [("dense (built-in, GGUF -> native cache)", dense), ("native round trip", native_ppl), ("plain HF round trip", plain_ppl)]
        results["rows"] = [{"model": name, **r.to_dict()} for name, r in rows]
        results["round_trip_exact"] = dense.ppl == native_ppl.ppl == plain_ppl.ppl
        results["seconds"] = round(time.time() - started, 1)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        report = _report(rows, results, len(eval_windows), args.seq_len)
        (out / "report.md").write_text(report)
    print(report)
    return 0


def _report(rows, results, n_windows: int, seq_len: int) -> str:
    lines = [
        "# prunext demo",
        "",
        f"Model `{MODEL}`; perplexity on `{EVAL_DATA}`, {n_windows} non-overlapping windows of {seq_len} tokens, fp32.",
        "",
        "| model | perplexity | tokens |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {r.ppl:.4f} | {r.tokens} |" for name, r in rows]
    verdict = "identical" if results["round_trip_exact"] else "DIFFERENT (a bug: please report it)"
    lines += ["", f"Round trips: perplexity {verdict}. Took {results['seconds']} s.", ""]
    return "\n".join(lines)
