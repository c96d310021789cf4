"""prune --reconstruct-epochs: each position's own parameters fitted to the source's state at the same depth."""

import json
import sys
from pathlib import Path

import pytest
import torch

from prunext.cli import main
from prunext.core.plan import Plan, Position
from prunext.errors import UserError
from prunext.prune import methods
from prunext.prune.importance import BlockScores
from prunext.prune.ratio import ModelSizes, plan_budget
from prunext.prune.reconstruct import reconstruct, targets

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
import tiny  # noqa: E402

BI = [0.9, 0.1, 0.5, 0.3, 0.2, 0.8]  # blocks 1 and 4 go first


def _pruned(hf, method: str):
    sizes = ModelSizes.from_model(hf)
    budget = plan_budget(method, sizes, 0.25, adapter_rank=2)
    flexigpt = method == "flexigpt"
    weights = methods.block_weights(hf, range(sizes.num_blocks)) if flexigpt else None
    pruning = methods.decide(BlockScores("bi", 1, list(BI), 1000), budget, weights, filter_rank=2 if flexigpt else None,
                             kept_lora=0.5 if flexigpt else 0.0)  # fmt: skip
    torch.manual_seed(0)
    model = methods.build_model(hf, pruning, 0.01)
    if flexigpt:
        methods.init_adapters_svd(model, pruning, weights)
    return model.eval(), pruning


def _kl(model, source, ids) -> float:
    with torch.no_grad():
        t = source(input_ids=ids).logits.log_softmax(-1)
        s = model(input_ids=ids).logits.log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


def test_targets_match_depth():
    same = Plan(tuple(Position(b) for b in (0, 1, 0, 3)), 4)
    assert targets(same) == [0, 1, 2, 3]  # flexigpt: the depth is kept
    dropped = Plan(tuple(Position(b) for b in (0, 2, 5)), 6)
    assert targets(dropped) == [1, 4, 5]  # after kept block 2, the state before block 5 runs
    with pytest.raises(UserError, match="reorders or adds blocks"):
        targets(Plan(tuple(Position(b) for b in (0, 1, 1, 2, 3)), 4))  # an extended model


@pytest.mark.parametrize("method", ["flexigpt", "shortgpt-lora"])
def test_fit_brings_every_position_and_the_output_closer_to_the_source(tiny_hf, method):
    hf = tiny_hf("llama", layers=6)
    model, pruning = _pruned(hf, method)
    fit, held_out = (torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    shared = {n: p.detach().clone() for n, p in hf.named_parameters()}
    before = _kl(model, hf, held_out)
    report = reconstruct(model, hf, fit, epochs=4, lr=1e-2, progress=False)
    assert report["tokens"] == fit.numel() and report["token_passes"] == 5 * fit.numel()
    fitted = report["positions"]
    assert set(fitted) == {str(i) for i in pruning.trainable_positions}
    for pos, row in fitted.items():
        assert row["after"] <= row["before"] + 1e-9, (pos, row)
    assert any(row["after"] < 0.9 * row["before"] for row in fitted.values())
    assert _kl(model, hf, held_out) < before  # on windows it never saw
    for name, value in hf.named_parameters():  # the source (and the shared base blocks) untouched
        assert torch.equal(value, shared[name]), name
    assert all(p.requires_grad for p in model.parameters())  # left as it found them


def test_prune_cli_records_the_reconstruction(tmp_path):
    from conftest import make_tiny_hf, make_tiny_tokenizer

    make_tiny_hf("llama", layers=6, hidden=32).save_pretrained(tmp_path / "src")
    make_tiny_tokenizer().save_pretrained(tmp_path / "src")
    text = tiny.write_text(tmp_path / "text.txt")
    common = ["prune", "--model", str(tmp_path / "src"), "--ratio", "0.3", "--calib", str(text), "--calib-tokens", "512",
              "--seq-len", "32"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "rec"), "--reconstruct-epochs", "2", "--reconstruct-tokens", "256"]) == 0
    report = json.loads((tmp_path / "rec" / "prune_report.json").read_text())
    plain = json.loads((tmp_path / "plain" / "prune_report.json").read_text())
    assert "reconstruction" not in plain and plain["settings"].get("reconstruct_epochs") is None
    rebuilt = report["reconstruction"]
    assert rebuilt["tokens"] == 256 and rebuilt["epochs"] == 2 and rebuilt["token_passes"] == 768
    assert report["decision"] == plain["decision"]  # the same blocks and sources; only the adapters moved
    assert report["timings_s"]["reconstruct"] > 0
