"""The model card: ``README.md`` in every model folder prunext writes, in the Hugging Face Hub's format.

::

    ---
    base_model: HuggingFaceTB/SmolLM2-135M-Instruct   the original model, where it has a hub id
    library_name: transformers
    license: apache-2.0                                carried from the original model, where known
    pipeline_tag: text-generation
    tags: [prunext, pruned, flexigpt]
    ---
    # pruned
    How it was made, step by step from the original model, and the command;
    the plan; parameters stored against the original; what was measured;
    how to load, evaluate and share it.

The header is huggingface_hub's ``ModelCardData``. The facts come from the
records prunext writes beside a model, followed back to the original model:
``prune_report.json``, ``extend_report.json`` and ``convert_report.json`` in
a folder, and a training run's ``run_config.json`` and ``metrics.jsonl``
beside its ``OUT/final`` (the records :mod:`prunext.train.lineage` follows,
plus conversions). Nothing is measured here: a number appears only where a
command measured it.

:func:`prunext.fsutil.atomic_dir` writes the card last, once a command has put
everything into its output folder (the reports come after the weights). A
README.md that prunext did not write (no :data:`MARK`) is never replaced.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
#: The last line of every card prunext writes: a card with it is prunext's to rewrite, any other README is kept.
MARK = "<!-- model card written by prunext; rewritten whenever prunext writes this folder -->"
REPORTS = {"prune": "prune_report.json", "extend": "extend_report.json", "convert": "convert_report.json"}
#: How many steps back the card follows (a loop of reports cannot hang it); as prunext.train.lineage.MAX_HOPS.
MAX_STEPS = 16
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Step:
    """One thing prunext did on the way to a folder.

    Args:
        how: "prune", "extend", "train" or "convert".
        source: the model (or checkpoint) it started from, as its record names it.
        done: what was done, one Markdown line each.
        measured: ``(what, value)`` rows of numbers the command measured.
        tags: hub tags the step earns.
        params_before: parameters the source stored, where the record counts them.
        next: where the records of the source are (a folder), or None at the original model.
        until: the training step the source was taken at, when it is a checkpoint of a run.
    """

    how: str
    source: str
    done: list[str] = field(default_factory=list)
    measured: list[tuple[str, str]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    params_before: int | None = None
    next: str | None = None
    until: int | None = None


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, stopping at a line cut short."""
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return [r for r in records if isinstance(r, dict)]


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"


def _prune_step(report: dict) -> Step:
    settings, decision, params = report.get("settings") or {}, report.get("decision") or {}, report.get("params") or {}
    method, pruned, sources = settings.get("method", "?"), decision.get("pruned") or [], decision.get("sources") or {}
    step = Step("prune", str(settings.get("model", "?")), tags=["pruned", str(method)],
                params_before=params.get("total_params_before"))
    step.done.append(f"pruned with `{method}` at `--ratio {settings.get('ratio', '?')}`: "
                     f"blocks {pruned} of {decision.get('num_blocks', '?')} removed")
    if sources:
        step.done.append("each removed block replaced by a kept block's weights (shared, stored once) plus its own "
                         f"adapters: {', '.join(f'{i} -> {j}' for i, j in sources.items())}")
    if "total_fraction" in params:
        step.done.append(f"parameters {_count(params.get('total_params_before'))} -> {_count(params.get('total_params_after'))}: "
                         f"{params['total_fraction']:.1%} of all and {params.get('block_fraction', 0):.1%} of block parameters "
                         "removed, adapters and output norms counted")
    if settings.get("calib"):
        step.done.append(f"block importance measured on {_count(settings.get('calib_tokens'))} tokens of `{settings['calib']}`")
    return step


def _extend_step(report: dict) -> Step:
    settings, params = report.get("settings") or {}, report.get("params") or {}
    method = settings.get("method", "?")
    step = Step("extend", str(report.get("model", "?")), tags=["extended", str(method)], params_before=params.get("before"))
    where = ""
    if settings.get("blocks"):
        where = f", blocks {settings['blocks']} repeated"
    elif settings.get("span"):
        where = f", span {settings['span']} repeated"
    step.done.append(f"extended with `{method}` from {report.get('source_layers', '?')} to "
                     f"{report.get('to_layers', '?')} positions{where}")
    step.done.append(f"parameters stored {_count(params.get('before'))} -> {_count(params.get('after'))}; "
                     f"run per token: {_count(params.get('executed_after'))}")
    return step


