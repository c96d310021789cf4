"""``prunext prune`` end to end: checks before work, outputs, offloaded and two-process runs, the built-in model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import prunext  # noqa: F401  (registers the native format)
from prunext.cli import main
from prunext.core.plan import Plan
from prunext.prune.report import DISTANCE_PLOT, IMPORTANCE_PLOT, REPORT_FILE

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Wikipedia is a free online encyclopedia written by volunteers.",
    "Anarchism is a political philosophy and movement.",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny 6-block Llama saved as a plain HF folder with its tokenizer, and a calibration text file."""
    from conftest import make_tiny_hf, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("prune")
    make_tiny_hf("llama", layers=6).save_pretrained(root / "model")
    make_tiny_tokenizer().save_pretrained(root / "model")
    lines = [" ".join(SENTENCES[(i + j) % 3] for j in range(i % 5 + 1)) for i in range(200)]
    (root / "calib.txt").write_text("\n".join(lines) + "\n")
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(root / "model"), "--calib", str(root / "calib.txt"), "--calib-tokens", "1024",
            "--seq-len", "32", "--batch-size", "4", "--out", str(out), *extra]  # fmt: skip


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _assert_same_model(a: Path, b: Path, atol: float = 0.0) -> None:
    ra, rb = json.loads((a / REPORT_FILE).read_text()), json.loads((b / REPORT_FILE).read_text())
    assert ra["decision"] == rb["decision"]
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ratio", "1.5"], "--ratio 1.5 must be a fraction strictly between 0 and 1"),
        (["--ratio", "0"], "strictly between 0 and 1"),
        (["--ratio", "0.3", "--method", "shortgpt", "--no-filter"], "--no-filter applies to --method flexigpt only"),
        (["--ratio", "0.3", "--method", "angular", "--adapter-rank", "4"], "--adapter-rank applies to flexigpt and shortgpt-lora"),
        (["--ratio", "0.3", "--calib-tokens", "16"], "less than one window"),
        (["--ratio", "0.3", "--out-norm-init", "-1"], "--out-norm-init -1.0 must be a finite number >= 0"),
        (["--ratio", "0.9"], "ratio 0.9 would prune all 6 blocks; use a smaller --ratio"),
        (["--ratio", "0.3", "--adapter-rank", "64"], "--adapter-rank 64 exceeds the smallest linear dimension 16"),
        (["--ratio", "0.3", "--out-norm-init", "fit", "--out-norm", "none"], "--out-norm-init fit needs output norms"),
        (["--ratio", "0.3", "--kept-lora", "1"], "--kept-lora 1.0 must be in [0, 1)"),
        (["--ratio", "0.25", "--kept-lora", "0.9"], "--kept-lora 0.9 leaves a replacement without an adapter; use at most 0.50"),
        (["--ratio", "0.3", "--method", "shortgpt-lora", "--kept-lora", "0.5"], "--kept-lora applies to --method flexigpt only"),
    ],
)
def test_bad_input_is_one_line_before_any_output(tiny_dir, tmp_path, capsys, extra, message):
    assert main(_args(tiny_dir, tmp_path / "out", *extra)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers may draw a loading bar before it)
    assert last.startswith("prunext prune: error: ") and message in last
    assert not (tmp_path / "out").exists()


def test_existing_output_folder_is_refused_without_overwrite(tiny_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(_args(tiny_dir, tmp_path / "out", "--ratio", "0.3")) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_flexigpt_writes_model_report_and_plots(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_dir, out, "--ratio", "0.25")) == 0
    printed = capsys.readouterr().out
    assert "adapter_rank   2" in printed and "pruned -> source" in printed and "of all params" in printed
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["settings"]["adapter_rank"] == 2 and report["settings"]["filter_rank"] == 2  # hidden 32 / 16
    decision, params = report["decision"], report["params"]
    assert len(decision["pruned"]) == params["count"] == 2
    d = report["distances"]
    assert d["rows_pruned"] == decision["pruned"] and d["columns_kept"] == decision["kept"]
    for row, i in enumerate(d["rows_pruned"]):
        values = d["values"][row]
        assert decision["sources"][str(i)] == d["columns_kept"][values.index(min(values))]
    assert params["total_params_after_counted"] == params["total_params_after"]
    assert set(report["timings_s"]) == {"scoring", "matching_svd", "build_save"}
    assert report["settings"]["metric"] == "best" and len(report["scores"]["scores"]) == 6  # flexigpt's default
    assert report["scores"]["metric"] in ("bi", "bi-iterative", "ppl")
    for plot in (IMPORTANCE_PLOT, DISTANCE_PLOT):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.plan == Plan.from_dict(decision["plan"])
    assert sum(p.numel() for p in model.parameters()) == params["total_params_after"]
    assert (out / "tokenizer.json").exists()


