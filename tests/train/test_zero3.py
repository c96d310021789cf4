"""Real DeepSpeed ZeRO-3 runs on CPU (gloo, fp32) through the real launchers.

One tiny weight-shared model (block 1 runs at positions 1 and 2, position 2
with its own LoRA and output norms) and a few KB of Wikipedia text. Each run
is a subprocess with a timeout:

- run A, ``torchrun`` 2 ranks, ``--trainable all``: the loss falls, ``final/``
  loads with AutoModelForCausalLM and keeps the sharing;
- equivalence: ``torchrun -m prunext train`` 2 ranks x 3 steps ends with the
  parameters of plain single-process PyTorch on the same global batches;
- kill and resume: run A again, SIGKILLed after its second checkpoint, then
  ``--resume``: the losses and weights equal run A's;
- 2 nodes x 1 rank through the ``deepspeed`` launcher (``--no_ssh``,
  ``--node_rank``), ``--trainable replacement``: only adapters and output
  norms change; wandb logs offline;
- ``python launch/train.py`` (one process) with an absurd lr: it stops at
  the step whose gradients are not finite, keeping the last checkpoint.
- a partitioned load where DeepSpeed sees no fp16 kernels (AMD CPUs) is
  still fp32, bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import prunext  # noqa: F401  (registers the native format with AutoModelForCausalLM)
from prunext.core.checkpoint import load_native
from prunext.core.model import is_owned
from prunext.train.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

pytestmark = pytest.mark.integration

# Run A: 12 steps of 2 ranks x 2 blocks x 32 tokens, checkpoints every 2 steps.
RUN_A = ["--tokens", "1536", "--lr", "1e-2", "--trainable", "all", "--save-every", "2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    return tiny.build_tiny_pruned(root / "model"), tiny.write_text(root / "text.txt"), root


@pytest.fixture(scope="module")
def run_a(inputs):
    model, text, root = inputs
    out = root / "run_a"
    args = tiny.train_args(model, text, out, *RUN_A, "--eval-every", "4", "--eval-data", str(text), "--eval-windows", "4")
    proc = tiny.run(tiny.torchrun(2, *args), timeout=300)
    assert proc.returncode == 0, tiny.tail(proc)
    return out, proc


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_torchrun_two_ranks_loss_falls_and_final_loads(inputs, run_a):
    from transformers import AutoModelForCausalLM

    out, proc = run_a
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= records[0].keys()
    assert records[-1]["tokens"] == 12 * 128 and all(r["tokens_per_s"] > 0 for r in records)
    first, last = np.mean([r["loss"] for r in records[:2]]), np.mean([r["loss"] for r in records[-3:]])
    assert last < first - 0.5, [r["loss"] for r in records]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    settings = json.loads((out / "run_config.json").read_text())["settings"]
    assert settings["world_size"] == 2 and settings["steps"] == 12 and settings["zero_stage"] == 3
    assert "12 steps x 128 tokens/step = 1,536 tokens" in proc.stdout

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    layers = model.model.layers
    for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        a, b = layers[1].get_parameter(name), layers[2].get_parameter(name)
        assert a.data_ptr() == b.data_ptr()  # position 2 still runs block 1's tensors
    stored = _stored(out / "final")
    assert "model.layers.1.self_attn.q_proj.weight" in stored
    assert "model.layers.2.self_attn.q_proj.weight" not in stored  # the shared tensor is stored once
    assert "model.layers.2.self_attn.q_proj.lora_A" in stored
    before = _stored(inputs[0])
    assert not torch.equal(before["model.layers.1.self_attn.q_proj.weight"], stored["model.layers.1.self_attn.q_proj.weight"])


def test_final_is_the_last_checkpoint_streamed_without_a_gather(run_a, tmp_path):
    """final/ comes from step12's partitions through the streaming converter, not from a gathered model."""
    from prunext.cli import main

    out, proc = run_a
    assert "fp32 masters" in proc.stdout + proc.stderr  # rank 0 said where final/ came from
    converted = tmp_path / "converted"
    assert main(["convert", "--from", str(out / "checkpoints" / "step12"), "--to", str(converted)]) == 0
    final, again = _stored(out / "final"), _stored(converted)
    assert final.keys() == again.keys()
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "float32"
    assert not list(out.glob(".final-source-*"))  # the config-only source folder is gone


