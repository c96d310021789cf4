"""Entry point for launchers: ``torchrun``/``deepspeed``/``python launch/train.py ARGS`` = ``prunext train ARGS``.

The deepspeed launcher appends ``--local_rank=N``; the recipe accepts it.
Everything else (checks, errors as one line with exit status 2) is the
package's: see ``prunext train --help`` and docs/training.md.
"""

import sys
from pathlib import Path

# Runs from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunext.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
