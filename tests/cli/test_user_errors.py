"""User mistakes that no other test reaches, through the command line: one line, exit 2, no output.

Together with the tests named in the README's troubleshooting table, these
cover the UserErrors prunext raises. Each case here is refused before any
real work (the argument checks, or the first look at a model or data set).
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

from prunext.cli import main

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
import tiny  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny native model, broken model folders, and data files of each unusable kind."""
    from conftest import make_tiny_hf

    root = tmp_path_factory.mktemp("mistakes")
    tiny.build_tiny_pruned(root / "native")
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog.\n\n" * 50)
    make_tiny_hf("llama", layers=2).save_pretrained(root / "no_tokenizer")
    shutil.copytree(root / "native", root / "future_plan")
    config = json.loads((root / "future_plan" / "config.json").read_text())
    config["prunext_plan"]["version"] = 99
    (root / "future_plan" / "config.json").write_text(json.dumps(config))
    shutil.copytree(root / "no_tokenizer", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    shutil.copytree(root / "no_tokenizer", root / "bad_tokenizer")
    (root / "bad_tokenizer" / "tokenizer.json").write_text('{"broken')
    (root / "bad_json").mkdir()
    (root / "bad_json" / "config.json").write_text("{")
    (root / "junk.gguf").write_text("not a gguf file")
    (root / "no_data").mkdir()
    (root / "no_data" / "README.md").write_text("documents go elsewhere")
    (root / "table.csv").write_text("text\nhello\n")
    (root / "empty.txt").write_text("")
    (root / "list.json").write_text("[1, 2]")
    (root / "clip.json").write_text('{"gradient_clipping": -1}')
    (root / "stage5.json").write_text('{"zero_optimization": {"stage": 5}}')
    (root / "a_file").write_text("mine")
    return root


def _refused(capsys, argv: list) -> str:
    verb = argv[0]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"prunext {verb}: error: "), err[-3000:]
    return errors[0]


EVAL = [
    (["--tasks", " , "], "names no task"),
    (["--ppl", "builtin:wiki:test", "--limit", "2"], "--limit applies to zero-shot --tasks"),
    (["--tasks", "piqa", "--limit", "0"], "--limit 0 must be at least 1 item"),
    (["--ppl", "builtin:wiki:test", "--batch-size", "0"], "--batch-size must be at least 1"),
]


@pytest.mark.parametrize(("extra", "fragment"), EVAL)
def test_eval_arguments(capsys, tmp_path, extra, fragment):
    assert fragment in _refused(capsys, ["eval", "--model", "builtin:smollm2-135m", *extra, "--json", tmp_path / "r.json"])
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ("bad_json", "config.json is not valid JSON"),
        ("no_tokenizer", "has no tokenizer"),
        ("junk.gguf", "could not read GGUF file"),
        ("future_plan", "plan version 99 is not supported"),
        ("table.csv", "is a file but not a .gguf model"),
        ("bad_tokenizer", "no usable tokenizer in"),
        ("truncated", "could not load the weights of"),
    ],
)
def test_unusable_model_folders(capsys, files, tmp_path, model, fragment):
    assert fragment in _refused(capsys, ["eval", "--model", files / model, "--tasks", "piqa", "--json", tmp_path / "r.json"])
    assert not (tmp_path / "r.json").exists()


PRUNE = [
    (["--no-filter", "--filter-rank", "4"], "--no-filter and --filter-rank contradict each other"),
    (["--batch-size", "0"], "--batch-size 0 must be a positive integer"),
    (["--out", "{root}/a_file"], "is a file; give a folder path"),
    (["--model", "{root}/no_data", "--offload"], "--offload reads a model folder"),
    (["--reconstruct-tokens", "512"], "--reconstruct-tokens and --reconstruct-lr need --reconstruct-epochs"),
    (["--reconstruct-epochs", "-1"], "--reconstruct-epochs -1 must be 0 (off) or more"),
    (["--reconstruct-epochs", "1", "--method", "shortgpt"], "which shortgpt does not add; use flexigpt or shortgpt-lora"),
    (["--reconstruct-epochs", "1", "--offload"], "--reconstruct-epochs runs the whole model, which --offload avoids"),
    (["--reconstruct-epochs", "1", "--reconstruct-lr", "0"], "--reconstruct-lr 0.0 must be a positive number"),
    (["--reconstruct-epochs", "1", "--reconstruct-tokens", "8"], "--reconstruct-tokens 8 is less than one window"),
    (["--importance", "ppl", "--method", "angular"], "--importance applies to flexigpt, shortgpt, shortgpt-lora"),
    (["--importance", "bi-iterative", "--offload"], "--importance bi-iterative runs the whole model"),
]


