"""A model folder whose tokenizer gives ids beyond the model's vocabulary is refused by every command that reads text.

The folder is a tiny Llama (vocabulary 128) saved with a tokenizer of 256
tokens: ordinary English text gives ids up to 255. Each command must exit 2
with one error line naming the vocabulary, and leave no output behind:
prune (--calib, with and without --offload), eval (--ppl, --tasks), train
(--data, --eval-data), and extend, which reads no text but would copy the
tokenizer into its output.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from prunext.cli import main
from prunext.data import check_tokenizer
from prunext.errors import ModelError

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
import tiny  # noqa: E402

MODEL_VOCAB = 128
MESSAGE = f"outside the model's vocabulary of {MODEL_VOCAB}"
# train makes --out before it tokenizes; the tokenizer check belongs right after the model loads.


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """A plain HF folder: 4-layer Llama with vocabulary 128, tokenizer of 256."""
    from conftest import make_tiny_hf, make_tiny_tokenizer

    folder = tmp_path_factory.mktemp("vocab") / "model"
    make_tiny_hf("llama", layers=4, vocab=MODEL_VOCAB).save_pretrained(folder)
    make_tiny_tokenizer(vocab=2 * MODEL_VOCAB).save_pretrained(folder)
    return folder


def _one_error_line(verb: str, stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"prunext {verb}: error: "), stderr[-3000:]
    return errors[0]


def test_check_tokenizer_takes_a_match_and_refuses_a_larger_vocabulary(tiny_tokenizer):
    check_tokenizer(tiny_tokenizer, MODEL_VOCAB, "tiny")  # ids 0..127 fit
    with pytest.raises(ModelError, match="gives token ids up to 127, outside the model's vocabulary of 100"):
        check_tokenizer(tiny_tokenizer, 100, "tiny")


@pytest.mark.parametrize("offload", [False, True], ids=["loaded", "offload"])
def test_prune_refuses(mismatched, tmp_path, capsys, offload):
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(mismatched), "--ratio", "0.3", "--calib-tokens", "256", "--seq-len", "32", "--out", str(out)]
    assert main(argv + (["--offload"] if offload else [])) == 2
    assert MESSAGE in _one_error_line("prune", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # no output folder, no partial one


@pytest.mark.parametrize(
    "what", [["--ppl", "builtin:wiki:test", "--seq-len", "32", "--max-tokens", "256"], ["--tasks", "piqa", "--limit", "2"]],
    ids=["ppl", "tasks"],
)
def test_eval_refuses(mismatched, tmp_path, capsys, what):
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(mismatched), *what, "--json", str(report)]) == 2
    assert MESSAGE in _one_error_line("eval", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_extend_refuses(mismatched, tmp_path, capsys):
    assert main(["extend", "--model", str(mismatched), "--to-layers", "6", "--out", str(tmp_path / "grown")]) == 2
    assert MESSAGE in _one_error_line("extend", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def _train(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """One process of ``prunext train`` (it starts a process group, so not in the test's own process)."""
    cmd = [sys.executable, "-m", "prunext", "train", "--model", str(model), "--out", str(out), "--tokens", "256",
           "--seq-len", "32", "--micro-batch", "2", "--deepspeed", str(tiny.CPU_CONFIG), "--trainable", "all", *extra]
    return tiny.run(cmd, timeout=180)


def test_train_refuses_data(mismatched, tmp_path):
    out = tmp_path / "run"
    proc = _train(mismatched, out, "--data", "builtin:wiki:test")
    assert proc.returncode == 2, tiny.tail(proc)
    assert MESSAGE in _one_error_line("train", proc.stderr)
    assert not out.exists()


def test_train_refuses_eval_data(mismatched, tmp_path):
    # Training text of digits only: under this tokenizer every id is below 128, so only --eval-data goes beyond.
    digits = tmp_path / "digits.txt"
    digits.write_text("\n\n".join(["123456789" * 20] * 8) + "\n")
    out = tmp_path / "run"
    proc = _train(mismatched, out, "--data", str(digits), "--eval-every", "1", "--eval-data", "builtin:wiki:test")
    assert proc.returncode == 2, tiny.tail(proc)
    assert MESSAGE in _one_error_line("train", proc.stderr)
    assert not out.exists()
