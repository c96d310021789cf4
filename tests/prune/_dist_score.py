"""Score a tiny model under torch.distributed (gloo, CPU); each rank writes what it got.

Launched by tests/prune/test_importance.py::test_two_processes_equal_one as::

    python -m torch.distributed.run --nproc_per_node 2 --rdzv_endpoint localhost:0 \
        --rdzv_backend c10d tests/prune/_dist_score.py OUT_DIR MODEL_DIR

MODEL_DIR holds the same tiny model saved with ``save_pretrained`` (for the
offloaded path). Rank r writes ``OUT_DIR/rank{r}.json``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest

from conftest import make_tiny_hf  # noqa: E402
from test_importance import CASES, calibration_windows  # noqa: E402

from prunext.prune.importance import score_blocks, score_blocks_offloaded  # noqa: E402


def main() -> None:
    out_dir, model_dir = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        model = make_tiny_hf("llama", layers=4)
        windows = calibration_windows()
        result = {}
        for metric, n in CASES:
            result[f"{metric}-{n}"] = score_blocks(model, windows, metric, n, batch_size=2, progress=False).to_dict()
        offloaded = score_blocks_offloaded(model_dir, windows, "angular", 2, batch_size=2, progress=False)
        result["offloaded"] = offloaded.to_dict()
        (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
