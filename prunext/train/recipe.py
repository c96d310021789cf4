"""``prunext train``: ZeRO-3 continued pretraining (not implemented yet)."""

HELP = "heal or grow a model with DeepSpeed ZeRO-3 continued pretraining (coming soon)"
EPILOG = """\
Not implemented yet in this release. It will run as:
  torchrun --nproc_per_node 8 -m prunext train --model pruned/ --data builtin:wiki --tokens 50M --out run/
"""


def add_arguments(parser) -> None:
    parser.add_argument("rest", nargs="*", help="not implemented yet")


def run(args) -> int:
    from prunext.errors import UserError

    raise UserError("`prunext train` is not implemented yet in this release; see the README for what works today")