def test_ablation_switches_reach_the_model(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert main(_args(tiny_dir, out, "--ratio", "0.25", "--kept-lora", "0", "--no-filter", "--no-svd-init", "--out-norm", "none")) == 0
    settings = json.loads((out / REPORT_FILE).read_text())["settings"]
    assert (settings["svd_init"], settings["out_norm"], settings["filter_rank"]) == (False, "none", None)
    model = AutoModelForCausalLM.from_pretrained(out)
    replaced = [i for i, p in enumerate(model.plan.positions) if p.has_lora]
    assert len(replaced) == 2 and not model.plan.has_out_norm
    for i in replaced:
        assert torch.count_nonzero(model.model.layers[i].mlp.up_proj.lora_B) == 0


def test_hybrid_saves_and_reloads_with_its_per_position_ranks(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_dir, out, "--ratio", "0.25", "--kept-lora", "0.5")) == 0
    assert "rank units on kept blocks" in capsys.readouterr().out
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["settings"]["kept_lora"] == 0.5
    model = AutoModelForCausalLM.from_pretrained(out)
    ranks = [p.lora_rank for p in model.plan.positions]
    pruned = report["decision"]["pruned"]
    assert sum(ranks) == 2 * 2 and all(ranks[i] == 1 for i in pruned)  # 2 replacements x rank 2, half moved
    assert sum(p.numel() for p in model.parameters()) == report["params"]["total_params_after"]
    assert report["decision"]["trainable_positions"] == [i for i, r in enumerate(ranks) if r or i in pruned]


def test_fitted_output_norms_are_reported_and_reload(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert main(_args(tiny_dir, out, "--ratio", "0.25", "--out-norm-init", "fit")) == 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["settings"]["out_norm_init"] == "fit" and "fit_norms" in report["timings_s"]
    pruned = report["decision"]["pruned"]
    assert set(report["out_norm_fit"]) == {str(i) for i in pruned}
    model = AutoModelForCausalLM.from_pretrained(out)
    for i in pruned:
        weight = model.model.layers[i].attn_out_norm.weight
        assert not torch.allclose(weight, torch.full_like(weight, 0.01))


def test_an_already_pruned_model_is_refused(tiny_dir, tmp_path, capsys):
    assert main(_args(tiny_dir, tmp_path / "once", "--ratio", "0.3", "--method", "shortgpt")) == 0
    args = _args(tiny_dir, tmp_path / "twice", "--ratio", "0.3")
    args[args.index("--model") + 1] = str(tmp_path / "once")
    assert main(args) == 2
    assert "prune/extend a plain or identity-plan model" in capsys.readouterr().err


def test_baseline_writes_no_distance_plot(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert main(_args(tiny_dir, out, "--ratio", "0.3", "--method", "angular")) == 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["scores"]["metric"] == "angular" and report["scores"]["window"] == 2
    assert "distances" not in report and not (out / DISTANCE_PLOT).exists()
    assert len(AutoModelForCausalLM.from_pretrained(out).plan) == 4


def test_offloaded_scoring_builds_the_same_model(tiny_dir, tmp_path):
    assert main(_args(tiny_dir, tmp_path / "mem", "--ratio", "0.25", "--importance", "bi")) == 0  # what --offload uses
    assert main(_args(tiny_dir, tmp_path / "off", "--ratio", "0.25", "--offload")) == 0
    _assert_same_model(tmp_path / "mem", tmp_path / "off")


@pytest.mark.parametrize(
    "family, extra",
    [
        ("llama", ["--kept-lora", "0.5"]),  # the hybrid: kept blocks' random A matrices too
        ("llama", ["--no-filter", "--kept-lora", "0"]),  # raw-weight distances, one kept block at a time
        ("llama", ["--method", "shortgpt-lora"]),
        ("phi3", []),  # fused linears: each part read as its rows
        ("gemma2", []),  # sandwich norms: output norms start from the block's gain, read as a vector
        ("olmo2", ["--svd-solver", "randomized"]),
    ],
    ids=["hybrid", "no-filter", "shortgpt-lora", "phi3", "gemma2", "olmo2-randomized"],
)
def test_offload_from_a_sharded_folder_writes_what_loading_writes(tiny_dir, tmp_path, family, extra):
    """Every step of --offload (matching, SVD start, building, saving) reads the shards tensor by tensor."""
    from conftest import make_tiny_hf, make_tiny_tokenizer

    source = tmp_path / "source"
    make_tiny_hf(family, layers=6, tie=False).save_pretrained(source, max_shard_size="20KB")
    make_tiny_tokenizer().save_pretrained(source)
    assert len(list(source.glob("*.safetensors"))) > 5
    args = ["prune", "--model", str(source), "--calib", str(tiny_dir / "calib.txt"), "--calib-tokens", "1024",
            "--seq-len", "32", "--batch-size", "4", "--ratio", "0.3", "--importance", "bi", *extra]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "mem")]) == 0  # --importance bi: what --offload chooses with
    assert main([*args, "--out", str(tmp_path / "off"), "--offload"]) == 0
    _assert_same_model(tmp_path / "mem", tmp_path / "off")
    for name in ("config.json", "generation_config.json", "modeling_prunext.py", "tokenizer.json"):
        assert (tmp_path / "off" / name).read_bytes() == (tmp_path / "mem" / name).read_bytes(), name
    report = json.loads((tmp_path / "off" / REPORT_FILE).read_text())
    assert report["settings"]["offload"] is True


