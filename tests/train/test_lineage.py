"""prunext/train/lineage.py: one reader of where a folder came from, on folders prunext really wrote.

``train --token-fraction`` and ``--loss auto`` follow it: the built-in model's
pretraining tokens through prune and extend reports, the teacher through the
nearest prune/extend report.
"""

import argparse
import sys
from pathlib import Path

import pytest

from prunext.cli import main
from prunext.core.loading import BUILTIN_MODELS
from prunext.train.lineage import builtin_base, compressed_from, lineage, pretrain_tokens_of
from prunext.train.settings import resolve_tokens

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

PRETRAIN = BUILTIN_MODELS["smollm2-135m"].pretrain_tokens


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A plain 6-block HF folder with a tokenizer, and calibration text."""
    sys.path.insert(0, str(tiny.TESTS))
    from conftest import make_tiny_hf, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("lineage")
    make_tiny_hf("llama", layers=6).save_pretrained(root / "model")
    make_tiny_tokenizer().save_pretrained(root / "model")
    tiny.write_text(root / "calib.txt", chars=20000)
    return root


def _prune(model: str, out: Path, calib: str, *extra: str) -> Path:
    argv = ["prune", "--model", model, "--ratio", "0.3", "--method", "shortgpt", "--calib", calib,
            "--calib-tokens", "512", "--seq-len", "64", "--batch-size", "4", "--out", str(out), *extra]  # fmt: skip
    assert main(argv) == 0
    return out


def _extend(model: str, out: Path, layers: int) -> Path:
    assert main(["extend", "--model", model, "--to-layers", str(layers), "--out", str(out)]) == 0
    return out


def test_prune_and_extend_outputs_name_their_source(tiny_source, tmp_path):
    source = str(tiny_source / "model")
    pruned = _prune(source, tmp_path / "pruned", str(tiny_source / "calib.txt"))
    grown = _extend(source, tmp_path / "grown", 8)
    assert lineage(str(pruned)) == [("prune", source)]
    assert lineage(str(grown)) == [("extend", source)]
    assert compressed_from(str(pruned)) == compressed_from(str(grown)) == source
    assert lineage(source) == [] and builtin_base(str(pruned)) is None
    args = argparse.Namespace(tokens=None, token_fraction=0.01, pretrain_tokens=None, model=str(pruned))
    with pytest.raises(Exception, match="give --pretrain-tokens"):
        resolve_tokens(args)


def test_a_training_run_final_folder_leads_back_through_the_run(tiny_source, tmp_path):
    """OUT/final of a real 1-process run: its run_config.json names the model training started from."""
    source = str(tiny_source / "model")
    pruned = _prune(source, tmp_path / "pruned", str(tiny_source / "calib.txt"), "--method", "flexigpt")
    run = tmp_path / "run"
    proc = tiny.run([tiny.PYTHON, str(tiny.LAUNCH), *map(str, tiny.train_args(pruned, tiny_source / "calib.txt", run,
                                                                              "--tokens", "256", "--loss", "lm"))], timeout=300)
    assert proc.returncode == 0, tiny.tail(proc)
    final = str(run / "final")
    assert lineage(final) == [("train", str(pruned)), ("prune", source)]
    assert compressed_from(final) == source  # the teacher of --loss auto: the unpruned model


@pytest.mark.integration  # one short calibration pass over SmolLM2-135M
def test_token_fraction_of_models_pruned_and_extended_from_the_builtin(tmp_path):
    pruned = _prune("builtin:smollm2-135m", tmp_path / "pruned", "builtin:wiki:train")
    grown = _extend("builtin:smollm2-135m", tmp_path / "grown", 32)
    for folder in (pruned, grown):
        assert builtin_base(str(folder)) == "smollm2-135m" and pretrain_tokens_of(str(folder)) == PRETRAIN
        args = argparse.Namespace(tokens=None, token_fraction=0.001, pretrain_tokens=None, model=str(folder))
        assert resolve_tokens(args) == PRETRAIN // 1000
    args.pretrain_tokens = "3B"
    assert resolve_tokens(args) == 3_000_000
