"""``prunext extend`` end to end: output folder, report, flag checks, and the built-in model (integration)."""

from __future__ import annotations

import json

import pytest
import torch

from prunext.cli import build_parser, main
from prunext.core.checkpoint import load_native
from prunext.core.model import DEFAULT_OUT_NORM_INIT
from prunext.core.plan import LINEAR_NAMES, Plan, Position
from prunext.extend import recipe


@pytest.fixture
def hf_dir(tiny_hf, tiny_tokenizer, tmp_path):
    """A tiny plain Llama (4 blocks, hidden 32) saved as an HF folder with its tokenizer."""
    model = tiny_hf(family="llama", layers=4)
    folder = tmp_path / "src"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _ids() -> torch.LongTensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))


def _source_logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(_ids()).logits


def test_flexigpt_default_writes_native_folder_and_report(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["extend", "--model", str(hf_dir), "--to-layers", "6", "--out", str(out)]) == 0

    report = json.loads((out / "extend_report.json").read_text())
    assert report["source_layers"] == 4 and report["to_layers"] == 6
    s = report["settings"]
    assert (s["method"], s["mode"], s["blocks"]) == ("flexigpt", "block", [1, 2])  # documented default
    assert s["adapter_rank"] == 2  # hidden 32 / 16
    assert s["adapter_targets"] == list(LINEAR_NAMES) and s["out_norm_init"] == DEFAULT_OUT_NORM_INIT
    # 2 new positions x (rank 2 on the 7 linears of hidden 32 / kv 16 / mlp 64, plus 2 LayerNorms)
    per_position = 2 * (32 + 32) + 2 * 2 * (32 + 16) + 2 * (32 + 32) + 3 * 2 * (32 + 64) + 2 * 2 * 32
    assert report["params"]["new_stored"] == 2 * per_position
    assert report["params"]["after"] == report["params"]["before"] + 2 * per_position

    model = load_native(out)
    assert Plan.from_dict(report["plan"]) == model.plan
    assert [p.source for p in model.plan.positions] == [0, 1, 1, 2, 2, 3]
    assert (out / "tokenizer.json").is_file()
    printed = capsys.readouterr().out
    assert model.plan.describe() in printed and "4 -> 6 positions" in printed


def test_flexigpt_zero_norm_init_keeps_the_function(hf_dir, tmp_path):
    out = tmp_path / "out"
    args = ["extend", "--model", str(hf_dir), "--to-layers", "7", "--span", "0:3", "--out-norm-init", "0", "--out", str(out)]
    assert main(args) == 0
    model = load_native(out)
    lora = Position(0, 2, LINEAR_NAMES, out_norm=True)
    expected = [Position(0), Position(1), Position(2), lora, Position(1, 2, LINEAR_NAMES, out_norm=True),
                Position(2, 2, LINEAR_NAMES, out_norm=True), Position(3)]  # fmt: skip
    assert model.plan == Plan(tuple(expected), 4)
    assert json.loads((out / "extend_report.json").read_text())["settings"]["span"] == [0, 3]
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, _source_logits(hf_dir))


def test_flexigpt_custom_adapters_without_norms(hf_dir, tmp_path):
    out = tmp_path / "out"
    args = ["extend", "--model", str(hf_dir), "--to-layers", "6", "--blocks", "3,3", "--adapter-rank", "4",
            "--adapter-targets", "v_proj,q_proj", "--out-norm", "none", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    new = Position(3, 4, ("q_proj", "v_proj"))
    assert load_native(out).plan == Plan((Position(0), Position(1), Position(2), Position(3), new, new), 4)


def test_llama_pro_default_interleaves_and_keeps_the_function(hf_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["extend", "--model", str(hf_dir), "--to-layers", "6", "--method", "llama-pro", "--out", str(out)]) == 0
    report = json.loads((out / "extend_report.json").read_text())
    assert report["settings"]["blocks"] == [1, 3]  # one copy after each group of 2
    assert report["expansion"]["sources"] == [0, 1, 1, 2, 3, 3]
    model = load_native(out)
    assert model.plan == Plan.identity(6)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, _source_logits(hf_dir))