@pytest.mark.parametrize(("extra", "fragment"), PRUNE)
def test_prune_arguments(capsys, files, tmp_path, extra, fragment):
    argv = ["prune", "--model", files / "no_tokenizer", "--ratio", "0.3", "--out", tmp_path / "out"]
    assert fragment in _refused(capsys, argv + [e.format(root=files) for e in extra])
    assert list(tmp_path.iterdir()) == [] and (files / "a_file").read_text() == "mine"


TRAIN = [
    (["--save-every", "-1"], "--save-every -1 must be >= 0 (0 = off)"),
    (["--warmup", "-1"], "--warmup -1.0 must be a number >= 0"),
    (["--dist-timeout", "0"], "--dist-timeout 0.0 must be positive"),
    (["--stop-at", "0"], "--stop-at 0 must be a step >= 1"),
    (["--pretrain-tokens", "2T"], "--pretrain-tokens goes with --token-fraction"),
    (["--tokens", "0"], "--tokens '0' must be at least 1 token"),
    (["--deepspeed", "{root}/clip.json"], "gradient_clipping is -1; it must be a number >= 0"),
    (["--deepspeed", "{root}/list.json"], "must hold a JSON object"),
    (["--deepspeed", "{root}/stage5.json"], "zero_optimization.stage 5"),
    (["--data", "{root}/no_data"], "has no .txt, .jsonl, .json or .parquet files"),
    (["--data", "{root}/table.csv"], "is not a .txt, .jsonl, .json or .parquet file"),
    (["--data", "{root}/empty.txt"], "is empty"),
    (["--data", "builtin:wiki:dev"], "unknown built-in data"),
    (["--eval-every", "1", "--eval-data", "{root}/empty.txt"], "is empty"),
    (["--hidden-weight", "1", "--loss", "lm"], "--hidden-weight distils hidden states from a teacher"),
    (["--hidden-weight", "-1", "--loss", "kd", "--teacher", "{root}/native"], "--hidden-weight -1.0 must be a number >= 0"),
]


@pytest.mark.parametrize(("extra", "fragment"), TRAIN)
def test_train_arguments_and_data(capsys, files, tmp_path, extra, fragment):
    argv = ["train", "--model", files / "native", "--data", files / "text.txt", "--tokens", "4096", "--seq-len", "32",
            "--out", tmp_path / "run"]
    assert fragment in _refused(capsys, argv + [e.format(root=files) for e in extra])
    assert not (tmp_path / "run").exists()


def test_convert_checkpoint_flags_on_a_model_folder(capsys, files, tmp_path):
    line = _refused(capsys, ["convert", "--from", files / "native", "--tag", "step1", "--to", tmp_path / "out"])
    assert "--tag applies to a DeepSpeed checkpoint --from" in line
    assert not (tmp_path / "out").exists()


def test_convert_shard_size(capsys, files, tmp_path):
    line = _refused(capsys, ["convert", "--from", files / "native", "--to", tmp_path / "out", "--max-shard-size", "lots"])
    assert "--max-shard-size lots is not a size" in line
    assert not (tmp_path / "out").exists()


def test_demo_nproc(capsys, tmp_path):
    assert "--nproc must be at least 1" in _refused(capsys, ["demo", "--nproc", "0", "--out", tmp_path / "demo"])


def test_training_data_without_text(tiny_tokenizer, tmp_path):
    # Reached only once training tokenizes (documents that are all blank pass the data set checks).
    from prunext.errors import DataError
    from prunext.train.data import tokenize_to_file

    with pytest.raises(DataError, match="the training data holds no text"):
        tokenize_to_file([{"text": "  "}, {"text": "\n"}], tiny_tokenizer, 100, tmp_path / "tokens.npy", 128)
    assert list(tmp_path.iterdir()) == []
