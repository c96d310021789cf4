"""``prunext generate`` end to end: streamed text, JSON, speculative equals plain, bad input in one line."""

import json
import subprocess
import sys

import pytest

from prunext.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny pruned native folder (position 2 replaces block 2 with block 1) and a tiny plain HF folder."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "train"))
    from conftest import make_tiny_hf, make_tiny_tokenizer
    from tiny import build_tiny_pruned

    root = tmp_path_factory.mktemp("generate")
    build_tiny_pruned(root / "pruned")
    make_tiny_hf("llama", layers=4).save_pretrained(root / "plain")
    make_tiny_tokenizer().save_pretrained(root / "plain")
    (root / "long.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    return root


def _gen(model, *extra):
    return ["generate", "--model", str(model), "--prompt", "The quick brown fox", *extra]


def test_speculative_text_equals_plain_and_json_records_it(models, tmp_path, capsys):
    assert main(_gen(models / "pruned", "--max-new-tokens", "24", "--json", str(tmp_path / "plain.json"))) == 0
    plain_out = capsys.readouterr()
    assert main(_gen(models / "pruned", "--max-new-tokens", "24", "--speculative", "self", "--draft-tokens", "3",
                     "--json", str(tmp_path / "spec.json"))) == 0  # fmt: skip
    spec_out = capsys.readouterr()
    plain, spec = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "spec"))
    assert spec["text"] == plain["text"] and spec["new_tokens"] == plain["new_tokens"] > 0
    assert plain_out.out == spec_out.out == plain["text"] + "\n"  # the text streamed to stdout, nothing else
    assert spec["speculative"] and spec["draft_skip"] == [2] and spec["draft_tokens"] == 3
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["drafted"] >= spec["accepted"]
    assert "acceptance_rate" not in plain and not plain["speculative"]
    for key in ("prompt", "prompt_tokens", "prefill_s", "decode_s", "tokens_per_s", "decode_tokens_per_s"):
        assert key in spec, key
    assert spec["prompt"] == "The quick brown fox" and spec["prompt_tokens"] > 0
    assert "acceptance" in spec_out.err


def test_sampling_is_seeded(models, tmp_path, capsys):
    runs = []
    for seed in ("1", "1", "2"):
        assert main(_gen(models / "pruned", "--temperature", "1.5", "--top-p", "0.95", "--seed", seed, "--speculative", "self",
                         "--max-new-tokens", "20")) == 0  # fmt: skip
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("plain", ["--speculative", "self"], "runs every block once"),
        ("pruned", ["--speculative", "self", "--draft-skip", "2,7"], "--draft-skip 7: the model has positions 0..3"),
        ("pruned", ["--speculative", "self", "--draft-skip", "two"], "is not a list of positions"),
        ("pruned", ["--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
        ("pruned", ["--top-p", "0.9"], "--top-p apply to sampling"),
        ("pruned", ["--seed", "3"], "--seed apply to sampling"),
        ("pruned", ["--temperature", "0"], "--temperature 0 must be a positive number"),
        ("pruned", ["--temperature", "1", "--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
        ("pruned", ["--draft-tokens", "4"], "apply to --speculative self"),
        ("pruned", ["--speculative", "self", "--draft-tokens", "0"], "--draft-tokens 0 must be at least 1"),
        ("pruned", ["--prompt-file", "long.txt"], "and the model's context is 256"),
        ("pruned", ["--prompt-file", "missing.txt"], "does not exist"),
        ("pruned", ["--json", "exists.json"], "exists; choose another file or pass --overwrite"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(models, tmp_path, capsys, monkeypatch, model, extra, message):
    monkeypatch.chdir(models)
    (models / "exists.json").write_text("{}")
    args = ["generate", "--model", str(models / model), *extra]
    if "--prompt-file" not in extra:
        args += ["--prompt", "The quick brown fox"]
    if "--json" not in extra:
        args += ["--json", str(tmp_path / "out.json")]
    assert main(args) == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("prunext generate: error: ") and message in last, last
    assert captured.out == ""
    assert not (tmp_path / "out.json").exists() and (models / "exists.json").read_text() == "{}"


def test_help_lists_generate():
    out = subprocess.run([sys.executable, "-m", "prunext", "generate", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--speculative" in out and "--draft-skip" in out and "examples:" in out


@pytest.mark.integration
def test_builtin_model_greedy_speculative_equals_plain(builtin_model_dir):
    """The built-in SmolLM2-135M: a draft without 8 middle positions, greedy tokens equal model.generate's."""
    from prunext.core.loading import load_model
    from prunext.generate import SelfDraft, decode, speculative_decode

    model, tokenizer = load_model(str(builtin_model_dir))
    ids = tokenizer("The history of the city of Paris began", return_tensors="pt").input_ids
    reference = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
    assert decode(model, ids, 40).tokens == reference
    result = speculative_decode(model, ids, 40, SelfDraft(model, list(range(10, 18))), draft_tokens=4)
    assert result.tokens == reference
    assert 0 < result.accepted < result.drafted
