"""--norm-lr / --adapter-lr / --norm-warmup: each parameter kind gets its own AdamW group, lr and warm-up."""

import sys
from pathlib import Path

import pytest
import torch

from prunext.core.checkpoint import build_from_hf, load_native
from prunext.train.recipe import group_lrs, make_optimizer
from prunext.train.schedule import make_scheduler
from prunext.train.trainable import freeze, group_of, param_groups

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("model.layers.2.attn_out_norm.weight", "norms"),
        ("model.layers.2.mlp_out_norm.bias", "norms"),
        ("model.layers.2.self_attn.q_proj.lora_A", "adapters"),
        ("model.layers.2.mlp.down_proj.lora_B", "adapters"),
        ("model.layers.1.self_attn.q_proj.weight", "base"),
        ("model.embed_tokens.weight", "base"),
    ],
)
def test_group_of(name, group):
    assert group_of(name) == group


def test_group_lrs_reach_the_optimizer_and_scheduler(tiny_hf):
    model = build_from_hf(tiny_hf(layers=4), tiny.tiny_plan())
    freeze(model, "all")
    groups = param_groups(model)
    assert list(groups) == ["norms", "adapters", "base"]
    settings = {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 4, "norm_lr": 5e-2, "adapter_lr": None,
                "norm_warmup_steps": 0, "adapter_warmup_steps": None}
    opt = make_optimizer(groups, settings, {})
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("norms", 5e-2), ("adapters", 1e-3), ("base", 1e-3)]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    sched = make_scheduler(opt, total=10, warmup=[w for _, w in group_lrs(settings, groups)], kind="constant", min_ratio=0.1)
    # first step: norms without warm-up at their full lr, the others at 1/4 of theirs
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-2, 1e-3 / 4, 1e-3 / 4])
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-2, 2e-3 / 4, 2e-3 / 4])


def test_norm_lr_reaches_the_zero3_run(tmp_path):
    """A real ZeRO-3 run: a tiny --norm-lr leaves the output norms where they started while adapters move."""
    model = tiny.build_tiny_pruned(tmp_path / "model")
    text = tiny.write_text(tmp_path / "text.txt")
    out = tmp_path / "run"
    args = tiny.train_args(model, text, out, "--tokens", "256", "--lr", "1e-2", "--norm-lr", "1e-12", "--save-every", "0")
    proc = tiny.run([sys.executable, "-m", "prunext", "train", *args])
    assert proc.returncode == 0, tiny.tail(proc)
    before, after = load_native(model), load_native(out / "final")
    moved = {}
    for (name, p0), (_, p1) in zip(before.named_parameters(), after.named_parameters()):
        if group_of(name) != "base":
            moved.setdefault(group_of(name), []).append((p1 - p0).abs().max().item())
    assert max(moved["norms"]) < 1e-9, moved["norms"]
    assert max(moved["adapters"]) > 1e-4, moved["adapters"]
