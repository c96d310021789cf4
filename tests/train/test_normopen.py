"""train --norm-open: a schedule that opens the output norms (prunext/train/normopen.py).

The tiny model's replacement position has output norms at scale 0.1; with
factor 10 the schedule opens them to 1.0. A learning rate of 1e-9 keeps the
optimizer's own changes out of the way, so what is left is the schedule.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from prunext.cli import main
from prunext.core.checkpoint import load_native
from prunext.train.normopen import gate_at, output_norms, prepare, set_gate

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


def test_gate_rises_linearly_to_one():
    assert [gate_at(t, 4, 10.0) for t in range(6)] == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0, 1.0])
    assert gate_at(0, 0, 10.0) == 1.0  # no schedule


def test_prepare_keeps_the_function(tmp_path):
    model = load_native(tiny.build_tiny_pruned(tmp_path / "model")).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        weights = [n.weight.clone() for n in output_norms(model)]
        assert len(prepare(model, 10.0)) == 2  # the replacement's attention and MLP output norms
        assert all(torch.allclose(n.weight, 10 * w) for n, w in zip(output_norms(model), weights))
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
        set_gate(output_norms(model), 1.0)  # fully open: the branch is 10x stronger
        assert (model(ids).logits - before).abs().max() > 1e-3


def _norms(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    return {k: v for k, v in state.items() if "_out_norm." in k}


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_opens_the_norms_and_convert_applies_the_gate(tmp_path):
    model, text = tiny.build_tiny_pruned(tmp_path / "model"), tiny.write_text(tmp_path / "text.txt")
    start = _norms(model)
    runs = {}
    for name, extra in (("open", ["--norm-open", "2"]), ("plain", [])):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "prunext", "train",
               *tiny.train_args(model, text, out, "--tokens", "256", "--lr", "1e-9", "--save-every", "1", *extra)]
        proc = tiny.run(cmd)
        assert proc.returncode == 0, tiny.tail(proc)
        runs[name] = _losses(out)
    opened = runs["open"]
    assert len(opened) == 4  # 256 tokens = 4 steps of 2 x 32
    assert [r["norm_open"] for r in opened] == pytest.approx([5.5, 10.0, 10.0, 10.0])
    assert "norm_open" not in runs["plain"][0]
    # The function is unchanged at the start: the first step's loss is the run's without the schedule.
    assert opened[0]["loss"] == pytest.approx(runs["plain"][0]["loss"], rel=1e-5)
    # Later the opened branch weighs more (by how much depends on the batch; lr 1e-9 leaves only the schedule).
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(opened[1:], runs["plain"][1:])) > 1e-4

    final = _norms(tmp_path / "open" / "final")
    for key, value in start.items():
        torch.testing.assert_close(final[key], 10 * value, rtol=1e-4, atol=1e-6)
    # A checkpoint saved while still opening holds raw weights; the converter applies that step's gate (5.5x).
    assert main(["convert", "--from", str(tmp_path / "open" / "checkpoints"), "--tag", "step1", "--to", str(tmp_path / "step1")]) == 0
    step1 = _norms(tmp_path / "step1")
    for key, value in start.items():
        torch.testing.assert_close(step1[key], 5.5 * value, rtol=1e-4, atol=1e-6)
    # ... and only to the output norms.
    source, converted = load_native(model).state_dict(), load_native(tmp_path / "step1").state_dict()
    for key, value in source.items():
        if "_out_norm." not in key:
            torch.testing.assert_close(converted[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_resume_continues_the_opening(tmp_path):
    """Stopped after step 1 of an opening over 3 steps and resumed: the same losses as without the stop."""
    model, text = tiny.build_tiny_pruned(tmp_path / "model"), tiny.write_text(tmp_path / "text.txt")
    losses = {}
    for name, stops in (("whole", [[]]), ("resumed", [["--stop-at", "1"], ["--resume"]])):
        for extra in stops:
            cmd = [sys.executable, "-m", "prunext", "train",
                   *tiny.train_args(model, text, tmp_path / name, "--tokens", "256", "--norm-open", "3", *extra)]
            proc = tiny.run(cmd)
            assert proc.returncode == 0, tiny.tail(proc)
        losses[name] = [(r["step"], r["loss"], r["norm_open"]) for r in _losses(tmp_path / name)]
    assert [s for s, _, _ in losses["resumed"]] == [1, 2, 3, 4]
    assert [f for _, _, f in losses["resumed"]] == pytest.approx([4.0, 7.0, 10.0, 10.0])
    assert [loss for _, loss, _ in losses["resumed"]] == pytest.approx([loss for _, loss, _ in losses["whole"]], abs=1e-5)


def test_bad_norm_open_refused(tmp_path, capsys, tiny_hf):
    model, text = tiny.build_tiny_pruned(tmp_path / "model"), tiny.write_text(tmp_path / "text.txt")
    plain = tmp_path / "plain"
    tiny_hf(layers=2).save_pretrained(plain)
    cases = [
        (["--norm-open", "0"], "--norm-open 0.0 must be a number > 0"),
        (["--norm-open", "2", "--norm-open-factor", "1"], "--norm-open-factor 1.0 must be a number > 1"),
        (["--norm-open", "9"], "--norm-open 9 is more than the run's 4 steps"),
        (["--norm-open-factor", "5"], "--norm-open-factor goes with --norm-open"),
    ]
    capsys.readouterr()
    for extra, message in cases:
        assert main(["train", *tiny.train_args(model, text, tmp_path / "never", "--tokens", "256", *extra)]) == 2
        assert message in capsys.readouterr().err
    argv = tiny.train_args(plain, text, tmp_path / "never", "--tokens", "256", "--trainable", "all", "--norm-open", "2")
    assert main(["train", *argv]) == 2
    assert "has none; drop --norm-open" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
