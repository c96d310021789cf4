"""The ``prunext`` command line: one verb per job.

Each verb lives in its own module exposing ``HELP`` (one line), ``EPILOG``
(examples), ``add_arguments(parser)`` and ``run(args) -> int``. Verb modules
import heavy libraries inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

VERBS: dict[str, str] = {
    "prune": "prunext.prune.recipe",
    "extend": "prunext.extend.recipe",
    "train": "prunext.train.recipe",
    "convert": "prunext.convert.recipe",
    "eval": "prunext.eval.recipe",
    "generate": "prunext.generate.recipe",
    "demo": "prunext.demo",
}

#: The command line being run, as ``["prunext", VERB, ARGS...]``, while :func:`main` runs it (model cards quote it).
current_command: list[str] | None = None

#: What to do after another rank was lost, by verb (the default: run the command again).
LOST_RANK_ADVICE = {
    "train": "run the same command with --resume to continue from the newest complete checkpoint in --out",
}

DESCRIPTION = """\
prunext makes large language models smaller and small ones deeper by depth,
with weight-shared blocks and low-rank adapters (FlexiGPT), and trains the
result with DeepSpeed ZeRO-3.

Models: builtin:smollm2-135m, a native or Hugging Face folder, a .gguf file, a hub id.
Data:   builtin:wiki[:train|:test], a .txt/.jsonl/.parquet file or folder, a hub dataset.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunext", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"prunext {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            verb,
            help=module.HELP.replace("%", "%%"),  # argparse %-formats help strings
            description=module.HELP,
            epilog=module.EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from prunext import __version__

    return __version__


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:
        # Each retry of an unreachable hub is a warning; the error that follows says it in one line.
        logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Run one verb; a user's mistake exits 2 with one line on stderr, a lost rank 1 with one line."""
    global current_command
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    from prunext.errors import UserError

    current_command = ["prunext", *(sys.argv[1:] if argv is None else argv)]
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"prunext {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prunext {args.verb}: interrupted; outputs are written atomically, nothing partial was left", file=sys.stderr)
        return 130
    except Exception as e:
        # A rank that died makes the others fail in a collective; say so instead of showing gloo's traceback.
        from prunext.train.dist import lost_rank_message, lost_rank_reason

        reason = lost_rank_reason(e)
        if reason is None or args.debug:
            raise
        advice = LOST_RANK_ADVICE.get(args.verb, "run the command again")
        print(f"prunext {args.verb}: error: {lost_rank_message(reason, advice)}", file=sys.stderr)
        return 1
    finally:
        current_command = None


if __name__ == "__main__":
    sys.exit(main())
