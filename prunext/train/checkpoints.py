"""DeepSpeed checkpoints that are complete whenever ``latest`` names them.

::

    OUT/checkpoints/step200/            DeepSpeed's files (every rank writes its partition)
    OUT/checkpoints/step200/prunext_state.json   step, tokens, and what the data order depends on
    OUT/checkpoints/latest              "step200", written last, atomically, by rank 0

DeepSpeed's own ``save_checkpoint`` writes ``latest`` on rank 0 *before* its
closing barrier, i.e. possibly before the other ranks have finished their
files, and writes it in place. Here every rank saves with
``save_latest=False``; after a barrier (all files on disk) rank 0 writes the
state file and then ``latest`` via a temporary file and a rename. A run
killed at any moment leaves ``latest`` pointing at a complete tag (or
absent); ``--resume`` loads that tag and deletes any newer, unfinished ones.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from prunext.errors import UserError
from prunext.fsutil import write_text_atomic

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "prunext_state.json"
_TAG = re.compile(r"step(\d+)")


def tag_of(step: int) -> str:
    return f"step{step}"


def latest_state(ckpt_dir: Path) -> dict | None:
    """The state of the newest complete checkpoint, or None when there is none.

    Raises:
        UserError: ``latest`` names a tag that is missing or incomplete (the folder was edited).
    """
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    state_file = ckpt_dir / tag / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{latest} names checkpoint '{tag}' but {state_file} is missing or damaged; restore it or start a new --out") from e
    state["tag"] = tag
    return state


def save(engine, ckpt_dir: Path, step: int, state: dict, rank: int, keep: int = 0) -> None:
    """Save a checkpoint on all ranks and make it the ``latest`` one only once complete.

    Args:
        engine: the DeepSpeed engine (every rank must call this).
        ckpt_dir: ``OUT/checkpoints``.
        step: optimizer steps done.
        state: what ``--resume`` checks and restores (JSON-serialisable).
        rank: global rank.
        keep: keep only this many newest checkpoints (0 = all).
    """
    import torch.distributed as dist

    tag = tag_of(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"prunext": state}, save_latest=False)
    dist.barrier()  # every rank's files are written
    if rank == 0:
        write_text_atomic(ckpt_dir / tag / STATE_FILE, json.dumps(state, indent=2) + "\n")
        write_text_atomic(ckpt_dir / LATEST, tag)
        if keep > 0:
            for old in sorted(tags(ckpt_dir))[:-keep]:
                shutil.rmtree(ckpt_dir / tag_of(old), ignore_errors=True)
    dist.barrier()
    log.info("saved checkpoint %s", ckpt_dir / tag)


def tags(ckpt_dir: Path) -> list[int]:
    """Steps of the checkpoint folders present (complete or not)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _TAG.fullmatch(p.name)))


def drop_newer(ckpt_dir: Path, step: int) -> list[int]:
    """Delete checkpoint folders after ``step`` (left by a killed run; their steps will be redone)."""
    dropped = [s for s in tags(ckpt_dir) if s > step]
    for s in dropped:
        shutil.rmtree(ckpt_dir / tag_of(s), ignore_errors=True)
    return dropped
