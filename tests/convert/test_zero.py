"""ZeRO-3 checkpoints of a real 2-rank run -> native / HF folders on one process.

One tiny Qwen2-family pruned model (block 1 runs at positions 1 and 2,
position 2 with LoRA on all 7 linears and output norms, embeddings tied),
trained with ``torchrun`` on 2 ranks, ``--trainable all``, checkpoints at
steps 2 and 4; every case is derived from that one run:

- the newest tag converts, on one process, to exactly the run's ``final/``
  (shared tensors stored once), also sharded through the launcher script and
  in bfloat16;
- ``--format hf`` on it (output norms) is refused in one line, no folder;
- a newest tag without its completion marker, or missing a rank's file,
  falls back to the previous complete tag and says so.

A second run (LoRA only, no output norms, ``--trainable replacement`` so the
base is frozen and ZeRO-3 saves it as per-rank fragments) converts to a dense
Hugging Face model with the adapters merged whose logits, in a fresh process
that never imports prunext, equal the run's ``final/``.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunext  # noqa: F401  (registers the native format with AutoModelForCausalLM)
from prunext.cli import main
from prunext.core.checkpoint import iter_safetensors, read_safetensors_keys

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
import tiny  # noqa: E402

pytestmark = pytest.mark.integration

LAUNCH = tiny.REPO / "launch" / "convert_checkpoint.py"


FRESH_PROCESS = """
import sys, json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
assert not any(m.startswith("prunext") for m in sys.modules), "prunext was imported"
x = torch.tensor(json.loads(sys.argv[2]))
torch.save({"logits": model(x).logits, "cls": type(model).__name__, "layers": len(model.model.layers)}, sys.argv[3])
"""


def lora_only_plan():
    """Block 1 repeated at position 2 with LoRA on q/v/down, no output norms: expressible as a plain model."""
    from prunext.core.plan import Plan, Position

    return Plan((Position(0), Position(1), Position(1, lora_rank=4, lora_targets=("q_proj", "v_proj", "down_proj")), Position(3)), 4)


def build_tiny_qwen2_pruned(folder: Path, plan=None) -> Path:
    """tiny.tiny_plan() (repeated block 1 + LoRA + output norms) over a Qwen2-family tiny model (q/k/v biases)."""
    from conftest import make_tiny_hf, make_tiny_tokenizer

    from prunext.core.checkpoint import build_from_hf, save_native

    hf = make_tiny_hf("qwen2", layers=4, hidden=32, seed=0)
    torch.manual_seed(0)
    model = build_from_hf(hf, plan or tiny.tiny_plan(), out_norm_init=0.1)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.normal_(0, 0.02)
    save_native(model, folder, tokenizer=make_tiny_tokenizer())
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """OUT of a 2-rank ZeRO-3 run: 4 steps, checkpoints step2 and step4, final/."""
    root = tmp_path_factory.mktemp("zero_convert")
    model, text = build_tiny_qwen2_pruned(root / "model"), tiny.write_text(root / "text.txt")
    out = root / "run"
    args = tiny.train_args(model, text, out, "--tokens", "512", "--lr", "1e-2", "--trainable", "all", "--save-every", "2")
    proc = tiny.run(tiny.torchrun(2, *args), timeout=300)
    assert proc.returncode == 0, tiny.tail(proc)
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step2", "step4"]
    return out


@pytest.fixture(scope="module")
def run_lora(tmp_path_factory):
    """OUT of a 2-rank run of the LoRA-only plan, base frozen (--trainable replacement), 2 steps."""
    root = tmp_path_factory.mktemp("zero_convert_lora")
    model, text = build_tiny_qwen2_pruned(root / "model", lora_only_plan()), tiny.write_text(root / "text.txt")
    out = root / "run"
    args = tiny.train_args(model, text, out, "--tokens", "256", "--lr", "1e-2", "--trainable", "replacement")
    proc = tiny.run(tiny.torchrun(2, *args), timeout=300)
    assert proc.returncode == 0, tiny.tail(proc)
    return out


def stored(folder: Path) -> dict[str, torch.Tensor]:
    return dict(iter_safetensors(folder, read_safetensors_keys(folder)))


def test_checkpoint_converts_to_the_runs_final_weights(run, tmp_path):
    assert main(["convert", "--from", str(run / "checkpoints"), "--to", str(tmp_path / "native")]) == 0
    got, want = stored(tmp_path / "native"), stored(run / "final")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    # block 1 is stored once (at its home, position 1), the tied lm_head not at all; position 2 keeps its own parts
    assert "model.layers.1.self_attn.q_proj.weight" in got and "model.layers.2.self_attn.q_proj.weight" not in got
    assert "model.layers.2.self_attn.q_proj.lora_A" in got and "model.layers.2.attn_out_norm.weight" in got
    assert "lm_head.weight" not in got
    report = json.loads((tmp_path / "native" / "convert_report.json").read_text())
    assert report["tag"] == "step4" and report["positions"] == 4

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    layers = model.model.layers
    assert layers[1].self_attn.q_proj.weight.data_ptr() == layers[2].self_attn.q_proj.weight.data_ptr()
    assert model.config.base_model_type == "qwen2" and (tmp_path / "native" / "tokenizer.json").exists()


def test_launcher_shards_and_verifies_against_final(run, tmp_path):
    out = tmp_path / "sharded"
    proc = subprocess.run([sys.executable, str(LAUNCH), "--from", str(run / "checkpoints"), "--to", str(out),
                           "--max-shard-size", "40KB", "--verify"], env=tiny.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, tiny.tail(proc)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (out / "model.safetensors.index.json").exists() and not (out / "model.safetensors").exists()
    assert "max |logit difference| vs" in proc.stdout and "= 0 on (4, 32)" in proc.stdout, proc.stdout
    got, want = stored(out), stored(run / "final")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_bfloat16_output(run, tmp_path):
    assert main(["convert", "--from", str(run / "checkpoints"), "--to", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    got, want = stored(tmp_path / "bf16"), stored(run / "final")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_hf_format_with_output_norms_is_refused_in_one_line(run, tmp_path, capsys):
    code = main(["convert", "--from", str(run / "checkpoints"), "--to", str(tmp_path / "hf"), "--format", "hf"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "output feature normalization" in err and "[2]" in err
    assert list(tmp_path.iterdir()) == []


def _copy_checkpoints(run: Path, dest: Path) -> Path:
    """A copy of OUT without final/ (so the config comes from run_config.json's model folder)."""
    shutil.copytree(run / "checkpoints", dest / "checkpoints")
    shutil.copy(run / "run_config.json", dest / "run_config.json")
    return dest / "checkpoints"


@pytest.mark.parametrize("damage", ["no-marker", "missing-rank-file"])
def test_incomplete_newest_tag_falls_back_and_says_so(run, tmp_path, caplog, damage):
    ckpt = _copy_checkpoints(run, tmp_path / "run")
    if damage == "no-marker":  # killed after DeepSpeed's files, before prunext's barrier + marker
        (ckpt / "step4" / "prunext_state.json").unlink()
    else:  # one rank never finished writing
        (ckpt / "step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="prunext.convert.zero"):
        assert main(["convert", "--from", str(ckpt), "--to", str(tmp_path / "out")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step4 is incomplete" in w and "using step2" in w for w in warnings), warnings
    assert json.loads((tmp_path / "out" / "convert_report.json").read_text())["tag"] == "step2"

    # the same weights as asking for step2 on the intact run; and not step4's
    assert main(["convert", "--from", str(run / "checkpoints"), "--tag", "step2", "--to", str(tmp_path / "step2")]) == 0
    got, step2, final = stored(tmp_path / "out"), stored(tmp_path / "step2"), stored(run / "final")
    assert all(torch.equal(got[k], step2[k]) for k in step2)
    assert not torch.equal(got["model.layers.1.self_attn.q_proj.weight"], final["model.layers.1.self_attn.q_proj.weight"])


def test_asking_for_an_incomplete_tag_is_refused(run, tmp_path, capsys):
    ckpt = _copy_checkpoints(run, tmp_path / "run")
    (ckpt / "step4" / "prunext_state.json").unlink()
    code = main(["convert", "--from", str(ckpt), "--tag", "step4", "--to", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "incomplete" in err
    assert not (tmp_path / "out").exists()


def test_frozen_base_checkpoint_to_hf_equals_final_without_prunext(run_lora, tmp_path):
    tag = run_lora / "checkpoints" / "step2"
    states = torch.load(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", mmap=True, weights_only=False)
    assert "model.layers.1.self_attn.q_proj.weight" in states["frozen_param_shapes"]  # the base came as fragments
    assert main(["convert", "--from", str(run_lora / "checkpoints"), "--to", str(tmp_path / "native")]) == 0
    got, want = stored(tmp_path / "native"), stored(run_lora / "final")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    assert main(["convert", "--from", str(run_lora / "checkpoints"), "--to", str(tmp_path / "hf"), "--format", "hf"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_hidden_layers"] == 4
    dense = stored(tmp_path / "hf")
    assert not any("lora" in k for k in dense) and "model.layers.2.self_attn.q_proj.weight" in dense

    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(run_lora / "final").eval()
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    result = tmp_path / "out.pt"
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "hf"), json.dumps(x.tolist()), str(result)], check=True, timeout=300)
    fresh = torch.load(result)
    assert fresh["cls"] == "Qwen2ForCausalLM" and fresh["layers"] == 4
    with torch.no_grad():
        torch.testing.assert_close(fresh["logits"], final(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard", ["1GB", 60])
def test_streaming_writer_is_what_safetensors_reads(tmp_path, dtype, shard):
    """Headers first, then one tensor at a time: safetensors reads back every tensor, buffers keep their dtype."""
    from safetensors.torch import load_file

    from prunext.core.checkpoint import Lazy, write_stored_streaming

    torch.manual_seed(0)
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7), "ids": torch.arange(6).reshape(2, 3), "empty": torch.randn(0, 4)}
    stored = {k: Lazy(tuple(v.shape), lambda v=v: v.clone(), None if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
    names = write_stored_streaming(stored, tmp_path, dtype, shard, progress=False)
    assert (len(names) == 1) == (shard == "1GB")
    got = {}
    for name in names:
        if name.endswith(".safetensors"):
            got.update(load_file(str(tmp_path / name)))
    assert got.keys() == tensors.keys()
    for key, value in tensors.items():
        want = value.to(dtype) if value.is_floating_point() else value
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
