"""Where a model came from: the one reader of a folder's lineage, and the teacher it implies.

Every folder prunext writes names the model it was made from:

    DIR/prune_report.json     {"settings": {"model": SRC, ...}, ...}     (prunext prune)
    DIR/extend_report.json    {"model": SRC, ...}                        (prunext extend)
    OUT/final/ + OUT/run_config.json   {"settings": {"model": SRC, ...}}  (prunext train)

Following these links hop by hop gives the lineage, ending at a model with no
report (a plain HF folder, a hub id) or a built-in model. ``train
--token-fraction`` needs the base model's pretraining tokens (known for the
built-in models) and ``--loss auto|kd`` the model to distil from (the nearest
prune or extend hop, through any training in between); both read it here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prunext.errors import UserError

log = logging.getLogger(__name__)

#: How many hops :func:`lineage` follows before it stops (a loop of reports cannot hang it).
MAX_HOPS = 16


def source_of(spec: str) -> tuple[str, str] | None:
    """``(how, source)``: the model ``spec`` was made from and how ("prune", "extend" or "train"),
    per the files beside it; None when nothing records it."""
    from prunext.core.loading import BUILTIN_PREFIX

    if spec.startswith(BUILTIN_PREFIX):
        return None
    folder = Path(spec).expanduser()
    records = [("prune", folder / "prune_report.json", ("settings", "model")), ("extend", folder / "extend_report.json", ("model",))]
    if folder.name == "final":  # OUT/final of a training run
        records.append(("train", folder.parent / "run_config.json", ("settings", "model")))
    for how, path, keys in records:
        try:
            value = json.loads(path.read_text())
            for key in keys:
                value = value[key]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue
        if isinstance(value, str) and value:
            return how, value
    return None


def lineage(spec: str, hops: int = MAX_HOPS) -> list[tuple[str, str]]:
    """The chain of ``(how, source)`` that ``spec`` descends from, nearest first (empty: no record)."""
    chain: list[tuple[str, str]] = []
    seen = {spec}
    current = spec
    for _ in range(hops):
        link = source_of(current)
        if link is None or link[1] in seen:
            break
        chain.append(link)
        seen.add(link[1])
        current = link[1]
    return chain


def compressed_from(spec: str) -> str | None:
    """The model ``spec`` was pruned or extended from, through any training runs in between (None: none)."""
    for how, source in lineage(spec):
        if how in ("prune", "extend"):
            return source
    return None


def builtin_base(spec: str) -> str | None:
    """The built-in model ``spec`` is, or descends from (its name without ``builtin:``), or None."""
    from prunext.core.loading import BUILTIN_MODELS, BUILTIN_PREFIX

    for candidate in (spec, *(source for _, source in lineage(spec))):
        if candidate.startswith(BUILTIN_PREFIX):
            name = candidate[len(BUILTIN_PREFIX) :]
            return name if name in BUILTIN_MODELS else None
    return None


def pretrain_tokens_of(spec: str) -> int | None:
    """The pretraining tokens of the base model ``spec`` descends from, where prunext knows them."""
    from prunext.core.loading import BUILTIN_MODELS

    base = builtin_base(spec)
    return None if base is None else BUILTIN_MODELS[base].pretrain_tokens


def findable(spec: str) -> bool:
    """Whether ``spec`` resolves without error (a builtin name, an existing path, a hub id)."""
    from prunext.core.loading import resolve_model_path

    try:
        resolve_model_path(spec)
    except UserError:
        return False
    return True


def resolve_auto_loss(model: str, teacher: str | None) -> str:
    """What ``--loss auto`` means for ``model``: lm+kd when there is a teacher to find
    (``--teacher``, else the model's source), else lm."""
    found = compressed_from(model) if teacher is None else teacher
    if found is not None and findable(found):
        log.info("--loss auto: lm+kd, distilling from %s (the model's source; --loss lm to train without it)", found)
        return "lm+kd"
    if found is not None:
        log.warning("--loss auto: the source %s named by the model's report is not available; training with lm", found)
    return "lm"


def default_teacher(model: str, loss: str, teacher: str | None) -> str:
    """The teacher of a kd loss: ``--teacher``, else the model ``model`` was pruned or extended from.

    Raises:
        UserError: there is none, or it cannot be found.
    """
    from prunext.core.loading import resolve_model_path

    if teacher is None:
        teacher = compressed_from(model)
        if teacher is None:
            raise UserError(f"--loss {loss} needs a teacher and '{model}' has no prune/extend report naming its source; give --teacher")
    resolve_model_path(teacher)  # a missing path is refused here, before any work
    return teacher
