"""``prunext convert`` refuses an unusable DeepSpeed checkpoint in one line, exit 2, writing nothing.

One real run (one process, ZeRO-3 on CPU, 2 steps, a checkpoint after each)
gives ``step1`` and ``step2``; each case points convert at it wrongly, or at a
copy damaged the way a user's could be.
"""

import shutil
import sys
from pathlib import Path

import pytest

from prunext.cli import main
from prunext.convert.zero import STATE_FILE

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
import tiny  # noqa: E402

pytestmark = pytest.mark.integration  # a training subprocess (~10 s)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import make_tiny_hf

    root = tmp_path_factory.mktemp("convert_errors")
    model, text, out = tiny.build_tiny_pruned(root / "model"), tiny.write_text(root / "text.txt"), root / "run"
    args = tiny.train_args(model, text, out, "--tokens", "128", "--save-every", "1", "--trainable", "all")
    proc = tiny.run([sys.executable, "-m", "prunext", "train", *map(str, args)], timeout=240)
    assert proc.returncode == 0, tiny.tail(proc)
    make_tiny_hf("llama", layers=2).save_pretrained(root / "other_model")
    (root / "not_a_model").mkdir()
    return root


def _copy_checkpoints(run: Path, to: Path) -> Path:
    """The run's checkpoints folder alone, with no final/ or run_config.json beside it."""
    shutil.copytree(run / "run" / "checkpoints", to / "checkpoints")
    return to / "checkpoints"


def _refused(capsys, source, out: Path, *extra) -> str:
    code = main(["convert", "--from", str(source), "--to", str(out), *map(str, extra)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("prunext convert: error: "), err[-3000:]
    assert "Traceback" not in err and not out.exists()
    return errors[0]


def test_missing_tag(run, tmp_path, capsys):
    line = _refused(capsys, run / "run" / "checkpoints", tmp_path / "out", "--tag", "step9")
    assert "--tag step9: no folder" in line and "tags there: step1, step2" in line


def test_tag_twice(run, tmp_path, capsys):
    line = _refused(capsys, run / "run" / "checkpoints" / "step1", tmp_path / "out", "--tag", "step2")
    assert "--from names tag step1 and --tag says step2; give one" in line


def test_model_that_is_not_a_folder(run, tmp_path, capsys):
    line = _refused(capsys, run / "run" / "checkpoints", tmp_path / "out", "--model", run / "not_a_model")
    assert "is not a model folder with config.json" in line


def test_model_that_does_not_fit(run, tmp_path, capsys):
    line = _refused(capsys, run / "run" / "checkpoints", tmp_path / "out", "--model", run / "other_model")
    assert "the checkpoint does not fit the model config's plan" in line


def test_checkpoints_moved_away_from_their_run(run, tmp_path, capsys):
    line = _refused(capsys, _copy_checkpoints(run, tmp_path), tmp_path / "out")
    assert "cannot tell which model" in line and "pass --model" in line


def test_damaged_rank_file(run, tmp_path, capsys):
    ckpt = _copy_checkpoints(run, tmp_path)
    for states in (ckpt / "step2").glob("*model_states.pt"):
        states.write_bytes(b"not a torch file")
    line = _refused(capsys, ckpt, tmp_path / "out", "--model", run / "model", "--tag", "step2")
    assert "checkpoint" in line and "step2 is damaged" in line


def test_no_complete_checkpoint(run, tmp_path, capsys):
    ckpt = _copy_checkpoints(run, tmp_path)
    for tag in ("step1", "step2"):
        (ckpt / tag / STATE_FILE).unlink()
    line = _refused(capsys, ckpt, tmp_path / "out", "--model", run / "model")
    assert "has no complete checkpoint" in line and "step1: no prunext_state.json" in line


def test_not_zero3(run, tmp_path, capsys):
    """A checkpoint whose optimizer states say ZeRO stage 2 (as another trainer's would) is refused by name."""
    import torch

    ckpt = _copy_checkpoints(run, tmp_path)
    for optim in (ckpt / "step2").glob("*optim_states.pt"):
        state = torch.load(optim, map_location="cpu", weights_only=False)
        inner = state["optimizer_state_dict"]
        inner["zero_stage"] = 2
        inner["single_partition_of_fp32_groups"] = inner["fp32_flat_groups"]
        torch.save(state, optim)
    line = _refused(capsys, ckpt, tmp_path / "out", "--model", run / "model", "--tag", "step2")
    assert "is ZeRO stage 2; this converter reads ZeRO-3 checkpoints" in line