def _convert_step(report: dict) -> Step:
    fmt, dtype = report.get("format", "?"), report.get("dtype", "?")
    if report.get("tag_dir"):  # a training run's DeepSpeed checkpoint: the run comes next
        tag_dir = Path(str(report["tag_dir"]))
        at_step = re.fullmatch(r"step(\d+)", str(report.get("tag", tag_dir.name)))
        step = Step("convert", str(tag_dir), next=str(tag_dir.parent.parent), until=int(at_step[1]) if at_step else None)
        step.done.append(f"rebuilt from DeepSpeed ZeRO-3 checkpoint `{report.get('tag', tag_dir.name)}` of the run "
                         f"`{tag_dir.parent.parent}` to the {fmt} format, {dtype}")
        return step
    source = str(report.get("from", "?"))
    step = Step("convert", source, next=source)
    step.done.append(f"converted from `{source}` to the {fmt} format, {dtype}")
    return step


def _train_step(run: Path, config: dict, until: int | None = None) -> Step:
    """A training run's step; ``until``: only as far as that step (a checkpoint converted before the end)."""
    settings = config.get("settings") or {}
    source = str(settings.get("model", "?"))
    step = Step("train", source, tags=["healed"], next=source)
    records = _records(run / "metrics.jsonl")
    tokens, steps = settings.get("tokens_used", settings.get("tokens")), _count(settings.get("steps"))
    if until is not None:
        records = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= until]
        tokens, steps = (records[-1].get("tokens") if records else None), f"{until} of {steps}"
    step.done.append(f"trained on {_count(tokens)} tokens of `{settings.get('data', '?')}` "
                     f"({steps} steps, `--trainable {settings.get('trainable', '?')}`: "
                     f"{_count(settings.get('trainable_params'))} of {_count(settings.get('total_params'))} parameters, "
                     f"loss `{settings.get('loss', '?')}`"
                     + (f" distilled from `{settings['teacher']}`" if settings.get("teacher") else "") + ")")
    step.measured.append(("healing tokens", _count(tokens)))
    losses = [r for r in records if isinstance(r.get("loss"), (int, float))]
    if losses:
        step.measured.append(("training loss", f"{losses[0]['loss']:.4f} at step {losses[0].get('step')} -> "
                                               f"{losses[-1]['loss']:.4f} at step {losses[-1].get('step')}"))
    evals = [r for r in records if isinstance(r.get("eval_ppl"), (int, float))]
    if evals:
        data = settings.get("eval_data") or (config.get("args") or {}).get("eval_data", "the held-out data")
        step.measured.append((f"held-out perplexity (`{data}`)", f"{evals[0]['eval_ppl']:.2f} at step {evals[0].get('step')} -> "
                                                                  f"{evals[-1]['eval_ppl']:.2f} at step {evals[-1].get('step')}"))
    return step


def read_step(files: Path, at: Path, until: int | None = None) -> Step | None:
    """The step that made the model whose files are in ``files`` and which is (or will be) at ``at``; None: no record.

    ``files`` and ``at`` differ only while a command writes its output under a temporary name;
    ``until`` is the step of a training run's checkpoint (see :class:`Step`).
    """
    for how, name in REPORTS.items():
        report = _json(files / name)
        if report is None:
            continue
        step = {"prune": _prune_step, "extend": _extend_step, "convert": _convert_step}[how](report)
        if step.next is None:
            step.next = step.source
        return step
    for run in ([at.parent] if at.name == "final" else []) + [at]:  # OUT/final, or a run folder itself
        config = _json(run / "run_config.json")
        if config is not None:
            return _train_step(run, config, until)
    return None


def provenance(files: Path, at: Path) -> list[Step]:
    """Every step from the original model to this one, nearest first."""
    from prunext.core.loading import BUILTIN_PREFIX

    steps: list[Step] = []
    seen: set[str] = set()
    step = read_step(files, at)
    while step is not None and len(steps) < MAX_STEPS:
        steps.append(step)
        nxt = step.next
        if nxt is None or nxt in seen or nxt.startswith(BUILTIN_PREFIX) or not Path(nxt).is_dir():
            break
        seen.add(nxt)
        step = read_step(Path(nxt), Path(nxt), step.until)
    return steps


