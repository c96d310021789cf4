"""Native folders written by prunext's own commands, once per session, for the portable-code and model-card tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
SOURCE_CARD = "---\nlicense: mit\n---\n\n# a tiny source model\n"


@pytest.fixture(scope="session")
def native_folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny 4-block Llama (with a card saying ``license: mit``), and what prunext makes of it:

    - ``pruned``: ``prune --method flexigpt`` (shared blocks, LoRA, output norms);
    - ``extended``: ``extend --to-layers 6`` (flexigpt, shared blocks);
    - ``final``: ``OUT/final`` of a one-process ZeRO-3 ``train`` of ``pruned`` (4 steps, held-out evaluation
      and a checkpoint every 2);
    - ``converted``: that run's newest checkpoint (step4) through ``convert``;
    - ``dense``: the source through ``convert --format hf``.
    """
    sys.path.insert(0, str(TESTS / "train"))
    import tiny
    from conftest import make_tiny_hf, make_tiny_tokenizer

    from prunext.cli import main

    root = tmp_path_factory.mktemp("native_folders")
    source, calib, run = root / "source", root / "calib.txt", root / "run"
    make_tiny_hf("llama", layers=4, hidden=32).save_pretrained(source)
    make_tiny_tokenizer().save_pretrained(source)
    (source / "README.md").write_text(SOURCE_CARD)
    tiny.write_text(calib, chars=20000)
    folders = {"source": source, "run": run}
    for name in ("pruned", "extended", "converted", "dense"):
        folders[name] = root / name
    folders["final"] = run / "final"

    assert main(["prune", "--model", str(source), "--ratio", "0.3", "--method", "flexigpt", "--calib", str(calib),
                 "--calib-tokens", "512", "--seq-len", "64", "--batch-size", "4", "--out", str(folders["pruned"])]) == 0
    assert main(["extend", "--model", str(source), "--to-layers", "6", "--out", str(folders["extended"])]) == 0
    args = tiny.train_args(folders["pruned"], calib, run, "--tokens", "256", "--loss", "lm", "--eval-every", "2",
                           "--eval-data", str(calib), "--eval-windows", "2", "--save-every", "2")
    proc = tiny.run([sys.executable, "-m", "prunext", "train", *map(str, args)], timeout=300)
    assert proc.returncode == 0, tiny.tail(proc)
    assert main(["convert", "--from", str(run / "checkpoints"), "--to", str(folders["converted"])]) == 0
    assert main(["convert", "--from", str(source), "--to", str(folders["dense"]), "--format", "hf"]) == 0
    return folders

