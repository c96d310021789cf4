"""The command line: every verb has --help with an example; mistakes are one line and exit 2."""

import subprocess
import sys

import pytest

from prunext.cli import VERBS, build_parser, main


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help_with_an_example(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out.lower() and f"prunext {verb}" in out


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "prunext", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for verb in VERBS:
        assert verb in result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "./no/such/model", "--ppl", "builtin:wiki:test"], "does not exist"),
        (["eval", "--model", "builtin:smollm2-135m"], "nothing to evaluate"),
        (["eval", "--model", "builtin:smollm2-135m", "--ppl", "x.txt", "--seq-len", "1"], "too short"),
        (["eval", "--model", "builtin:smollm2-135m", "--ppl", "x.txt", "--seq-len", "64", "--max-tokens", "10"], "less than one window"),
        (["eval", "--model", "builtin:nope", "--ppl", "builtin:wiki:test"], "unknown built-in model"),
        (["convert", "--from", "/no/such/dir", "--to", "/tmp/prunext-never-written"], "does not exist"),
    ],
)
def test_user_mistakes_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err


def test_convert_refuses_non_empty_out_and_leaves_it_alone(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "--from", "builtin:smollm2-135m", "--to", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_model_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["eval", "--model", str(tmp_path), "--ppl", "builtin:wiki:test"]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_unsupported_architecture_is_refused(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    assert main(["eval", "--model", str(tmp_path), "--ppl", "builtin:wiki:test"]) == 2
    assert "not supported" in capsys.readouterr().err


def test_parser_builds():
    assert build_parser().prog == "prunext"
