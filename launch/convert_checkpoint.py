"""Convert a training run's DeepSpeed ZeRO-3 checkpoint on one CPU process: ``= prunext convert ARGS``.

    python launch/convert_checkpoint.py --from OUT/checkpoints --to DIR [--tag TAG] \
        [--format native|hf] [--dtype float32|bfloat16] [--max-shard-size 5GB] [--model DIR] [--verify]

Needs neither GPUs nor the training world size. The newest complete tag is
used unless --tag names one; see docs/conversion.md and ``prunext convert --help``.
"""

import sys
from pathlib import Path

# Runs from a checkout without `pip install -e .` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunext.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
