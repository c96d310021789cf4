"""prunext/core/card.py: the README.md model card of every folder prunext writes, read back as the Hub reads it.

The folders come from prunext's own commands (``native_folders`` in
conftest.py); every number a card shows is checked against the record it was
taken from.
"""

from __future__ import annotations

import json
import shlex

import pytest
from huggingface_hub import ModelCard

from prunext.cli import main
from prunext.core.card import CARD_FILE, Step, origin, stored_parameters
from prunext.core.plan import Plan
from prunext.fsutil import atomic_dir
from prunext.train.metrics import read_metrics


def _card(folder) -> tuple[dict, str]:
    card = ModelCard.load(folder / CARD_FILE)
    return card.data.to_dict(), card.text


def _plan(folder) -> Plan:
    return Plan.from_dict(json.loads((folder / "config.json").read_text())["prunext_plan"])


@pytest.mark.parametrize("name", ["pruned", "extended", "final", "converted", "dense"])
def test_every_folder_prunext_writes_has_a_hub_card(native_folders, name):
    folder = native_folders[name]
    header, text = _card(folder)
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-generation"
    assert header["tags"][0] == "prunext"
    assert header["license"] == "mit"  # carried from the source model's own card, through every step
    assert "base_model" not in header  # the source is a local folder: it has no hub id
    stored = stored_parameters(folder)
    assert f"Parameters stored: {stored:,}" in text
    native = name != "dense"
    assert ('from_pretrained("' in text) and (("trust_remote_code=True" in text) == native)
    assert f"lm_eval --model hf --model_args pretrained={folder.name if name != 'final' else 'run/final'}" in text


def test_pruned_card_says_what_was_done(native_folders):
    folder = native_folders["pruned"]
    header, text = _card(folder)
    report = json.loads((folder / "prune_report.json").read_text())
    params = report["params"]
    assert header["tags"] == ["prunext", "pruned", "flexigpt", "weight-sharing"]
    assert f"pruned with `flexigpt` at `--ratio 0.3`: blocks {report['decision']['pruned']} of 4 removed" in text
    assert f"parameters {params['total_params_before']:,} -> {params['total_params_after']:,}" in text
    assert stored_parameters(folder) == params["total_params_after"]
    share = params["total_params_after"] / params["total_params_before"]
    assert f"{share:.1%} of the {params['total_params_before']:,} of the model it was made from" in text
    assert _plan(folder).describe() in text
    command = ["prunext", "prune", "--model", str(native_folders["source"])]
    assert "```bash\n" + shlex.join(command) in text
    assert "Nothing was measured when this folder was written." in text


def test_extended_card(native_folders):
    header, text = _card(native_folders["extended"])
    report = json.loads((native_folders["extended"] / "extend_report.json").read_text())
    assert header["tags"] == ["prunext", "extended", "flexigpt", "weight-sharing"]
    assert "extended with `flexigpt` from 4 to 6 positions" in text
    assert f"parameters stored {report['params']['before']:,} -> {report['params']['after']:,}" in text


def _measured(run, until: int) -> list[str]:
    """The rows a card of ``run``'s model at step ``until`` shows, from the run's own records."""
    data = json.loads((run / "run_config.json").read_text())["args"]["eval_data"]
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["step"] <= until]
    evals = [r for r in records if "eval_ppl" in r]
    return [
        f"| healing tokens | {records[-1]['tokens']:,} |",
        f"| training loss | {records[0]['loss']:.4f} at step 1 -> {records[-1]['loss']:.4f} at step {until} |",
        f"| held-out perplexity (`{data}`) | {evals[0]['eval_ppl']:.2f} at step {evals[0]['step']} -> "
        f"{evals[-1]['eval_ppl']:.2f} at step {evals[-1]['step']} |",
    ]


def test_training_card_has_the_runs_numbers(native_folders):
    run = native_folders["run"]
    header, text = _card(native_folders["final"])
    assert header["tags"] == ["prunext", "pruned", "flexigpt", "healed", "weight-sharing"]
    assert "1. prune `" in text and "2. train `" in text and "trained on 256 tokens of" in text
    for row in _measured(run, 4):
        assert row in text, row
    assert "```bash\nprunext train --model " in text


def test_converted_checkpoint_card_has_the_numbers_up_to_its_step(native_folders, tmp_path):
    run = native_folders["run"]
    _, text = _card(native_folders["converted"])
    assert "3. convert `" in text and "rebuilt from DeepSpeed ZeRO-3 checkpoint `step4`" in text
    for row in _measured(run, 4):
        assert row in text, row

    assert main(["convert", "--from", str(run / "checkpoints"), "--tag", "step2", "--to", str(tmp_path / "at2")]) == 0
    _, text = _card(tmp_path / "at2")
    assert "checkpoint `step2`" in text and "(2 of 4 steps" in text
    for row in _measured(run, 2):
        assert row in text, row


def test_dense_card(native_folders):
    _, text = _card(native_folders["dense"])
    assert "A plain `llama` model with 4 blocks" in text and "converted from `" in text


def test_origin_of_built_in_models_and_hub_ids(tmp_path):
    assert origin([Step("prune", "builtin:smollm2-135m")]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert origin([Step("train", str(tmp_path)), Step("prune", "someone/some-model")])[0] == "someone/some-model"
    assert origin([Step("prune", str(tmp_path / "gone" / "model"))]) == (None, None)
    assert origin([]) == (None, None)


def test_a_card_the_command_wrote_itself_is_kept(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / CARD_FILE).write_text("mine\n")
    assert (tmp_path / "out" / CARD_FILE).read_text() == "mine\n"
