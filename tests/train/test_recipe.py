"""prunext/train/recipe.py: every bad input is refused in one line (exit 2) before any work.

These run the CLI in-process: the checks come before the process group,
the model and the data are touched. One case runs the real command line to
show stderr holds exactly that line.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prunext.cli import main

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    model = tiny.build_tiny_pruned(root / "model")
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\n" * 50)
    (root / "broken.json").write_text('// a comment\n{"zero_optimization": {\n')
    (root / "batch.json").write_text('{"train_batch_size": 7}')
    (root / "micro.json").write_text('// micro 8\n{"train_micro_batch_size_per_gpu": 8}')
    return root, model, text


def _refused(capsys, argv):
    code = main(["train", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("prunext train: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--deepspeed", "{root}/broken.json"], "is not valid JSON/hjson"),
        (["--deepspeed", "{root}/batch.json", "--micro-batch", "2"], "train_batch_size 7 is not micro-batch 2 x grad-accum 1 x 1 ranks = 2"),
        (["--deepspeed", "{root}/micro.json", "--micro-batch", "2"], "--micro-batch 2 contradicts"),
        (["--deepspeed", "{root}/none.json"], "does not exist"),
        (["--resume"], "--resume found no complete checkpoint"),
        (["--tokens", "lots"], "is not a token count"),
        (["--tokens", "10"], "less than one step"),
        (["--seq-len", "1"], "--seq-len 1 must be at least 2"),
        (["--lr", "-1"], "--lr -1.0 must be a positive number"),
        (["--min-lr-ratio", "2"], "--min-lr-ratio"),
        (["--trainable", "all", "--token-fraction", "0.01"], "give --pretrain-tokens"),
        (["--token-fraction", "1.5", "--pretrain-tokens", "1M"], "must be in (0, 1]"),
        (["--data", "{root}/missing.txt"], "no such file or folder"),
        (["--model", "{root}/no-model"], "does not exist"),
    ],
)
def test_bad_input_refused_in_one_line(capsys, inputs, extra, message):
    root, model, text = inputs
    argv = ["--model", model, "--data", text, "--seq-len", "32", "--out", root / "out-never"]
    if "--token-fraction" not in extra and "--tokens" not in extra:
        argv += ["--tokens", "4096"]
    _refused(capsys, argv + [e.format(root=root) for e in extra])
    assert not (root / "out-never").exists()


def test_error_messages(capsys, inputs):
    root, model, text = inputs
    base = ["--model", model, "--data", text, "--tokens", "4096", "--seq-len", "32"]
    line = _refused(capsys, base + ["--out", root / "o", "--deepspeed", root / "micro.json", "--micro-batch", "2"])
    assert "contradicts --deepspeed" in line and "train_micro_batch_size_per_gpu 8" in line


def test_plain_model_with_replacement_refused(capsys, inputs, tiny_hf):
    root, _, text = inputs
    plain = root / "plain"
    if not plain.exists():
        tiny_hf(layers=2).save_pretrained(plain)
    capsys.readouterr()  # save_pretrained's own progress bar
    line = _refused(capsys, ["--model", plain, "--data", text, "--tokens", "4096", "--out", root / "o2"])
    assert line.endswith("nothing to train: the model has no adapters or output norms; use --trainable all")


def test_non_empty_out_refused_and_untouched(capsys, inputs):
    root, model, text = inputs
    out = root / "taken"
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("mine")
    line = _refused(capsys, ["--model", model, "--data", text, "--tokens", "4096", "--out", out])
    assert "exists and is not empty" in line
    assert (out / "keep.txt").read_text() == "mine"
    line = _refused(capsys, ["--model", model, "--data", text, "--tokens", "4096", "--out", out, "--resume", "--overwrite"])
    assert "give one of them" in line


def _resume_refused(capsys, inputs, name: str, saved: dict, *extra) -> str:
    """Resume a run whose only checkpoint (step 2) was made with the ``saved`` settings."""
    root, model, text = inputs
    ckpt = root / name / "checkpoints" / "step2"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "prunext_state.json").write_text(json.dumps({"step": 2, "settings": saved}))
    (ckpt.parent / "latest").write_text("step2")
    return _refused(capsys, ["--model", model, "--data", text, "--tokens", "4096", "--seq-len", "32", "--out", root / name, "--resume", *extra])


def test_resume_with_other_settings_refused(capsys, inputs):
    line = _resume_refused(capsys, inputs, "prev", {"seq_len": 64, "seed": 0})
    assert "--resume with seq_len = 32, but the run in --out used 64" in line


def test_real_command_line_prints_one_line(inputs):
    root, model, text = inputs
    proc = subprocess.run(
        [sys.executable, str(tiny.LAUNCH), "--model", str(model), "--data", str(text), "--tokens", "4096", "--out", str(root / "o3"),
         "--deepspeed", str(root / "broken.json")],
        env=tiny.env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, tiny.tail(proc)
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert "is not valid JSON/hjson" in proc.stderr and "Traceback" not in proc.stderr


def test_data_refused_after_setup_leaves_no_out_folder(tmp_path):
    """Data too short for one block is only known once tokenized: the run's new --out is removed again."""
    model = tiny.build_tiny_pruned(tmp_path / "model")
    short = tmp_path / "short.txt"
    short.write_text("Too short.\n")
    out = tmp_path / "run"
    proc = tiny.run([sys.executable, "-m", "prunext", "train", *tiny.train_args(model, short, out, "--tokens", "256")])
    assert proc.returncode == 2, tiny.tail(proc)
    err = [line for line in proc.stderr.splitlines() if line.startswith("prunext train: error: ")]
    assert len(err) == 1 and "fewer than one block" in err[0], tiny.tail(proc)
    assert not out.exists()

    # --overwrite empties an earlier run only once the new data are accepted
    (out / "checkpoints" / "step99").mkdir(parents=True)
    (out / "checkpoints" / "step99" / "mp_rank_00_model_states.pt").write_text("an earlier checkpoint")
    (out / "checkpoints" / "latest").write_text("step99")
    (out / "final").mkdir()
    (out / "final" / "stale.txt").write_text("an earlier model")
    (out / "metrics.jsonl").write_text("earlier run\n")
    before = sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))
    proc = tiny.run([sys.executable, "-m", "prunext", "train", *tiny.train_args(model, short, out, "--tokens", "256", "--overwrite")])
    assert proc.returncode == 2 and "fewer than one block" in proc.stderr, tiny.tail(proc)
    assert sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*")) == before
    text = tiny.write_text(tmp_path / "text.txt")
    proc = tiny.run([sys.executable, "-m", "prunext", "train", *tiny.train_args(model, text, out, "--tokens", "256", "--overwrite")])
    assert proc.returncode == 0, tiny.tail(proc)
    assert "earlier run" not in (out / "metrics.jsonl").read_text() and (out / "checkpoints" / "latest").read_text() != "step99"
    assert len(list((out / "data").glob("tokens-*.npy"))) == 1 and not (out / ".data-overwrite").exists()
    assert not (out / "checkpoints" / "step99").exists() and not (out / "final" / "stale.txt").exists()