def test_offload_refuses_fitted_output_norms(tiny_dir, tmp_path, capsys):
    assert main(_args(tiny_dir, tmp_path / "out", "--ratio", "0.3", "--offload", "--out-norm-init", "fit")) == 2
    assert "--out-norm-init fit runs the whole model forward" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.integration  # ~30 s each: two interpreters importing torch and transformers
@pytest.mark.parametrize("extra", [[], ["--offload", "--kept-lora", "0.5"]], ids=["loaded", "offload-hybrid"])
def test_two_processes_write_what_one_process_writes(tiny_dir, tmp_path, extra):
    """Scoring windows, distance rows, factors and SVD starts are split over the ranks, then combined."""
    assert main(_args(tiny_dir, tmp_path / "one", "--ratio", "0.25", *extra)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_endpoint", "localhost:0",
           "--rdzv_backend", "c10d", "-m", "prunext", *_args(tiny_dir, tmp_path / "two", "--ratio", "0.25", *extra)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size     2" in proc.stdout
    _assert_same_model(tmp_path / "one", tmp_path / "two", atol=1e-6)
    one, two = (json.loads((tmp_path / d / REPORT_FILE).read_text()) for d in ("one", "two"))
    assert one["scores"]["tokens"] == two["scores"]["tokens"]
    torch.testing.assert_close(torch.tensor(one["scores"]["scores"]), torch.tensor(two["scores"]["scores"]), rtol=0, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".two")]  # only rank 0 wrote, nothing left over


def _perplexity(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].float()  # (n, seq-1, vocab)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(loss.item())


@pytest.mark.integration  # several minutes on 2 CPU cores: five calibration passes over SmolLM2-135M
def test_builtin_model_at_30_percent_every_method_has_finite_perplexity(builtin_model_dir, tmp_path, capsys):
    from prunext.core.loading import load_model
    from prunext.data import load_text_dataset, token_stream, windows

    dense, tokenizer = load_model("builtin:smollm2-135m")
    texts = load_text_dataset("builtin:wiki:test")["text"]
    eval_windows = windows(token_stream(texts, tokenizer, max_tokens=2 * 256), 256)  # (2, 256)
    perplexities = {"dense": _perplexity(dense, eval_windows)}
    for method in ("flexigpt", "shortgpt", "shortgpt-lora", "streamline", "angular"):
        out = tmp_path / method
        args = ["prune", "--model", "builtin:smollm2-135m", "--ratio", "0.3", "--method", method,
                "--calib-tokens", "4096", "--seq-len", "256", "--batch-size", "16", "--out", str(out)]  # fmt: skip
        assert main(args) == 0
        report = json.loads((out / REPORT_FILE).read_text())
        assert report["params"]["block_fraction"] >= 0.3
        perplexities[method] = _perplexity(AutoModelForCausalLM.from_pretrained(out), eval_windows)
    with capsys.disabled():
        print("\nperplexity, builtin:wiki:test, 2 x 256 tokens, fp32:", json.dumps(perplexities, indent=1))
    for method, ppl in perplexities.items():
        assert math.isfinite(ppl) and ppl > 1, method
        assert method == "dense" or ppl > perplexities["dense"], method  # unhealed pruning costs perplexity
