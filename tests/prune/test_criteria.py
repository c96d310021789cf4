"""prune --importance bi-iterative and ppl: each equals its definition computed on a model with the blocks deleted."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunext.cli import main
from prunext.prune.importance import (
    BlockScores,
    calibration_loss,
    score_blocks,
    score_blocks_best,
    score_blocks_iterative,
    score_blocks_ppl,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
import tiny  # noqa: E402


def _windows():
    return torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(3))


def _without(model, blocks):
    """A copy of ``model`` whose blocks ``blocks`` are really deleted."""
    other = copy.deepcopy(model)
    other.model.layers = nn.ModuleList(layer for i, layer in enumerate(other.model.layers) if i not in set(blocks))
    return other


def test_iterative_bi_removes_the_lowest_bi_of_the_model_without_the_earlier_ones(tiny_hf):
    hf = tiny_hf("llama", layers=6, hidden=32)
    windows = _windows()
    got = score_blocks_iterative(hf, windows, 3, batch_size=2, progress=False)
    removed: list[int] = []
    for _ in range(3):
        left = [i for i in range(6) if i not in removed]
        bi = score_blocks(_without(hf, removed), windows, "bi", progress=False).scores
        removed.append(left[min(range(len(left)), key=lambda j: bi[j])])
    assert got.order == removed
    first = score_blocks(hf, windows, "bi", progress=False)  # the whole model's BI, as best passes it
    assert score_blocks_iterative(hf, windows, 3, batch_size=2, progress=False, first=first).to_dict() == got.to_dict()
    assert got.least_important(3) == sorted(removed) and got.ranking()[:3] == removed
    with pytest.raises(ValueError, match="removed 3 blocks one by one, not 4"):
        got.least_important(4)
    assert json.loads(json.dumps(got.to_dict()))["order"] == removed
    assert "order" not in score_blocks(hf, windows, "bi", progress=False).to_dict()
    assert all(len(layer._forward_hooks) == 0 for layer in hf.model.layers)  # no block left skipped


def test_ppl_scores_are_the_loss_without_each_block(tiny_hf):
    hf = tiny_hf("llama", layers=4, hidden=32)
    windows = _windows()
    got = score_blocks_ppl(hf, windows, batch_size=2, progress=False)
    assert got.metric == "ppl" and got.tokens == windows.numel()
    for i in range(4):
        with torch.no_grad():
            want = _without(hf, [i])(input_ids=windows, labels=windows).loss.item()
        assert got.scores[i] == pytest.approx(want, rel=1e-5)
    assert got.least_important(1) == [min(range(4), key=lambda i: got.scores[i])]
    assert BlockScores("ppl", 1, [3.0, 1.0, 2.0], 10).ranking() == [1, 2, 0]


def test_best_keeps_the_criterion_whose_blocks_together_leave_the_lowest_loss(tiny_hf):
    hf = tiny_hf("llama", layers=6, hidden=32)
    windows = _windows()
    with torch.no_grad():
        want = _without(hf, [1, 4])(input_ids=windows, labels=windows).loss.item()
    assert calibration_loss(hf, windows, [1, 4], batch_size=2) == pytest.approx(want, rel=1e-5)
    got = score_blocks_best(hf, windows, 2, batch_size=2, progress=False)
    singles = {"bi": score_blocks(hf, windows, "bi", progress=False), "ppl": score_blocks_ppl(hf, windows, progress=False),
               "bi-iterative": score_blocks_iterative(hf, windows, 2, progress=False)}  # fmt: skip
    losses = {k: calibration_loss(hf, windows, s.least_important(2)) for k, s in singles.items()}
    assert got.candidates == pytest.approx(losses, rel=1e-5)
    winner = min(losses, key=losses.get)
    assert got.metric == winner and got.least_important(2) == singles[winner].least_important(2)
    assert json.loads(json.dumps(got.to_dict()))["candidates"] == got.candidates


@pytest.mark.parametrize("criterion", ["ppl", "bi-iterative", "best"])
def test_prune_cli_uses_the_criterion(tmp_path, criterion):
    from conftest import make_tiny_hf, make_tiny_tokenizer

    make_tiny_hf("llama", layers=6, hidden=32).save_pretrained(tmp_path / "src")
    make_tiny_tokenizer().save_pretrained(tmp_path / "src")
    text = tiny.write_text(tmp_path / "text.txt")
    out = tmp_path / "out"
    argv = ["prune", "--model", str(tmp_path / "src"), "--ratio", "0.3", "--method", "shortgpt-lora", "--calib", str(text),
            "--calib-tokens", "512", "--seq-len", "32", "--importance", criterion, "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["settings"]["metric"] == criterion
    assert report["scores"]["metric"] == criterion or (criterion == "best" and set(report["scores"]["candidates"]) ==
                                                         {"bi", "bi-iterative", "ppl"})  # fmt: skip
    scores = BlockScores(**{k: v for k, v in report["scores"].items() if k != "remove_first"})
    assert report["decision"]["pruned"] == scores.least_important(len(report["decision"]["pruned"]))
