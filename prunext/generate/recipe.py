"""``prunext generate``: continue a prompt with any model, plainly or by lossless self-speculative decoding.

Flow: check arguments -> load model -> check the prompt and the draft -> decode, streaming the text to
stdout -> print counts and speeds to stderr -> write JSON.
"""

from __future__ import annotations

HELP = "generate text from a prompt: greedy or sampled, optionally by lossless self-speculative decoding"
EPILOG = """\
examples:
  prunext generate --model builtin:smollm2-135m --prompt "The history of Paris" --max-new-tokens 64
  prunext generate --model pruned/ --prompt-file prompt.txt --speculative self --json out.json
  prunext generate --model healed/ --prompt "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1
  prunext generate --model smol-40/ --prompt "Hello" --speculative self --draft-skip 5,7,9 --draft-tokens 4

Decoding is greedy unless --temperature is given. The text streams to stdout
as it is made; settings, counts and speeds go to stderr.

--speculative self (FlexiGPT Sec. 4.2): a draft that is the same model
without its replacement positions (positions that re-run a block another
position runs; --draft-skip names others) proposes --draft-tokens tokens, and
the full model checks them in one pass. The draft shares every weight and
has only its own KV cache. The output is the model's own: greedy tokens are
those of plain decoding, sampled tokens follow the model's distribution
(the speculative-sampling acceptance rule). A model whose every block runs
once has nothing to skip unless --draft-skip names positions.

--json OUT records the prompt, the text, prompt and new token counts, prefill
and decode seconds, tokens/s and, when speculative, the acceptance rate.
"""

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model: builtin:smollm2-135m, a folder, a .gguf file or a hub id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to continue")
    source.add_argument("--prompt-file", metavar="FILE", help="read the prompt from this UTF-8 file")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to add (default 64; also stops at EOS)")
    parser.add_argument("--temperature", type=float, default=None, help="sample with this temperature (default: greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="sampling: nucleus probability mass in (0, 1] (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="sampling: random seed (default 0)")
    parser.add_argument("--speculative", choices=("self",), default=None, help="self: lossless self-speculative decoding")
    parser.add_argument("--draft-tokens", type=int, default=None,
                        help="speculative: tokens drafted per round (default: the measured best, see BENCHMARKS.md)")
    parser.add_argument("--draft-skip", default=None, metavar="I,J,...",
                        help="speculative: positions the draft skips (default: the replacement positions)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default float32; bf16 is slow on CPU)")
    parser.add_argument("--json", metavar="FILE", help="write the text, counts and timings here as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def parse_positions(spec: str) -> list[int]:
    """``"3, 5,7"`` -> ``[3, 5, 7]``; refuses anything else in one line."""
    from prunext.errors import UserError

    try:
        positions = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--draft-skip {spec!r} is not a list of positions such as 3,5,7") from None
    if not positions:
        raise UserError(f"--draft-skip {spec!r} names no position; give e.g. 3,5,7")
    return positions


def check_arguments(args):
    """Refuse impossible requests before anything is loaded; returns (prompt, sampling, draft skip or None)."""
    from pathlib import Path

    from prunext.errors import UserError
    from prunext.generate.api import check_sampling

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    sampling = check_sampling(args.temperature, args.top_p, args.seed)
    if args.speculative is None:
        given = [flag for flag, value in (("--draft-tokens", args.draft_tokens), ("--draft-skip", args.draft_skip)) if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)} apply to --speculative self; add it or drop them")
    if args.draft_tokens is not None and args.draft_tokens < 1:
        raise UserError(f"--draft-tokens {args.draft_tokens} must be at least 1")
    skip = parse_positions(args.draft_skip) if args.draft_skip is not None else None
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file {path} does not exist or is not a file")
        try:
            prompt = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompt-file {path} could not be read as UTF-8 text ({e})") from None
    else:
        prompt = args.prompt
    if not prompt.strip():
        raise UserError("the prompt is empty; give some text with --prompt or --prompt-file")
    if args.json is not None:
        out = Path(args.json)
        if out.is_dir():
            raise UserError(f"--json {out} is a folder; give a file path")
        if out.exists() and not args.overwrite:
            raise UserError(f"--json {out} exists; choose another file or pass --overwrite")
    return prompt, sampling, skip


def run(args) -> int:
    import logging
    import sys

    import torch

    from prunext.core.checkpoint import read_plan
    from prunext.core.loading import load_model, require_tokenizer
    from prunext.fsutil import write_json_atomic
    from prunext.generate.api import check_prompt_fits, encode_prompt, generate
    from prunext.generate.speculative import DEFAULT_DRAFT_TOKENS, check_draft_skip

    log = logging.getLogger(__name__)
    prompt, sampling, skip = check_arguments(args)
    if args.speculative == "self":
        plan = read_plan(args.model)  # a native folder's plan, read without its weights
        if plan is not None:
            check_draft_skip(plan, skip)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    tokenizer = require_tokenizer(tokenizer, args.model)
    if args.speculative == "self":
        skip = check_draft_skip(model.plan, skip)
    check_prompt_fits(encode_prompt(tokenizer, prompt).shape[1], model)

    decoding = "greedy" if sampling.greedy else f"sampling (temperature {sampling.temperature:g}, top-p {sampling.top_p:g}, seed {sampling.seed})"
    if args.speculative == "self":
        k = args.draft_tokens or DEFAULT_DRAFT_TOKENS
        decoding += f", self-speculative: {k} draft tokens a round, the draft skips positions {','.join(map(str, skip))} of {len(model.plan)}"
    log.info("generate: model %s (%d positions, %s, %s), up to %d new tokens, %s",
             args.model, len(model.plan), args.dtype, device, args.max_new_tokens, decoding)
    result = generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=sampling.temperature,
                      top_p=sampling.top_p if not sampling.greedy else None, seed=sampling.seed if not sampling.greedy else None,
                      speculative=args.speculative, draft_tokens=args.draft_tokens,
                      draft_skip=skip if args.speculative else None, stream=sys.stdout)
    s = result.stats
    line = (f"{s.prompt_tokens} prompt tokens, {s.new_tokens} new ({s.stopped}); prefill {s.prefill_s:.3f} s, "
            f"decode {s.decode_s:.3f} s ({s.decode_tokens_per_s:.1f} tokens/s)")
    if s.speculative:
        line += f"; acceptance {s.acceptance_rate:.1%} of {s.drafted} drafted tokens in {s.rounds} rounds"
    print(line, file=sys.stderr)
    if args.json:
        write_json_atomic(args.json, {"model": args.model, "dtype": args.dtype, "device": device,
                                      "max_new_tokens": args.max_new_tokens, **result.to_dict()})
        log.info("wrote %s", args.json)
    return 0