def test_checkpoints_are_complete_and_latest_is_last(run_a):
    out, _ = run_a
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step12"
    for step in (2, 4, 6, 8, 10, 12):
        state = json.loads((ckpt / f"step{step}" / "prunext_state.json").read_text())
        assert state["step"] == step and state["tokens"] == step * 128
        assert len(list((ckpt / f"step{step}").glob("*optim_states.pt"))) == 2  # one partition per rank


# Adam's step lr * m/(sqrt(v) + eps) is ill-conditioned where a gradient is near eps (1e-8): there a
# rounding difference in the gradient decides the step. The ranks sum 2 micro-batches on each of 2
# ranks, the reference one batch of 4, and fp32 sums in another order differ in the last bits (CPU
# GEMM kernels also vary with buffer alignment, so the same order is not even repeatable across
# processes). Measured on this model: elements whose gradient stays above 1e-6 match within 1.2e-7;
# the ~10% below it differ by up to 1.3e-6, and the tied embedding once by more than 1e-5. So the
# well-conditioned elements are held to 1e-6, the rest to a tenth of one step, and the global
# gradient norm, which Adam's scale invariance would hide (a doubled shared gradient leaves its
# update almost unchanged), to 1e-5 relative at every step.
WELL_CONDITIONED_GRAD = 1e-6


def _worst(diff: torch.Tensor, mask: torch.Tensor) -> float:
    return diff[mask].max().item() if mask.any() else 0.0


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_zero3_equals_single_process_pytorch(inputs, checkpointing):
    """Shared Parameters under ZeRO-3 get the sum of their positions' gradients: same result as plain PyTorch.

    With --grad-checkpointing too: non-reentrant recomputation must not count a
    shared weight's gradient twice (the reentrant failure of DeepSpeed #2103).
    """
    from prunext.train.data import BlockOrder, make_budget
    from prunext.train.schedule import lr_factor

    model_dir, text, root = inputs
    out = root / f"equiv-{checkpointing}"
    lr, wd, clip = 1e-3, 0.1, 0.5
    args = ["--model", model_dir, "--data", text, "--out", out, "--seq-len", "32", "--micro-batch", "1",
            "--grad-accum", "2", "--deepspeed", tiny.CPU_CONFIG, "--tokens", "384", "--trainable", "all",
            "--lr", lr, "--weight-decay", wd, "--max-grad-norm", clip, "--warmup", "1", "--schedule", "cosine",
            "--overwrite"] + (["--grad-checkpointing"] if checkpointing else [])
    proc = tiny.run(tiny.torchrun(2, *args, program=("-m", "prunext", "train")), timeout=300)
    assert proc.returncode == 0, tiny.tail(proc)

    # The same three global batches of 4 blocks, on one process, with torch's AdamW and clipping.
    model = load_native(model_dir).train()
    budget = make_budget(384, 32, micro=1, accum=2, world=2)
    assert budget.steps == 3
    order = BlockOrder(np.load(next((out / "data").glob("*.npy"))), 32, budget, seed=0)
    named = dict(model.named_parameters())
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, 3, 1, "cosine", 0.1))
    losses, norms = [], []
    smallest = {name: torch.full_like(p, float("inf")) for name, p in named.items()}  # min |clipped grad| per element
    for step in range(3):
        batch = order.batch(order.global_blocks(step))  # (4, 32)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, clip).item())
        for name, p in named.items():
            torch.minimum(smallest[name], p.grad.abs(), out=smallest[name])
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())

    records = read_metrics(out / "metrics.jsonl")
    assert [r["loss"] for r in records] == pytest.approx(losses, abs=1e-5)
    assert [r["grad_norm"] for r in records] == pytest.approx(norms, rel=1e-5)
    trained = dict(load_native(out / "final").named_parameters())
    start = dict(load_native(model_dir).named_parameters())
    assert trained.keys() == named.keys()
    shared = "model.layers.1.self_attn.q_proj.weight"  # runs at positions 1 and 2
    assert (named[shared] - start[shared]).abs().max() > 1e-4  # it really trained
    ill = 0
    for name, ref in named.items():
        well = smallest[name] >= WELL_CONDITIONED_GRAD
        diff = (trained[name] - ref.detach()).abs()
        assert _worst(diff, well) <= 1e-6, name
        assert _worst(diff, ~well) <= lr / 10, name
        ill += int((~well).sum())
    assert ill < 0.2 * sum(p.numel() for p in params)  # the loose bound covers a minority of elements


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and its ranks at once, as a crash would (torchrun puts each rank in its own session)."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=30)


