"""prunext/train/checkpoints.py and metrics.py: which checkpoint resume takes, and the metrics file it rewinds."""

import json

import pytest

from prunext.errors import UserError
from prunext.train import checkpoints
from prunext.train.metrics import MetricsLog, mfu, peak_flops, read_metrics


def _tag(ckpt, step, complete=True):
    folder = ckpt / checkpoints.tag_of(step)
    folder.mkdir(parents=True)
    if complete:
        (folder / checkpoints.STATE_FILE).write_text(json.dumps({"step": step}))


def test_latest_names_only_complete_tags(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert checkpoints.latest_state(ckpt) is None
    _tag(ckpt, 2)
    _tag(ckpt, 4, complete=False)  # a save killed half-way: `latest` was never moved to it
    checkpoints.write_text_atomic(ckpt / checkpoints.LATEST, "step2")
    assert checkpoints.latest_state(ckpt) == {"step": 2, "tag": "step2"}
    assert checkpoints.drop_newer(ckpt, 2) == [4]
    assert checkpoints.tags(ckpt) == [2]


def test_latest_pointing_at_a_damaged_tag_is_refused(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _tag(ckpt, 2, complete=False)
    checkpoints.write_text_atomic(ckpt / checkpoints.LATEST, "step2")
    with pytest.raises(UserError, match="missing or damaged"):
        checkpoints.latest_state(ckpt)


def test_metrics_rewind_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, active=True)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    with path.open("a") as f:
        f.write('{"step": 6, "lo')  # cut by a kill
    MetricsLog(path, active=True, resume_step=4)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    MetricsLog(path, active=False, resume_step=0)  # other ranks never touch the file
    assert len(read_metrics(path)) == 4


def test_mfu_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "float32") is None
    assert peak_flops("cpu", "bfloat16") is None
    assert mfu(100e6, 1e6, 989e12) == pytest.approx(6 * 100e6 * 1e6 / 989e12)
    assert mfu(100e6, 1e6, None) is None