def _card_header(folder: Path) -> dict:
    """The YAML header of ``folder``'s README.md, or {}."""
    from huggingface_hub import ModelCard

    path = folder / CARD_FILE
    if not path.is_file():
        return {}
    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except (OSError, ValueError):
        return {}


def origin(steps: list[Step]) -> tuple[str | None, str | None]:
    """``(base_model hub id, license)`` of the original model, where they can be known without the network."""
    from prunext.core.loading import BUILTIN_MODELS, BUILTIN_PREFIX

    for step in steps:  # the nearest folder with a prunext card already knows
        header = _card_header(Path(step.source)) if Path(step.source).is_dir() else {}
        if "prunext" in (header.get("tags") or []):
            return header.get("base_model"), header.get("license")
    if not steps:
        return None, None
    root = steps[-1].source
    if root.startswith(BUILTIN_PREFIX):
        entry = BUILTIN_MODELS.get(root[len(BUILTIN_PREFIX):])
        return (entry.hub_id or None, entry.license or None) if entry else (None, None)
    if Path(root).exists():
        return None, _card_header(Path(root)).get("license") if Path(root).is_dir() else None
    if not _HUB_ID.match(root):
        return None, None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(root, CARD_FILE)  # the hub card, if this machine has it; never downloads
    return root, _card_header(Path(cached).parent).get("license") if isinstance(cached, str) else None


def stored_parameters(folder: Path) -> int | None:
    """Parameters held in ``folder``'s safetensors files (each shared tensor counted once, as stored)."""
    import math

    from safetensors import SafetensorError, safe_open

    from prunext.core.checkpoint import read_safetensors_keys
    from prunext.errors import ModelError

    try:
        files = read_safetensors_keys(folder)
        total = 0
        for name in sorted(set(files.values())):
            with safe_open(str(folder / name), framework="pt") as f:
                total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
        return total
    except (ModelError, SafetensorError, OSError):
        return None


def _command() -> str | None:
    from prunext import cli

    if cli.current_command is None:
        return None
    return shlex.join(a for a in cli.current_command if not a.startswith("--local_rank"))


def _plan(config: dict):
    """The plan of a native ``config.json``'s contents; None for a plain model or an unreadable plan."""
    from prunext.core.plan import Plan, PlanError

    if config.get("model_type") != "prunext":
        return None
    try:
        if config.get("prunext_plan"):
            return Plan.from_dict(config["prunext_plan"])
        return Plan.identity(int(config["num_hidden_layers"]))
    except (PlanError, KeyError, TypeError, ValueError):
        return None


def _plan_lines(config: dict, plan) -> list[str]:
    """What the folder's model is, as Markdown lines."""
    if config.get("model_type") != "prunext":
        return [f"A plain `{config.get('model_type', '?')}` model with {config.get('num_hidden_layers', '?')} blocks "
                "(every position its own weights, adapters merged): it loads with transformers alone."]
    if plan is None:
        return ["The plan in `config.json` could not be read."]
    reused = len(plan) - len(plan.base_blocks)
    ranks = sorted({p.lora_rank for p in plan.positions if p.has_lora})
    lines = [f"A `{config.get('base_model_type', '?')}`-family model run as {len(plan)} positions over "
             f"{len(plan.base_blocks)} stored blocks (of the original's {plan.num_source_blocks})."]
    if reused:
        lines.append(f"{reused} position{'s' if reused > 1 else ''} re-run a block stored at another position: "
                     "its weights are one tensor, stored once and shared in memory.")
    adapted = sum(p.has_lora for p in plan.positions)
    if adapted:
        rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        lines.append(f"{adapted} position{'s' if adapted > 1 else ''} own LoRA adapters ({rank}).")
    normed = sum(p.out_norm for p in plan.positions)
    if normed:
        lines.append(f"{normed} position{'s' if normed > 1 else ''} own output feature normalization (FlexiGPT Sec. 3.3).")
    return lines