def test_solar_computes_the_overlap(hf_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["extend", "--model", str(hf_dir), "--to-layers", "6", "--method", "solar", "--out", str(out)]) == 0
    report = json.loads((out / "extend_report.json").read_text())
    assert report["settings"]["solar_overlap"] == 1
    assert report["expansion"]["sources"] == [0, 1, 2, 1, 2, 3]
    assert load_native(out).plan == Plan.identity(6)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--to-layers", "4"], "must exceed the model's current depth of 4"),
        (["--to-layers", "6", "--blocks", "1"], "lists 1 blocks but going from 4 to 6 adds 2"),
        (["--to-layers", "6", "--blocks", "1,9"], "out of range"),
        (["--to-layers", "6", "--blocks", "1;2"], "not a comma-separated list"),
        (["--to-layers", "6", "--span", "1-3"], "is not A:B"),
        (["--to-layers", "6", "--span", "1:4"], "repeats 3 blocks"),
        (["--to-layers", "6", "--mode", "block", "--span", "1:3"], "--span belongs to --mode sequential"),
        (["--to-layers", "6", "--mode", "sequential", "--blocks", "1,2"], "--blocks belongs to --mode block"),
        (["--to-layers", "7", "--mode", "sequential"], "does not fit"),
        (["--to-layers", "6", "--adapter-targets", "q_proj,fc1"], "must list distinct names"),
        (["--to-layers", "6", "--adapter-rank", "-1"], "must be >= 0"),
        (["--to-layers", "6", "--out-norm-init", "nan"], "finite number"),
        (["--to-layers", "6", "--method", "llama-pro", "--adapter-rank", "4"], "applies to --method flexigpt only"),
        (["--to-layers", "6", "--method", "solar", "--mode", "block"], "--method solar fixes its own layout"),
        (["--to-layers", "7", "--method", "solar"], "not one"),
        (["--to-layers", "6", "--method", "solar", "--solar-overlap", "0"], "not --to-layers 6"),
        (["--to-layers", "6", "--solar-overlap", "1"], "applies to --method solar only"),
    ],
)
def test_bad_flags_exit_2_with_one_line_and_write_nothing(hf_dir, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    assert main(["extend", "--model", str(hf_dir), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_existing_output_and_extended_sources_are_refused(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["extend", "--model", str(hf_dir), "--to-layers", "5", "--out", str(out)]) == 0
    assert main(["extend", "--model", str(hf_dir), "--to-layers", "5", "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["extend", "--model", str(hf_dir), "--to-layers", "6", "--out", str(out), "--overwrite"]) == 0
    assert len(load_native(out).plan) == 6
    assert main(["extend", "--model", str(out), "--to-layers", "8", "--out", str(tmp_path / "again")]) == 2
    assert "already has a pruned or extended plan" in capsys.readouterr().err


def test_help_documents_defaults_and_their_rationale():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["extend"]
    text = sub.format_help()
    assert "half-open" in text and "ShortGPT" in text and "Gromov" in text
    assert f"initial scale {DEFAULT_OUT_NORM_INIT:g}" in text
    assert "hidden/16" in text and "256 at hidden 4096" in text
    assert recipe.HELP and len(recipe.HELP.splitlines()) == 1


@pytest.mark.parametrize("method", ["flexigpt", "llama-pro"])
def test_dtype_is_kept_in_the_saved_model(hf_dir, tmp_path, method):
    out = tmp_path / "out"
    assert main(["extend", "--model", str(hf_dir), "--to-layers", "5", "--method", method, "--dtype", "bfloat16", "--out", str(out)]) == 0
    model = load_native(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------- integration
@pytest.mark.integration
def test_builtin_30_to_40_flexigpt_keeps_perplexity_at_init(builtin_model_dir, tmp_path):
    from prunext.core.loading import load_model
    from prunext.data import load_text_dataset, token_stream, windows
    from prunext.eval.perplexity import perplexity

    out = tmp_path / "smol-40"
    assert main(["extend", "--model", str(builtin_model_dir), "--to-layers", "40", "--out", str(out)]) == 0
    base, tokenizer = load_model(str(builtin_model_dir))
    extended = load_native(out)
    assert len(extended.plan) == 40 and len(extended.plan.base_blocks) == 30

    data = load_text_dataset("builtin:wiki:test")
    w = windows(token_stream(data["text"], tokenizer, max_tokens=4 * 256), 256)  # (4, 256)
    ppl_base = perplexity(base, w, "builtin:wiki:test", batch_size=2, progress=False).ppl
    ppl_ext = perplexity(extended, w, "builtin:wiki:test", batch_size=2, progress=False).ppl
    print(f"builtin:wiki:test 4x256 fp32: base ppl {ppl_base:.3f}, 30 -> 40 flexigpt ppl {ppl_ext:.3f}")
    # gamma = DEFAULT_OUT_NORM_INIT adds small normalised branch outputs: the model starts near the base
    assert abs(ppl_ext / ppl_base - 1) < 0.03