def test_killed_run_resumes_to_the_same_losses(inputs, run_a):
    model, text, root = inputs
    out = root / "killed"
    args = tiny.train_args(model, text, out, *RUN_A)
    proc = subprocess.Popen(tiny.torchrun(2, *args), env=tiny.env(), cwd=tiny.REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if latest.exists() and latest.read_text() != "step2":  # the second checkpoint is complete
                break
            time.sleep(0.02)
    finally:
        _kill_tree(proc)
    assert not (out / "final").exists(), "the run finished before it was killed"
    taken = latest.read_text()

    resumed = tiny.run(tiny.torchrun(2, *args, "--resume"), timeout=300)
    assert resumed.returncode == 0, tiny.tail(resumed)
    assert f"resuming from {out / 'checkpoints' / taken}" in resumed.stderr + resumed.stdout
    expected = read_metrics(run_a[0] / "metrics.jsonl")
    got = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], abs=1e-6, rel=0)
    a, b = _stored(run_a[0] / "final"), _stored(out / "final")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


def test_two_nodes_deepspeed_launcher_trains_only_replacement(inputs):
    """Two 'nodes' on loopback: the launcher's --no_ssh path, one process per node rank."""
    model, text, root = inputs
    out = root / "two_nodes"
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = tiny.free_port()
    args = tiny.train_args(model, text, out, "--tokens", "768", "--lr", "5e-2", "--trainable", "replacement", "--report-to", "wandb")
    nodes = []
    for node_rank in (0, 1):
        cmd = [str(tiny.BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(tiny.LAUNCH), *map(str, args)]
        nodes.append(subprocess.Popen(cmd, env=tiny.env(), cwd=tiny.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=300)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                _kill_tree(node)
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "--local_rank=0" in logs[1]  # the launcher's extra argument was accepted
    settings = json.loads((out / "run_config.json").read_text())["settings"]
    assert settings["world_size"] == 2 and settings["steps"] == 6

    assert len(list((out / "wandb").glob("offline-run-*"))) == 1  # rank 0 only, offline without an API key

    before, after = _stored(model), _stored(out / "final")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    owned = {k for k in before if is_owned(k)}
    assert owned and changed == owned  # every adapter and output norm trained, nothing else moved


def test_one_process_stops_at_the_step_that_diverges(inputs):
    model, text, root = inputs
    out = root / "diverged"
    # At lr 1e20 the first update makes the attention scores overflow, so step 2's loss is NaN for certain;
    # a merely large lr (1e6) can instead saturate every RMSNorm and settle at a finite ln(vocab).
    args = tiny.train_args(model, text, out, "--tokens", "512", "--lr", "1e20", "--trainable", "all", "--save-every", "1")
    proc = tiny.run([sys.executable, str(tiny.LAUNCH), *map(str, args)], timeout=300)
    assert proc.returncode == 2, tiny.tail(proc)
    error = [line for line in proc.stderr.splitlines() if line.startswith("prunext train: error:")]
    assert len(error) == 1 and "not finite at step 2" in error[0] and "checkpoints/step1" in error[0], proc.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text() == "step1"
    assert not (out / "final").exists()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]


def test_partitioned_load_keeps_fp32_where_the_cpu_has_no_fp16(inputs, tmp_path):
    """zero.Init reads an explicit dtype wrongly without fp16 kernels: an fp32 load must still be fp32, bit for bit.

    On such CPUs (AMD EPYC) DeepSpeed made every parameter bf16, and a replacement-only run stored
    its frozen base rounded to 8 bits.
    """
    model_dir, _, _ = inputs
    got = tmp_path / "got.json"
    script = str(Path(__file__).parent / "_load_partitioned.py")
    proc = tiny.run(tiny.torchrun(2, model_dir, got, program=(script,)), timeout=180)
    assert proc.returncode == 0, tiny.tail(proc)
    params = json.loads(got.read_text())
    assert params and {dtype for dtype, _ in params.values()} == {"torch.float32"}
    assert all(equal for _, equal in params.values()), [name for name, (_, equal) in params.items() if not equal]