def render(files: Path, at: Path) -> str:
    """The card's text for the model folder whose files are in ``files`` and which is (or will be) at ``at``."""
    from huggingface_hub import ModelCard, ModelCardData

    from prunext import __version__

    config = _json(files / "config.json") or {}
    native, plan = config.get("model_type") == "prunext", _plan(config)
    steps = provenance(files, at)
    base_model, license_ = origin(steps)
    tags = list(dict.fromkeys(["prunext", *(t for s in reversed(steps) for t in s.tags)]))
    if plan is not None and len(plan.base_blocks) < len(plan):
        tags.append("weight-sharing")
    data = ModelCardData(base_model=base_model, library_name="transformers", license=license_,
                         pipeline_tag="text-generation", tags=tags)
    name = at.parent.name + "/final" if at.name == "final" else at.name

    out = [f"# {name}", ""]
    root = steps[-1].source if steps else None
    out.append(f"Made with prunext {__version__}: depth pruning and extension with weight-shared blocks and low-rank "
               "adapters (FlexiGPT, Smith et al., NAACL 2025, [arXiv 2501.14713](https://arxiv.org/abs/2501.14713))."
               + (f" The original model is `{root}`." if root else ""))
    out += ["", "## How it was made", ""]
    if steps:
        for i, step in enumerate(reversed(steps), start=1):
            out += [f"{i}. {step.how} `{step.source}`", *(f"   - {line}" for line in step.done)]
    else:
        out.append("No prune, extend, train or convert record was found beside this folder.")
    command = _command()
    if command:
        out += ["", "The command that wrote this folder:", "", "```bash", command, "```"]

    out += ["", "## The model", "", *(f"- {line}" for line in _plan_lines(config, plan))]
    stored = stored_parameters(files)
    before = next((s.params_before for s in reversed(steps) if isinstance(s.params_before, int)), None)
    if stored is not None:
        line = f"Parameters stored: {stored:,}"
        if before:
            line += f", {stored / before:.1%} of the {before:,} of the model it was made from (`{steps[-1].source}`)"
        out += ["", line + "."]
    if plan is not None:
        out += ["", "<details><summary>The plan, position by position</summary>", "",
                "```", plan.describe(), "```", "", "</details>"]

    measured = [row for step in reversed(steps) for row in step.measured]
    out += ["", "## Measured", ""]
    if measured:
        out += ["| what | value |", "|---|---|", *(f"| {what} | {value} |" for what, value in measured)]
    else:
        out.append("Nothing was measured when this folder was written.")
    out += ["", f"Measure perplexity and zero-shot accuracy with `prunext eval --model {name} --ppl builtin:wiki:test "
            "--tasks piqa,arc_easy`, or with lm-eval-harness (below)."]

    remote = ", trust_remote_code=True" if native else ""
    out += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{name}"{remote})  # this folder, or its hub id once uploaded',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", ""]
    if native:
        out += ["`trust_remote_code=True` runs the code in this folder (`modeling_prunext.py`, `configuration_prunext.py`), "
                "which prunext generates from its own modules; it needs only torch and transformers. With prunext "
                "installed, `import prunext` first and the folder loads through prunext instead.", ""]
    model_args = f"pretrained={name}" + (",trust_remote_code=True" if native else "")
    out += ["Evaluate it with lm-eval-harness, or with prunext on the same tasks:", "", "```bash",
            f"lm_eval --model hf --model_args {model_args} --tasks piqa,arc_easy --batch_size 8",
            f"prunext eval --model {name} --tasks piqa,arc_easy", "```", "",
            "Share it on the Hugging Face Hub (the code files and this card go with it):", "", "```bash",
            f"hf upload your-name/{at.name if at.name != 'final' else at.parent.name} {name}", "```"]
    out += ["", MARK]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(out) + "\n"))


def is_prunext_card(path: Path) -> bool:
    try:
        return path.read_text().rstrip().endswith(MARK)
    except (OSError, UnicodeDecodeError):
        return False


def write_model_card(files: str | Path, at: str | Path | None = None) -> Path | None:
    """Write ``README.md`` into a model folder (one with ``config.json``), unless it holds a README of someone else's.

    A card prunext wrote before is replaced: a command that saves a model inside its own
    output folder writes its reports after that save, and the outer folder's card has them.

    Args:
        files: the folder holding the model's files.
        at: where the folder will be once complete (default ``files``); names and the run a
            ``final/`` folder belongs to are read from there.

    Returns:
        The card's path, or None when a README that prunext did not write is kept.
    """
    files = Path(files)
    path = files / CARD_FILE
    if path.exists() and not is_prunext_card(path):
        return None
    path.write_text(render(files, Path(at) if at is not None else files))
    return path