def test_nan_loss_stops_naming_the_step(tmp_path):
    """A model whose output norm holds NaN gives a NaN loss at step 1: one line naming it, exit 2."""
    import torch

    from prunext.core.checkpoint import load_native, save_native

    model = load_native(tiny.build_tiny_pruned(tmp_path / "model"))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "out_norm" in n).fill_(float("nan"))
    save_native(model, tmp_path / "nan_model", tokenizer=None, overwrite=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tmp_path / "model" / name).exists():
            (tmp_path / "nan_model" / name).write_bytes((tmp_path / "model" / name).read_bytes())
    text, out = tiny.write_text(tmp_path / "text.txt"), tmp_path / "run"
    proc = tiny.run([sys.executable, "-m", "prunext", "train", *tiny.train_args(tmp_path / "nan_model", text, out, "--tokens", "256")])
    assert proc.returncode == 2, tiny.tail(proc)
    err = [line for line in proc.stderr.splitlines() if line.startswith("prunext train: error: ")]
    assert len(err) == 1 and "the loss is nan at step 1" in err[0] and "Last good checkpoint: none" in err[0], tiny.tail(proc)


def test_resume_with_norm_open_of_a_run_made_without_it_refused(capsys, inputs):
    """A checkpoint from before --norm-open existed has no such setting: the option was off there."""
    line = _resume_refused(capsys, inputs, "older", {"seq_len": 32, "seed": 0}, "--norm-open", "2")
    assert "--resume with norm_open_steps = 2, but the run in --out used None" in line
