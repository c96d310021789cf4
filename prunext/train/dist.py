"""Process-group set-up that works the same under every launcher.

- ``torchrun`` and the ``deepspeed`` launcher set ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; the deepspeed launcher
  also appends ``--local_rank=N`` to the arguments (the recipe accepts and
  ignores it: ``LOCAL_RANK`` says the same).
- ``python launch/train.py`` sets nothing: a world of one is made here on
  127.0.0.1 and a free port.

The backend is DeepSpeed's choice for the accelerator: NCCL on CUDA, gloo on
CPU (oneCCL when ``oneccl_bindings_for_pytorch`` is installed). Every
collective has a timeout (``--dist-timeout``), so when a rank dies the others
fail with an error instead of waiting forever: at once when its connections
close (a killed process), after the timeout when it hangs or its node drops
off the network. :func:`lost_rank_reason` tells that error from a bug, so the
command line can say what happened in one line.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import warnings
from datetime import timedelta

log = logging.getLogger(__name__)

#: The collective timeout of this process's group, once :func:`init` has made a group of two or more ranks.
_group_timeout_s: float | None = None
#: How gloo and NCCL word a collective whose peer is gone: its connection closed, or it went quiet past the timeout.
_LOST_PEER = re.compile(
    r"connection (reset|closed|refused)|broken pipe|timed out|timeout|communicator was aborted|remote process exited",
    re.IGNORECASE,
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment, before any process group exists."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def _quiet() -> None:
    # ZeRO-3 calls these every step; torch 2.13 warns about their names each time.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def init(timeout_s: float, debug: bool = False) -> tuple[int, int, int]:
    """Create the process group (idempotent); return (rank, local_rank, world_size).

    Args:
        timeout_s: seconds a collective may wait before it raises on the ranks still alive.
        debug: keep DeepSpeed's info logs.
    """
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    # NCCL enforces the timeout only with async error handling on.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # Name the accelerator so DeepSpeed does not guess (and warn that it guessed CPU).
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu() else "cpu")
    _quiet()

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger

    if not debug:
        ds_logger.setLevel(logging.WARNING)
    if get_accelerator().device_name() == "cpu":
        # On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op at process-group
        # creation (minutes, and a C++ compiler) that only tensor-parallel inference uses;
        # training's collectives go through gloo. The ops table is a module-level dict
        # DeepSpeed documents as editable for this.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s), verbose=debug)
    global _group_timeout_s
    if dist.get_world_size() > 1:
        _group_timeout_s = timeout_s
    return dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()


def lost_rank_reason(error: BaseException) -> str | None:
    """What went wrong, in a few words, when ``error`` is a collective failing because another rank is gone.

    Only errors raised after :func:`init` formed a group of two or more ranks
    count: the same words while the group is being formed (a port in use, a
    wrong address) are set-up mistakes with their own messages.

    Returns:
        The backend's first line without its source location (``Read error
        [10.0.0.2]:41234: Connection reset by peer``), or None for any other error.
    """
    import torch.distributed as dist

    if _group_timeout_s is None:
        return None
    seen = set()
    while error is not None and id(error) not in seen:  # DeepSpeed may re-raise the backend's error inside its own
        seen.add(id(error))
        text = str(error).strip()
        if isinstance(error, RuntimeError) and (isinstance(error, dist.DistError) or _LOST_PEER.search(text)):
            first = text.splitlines()[0] if text else type(error).__name__
            first = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", first)  # gloo's "[.../pair.cc:537] "
            return first.split(". ")[0].rstrip(".")
        error = error.__cause__ or error.__context__
    return None


def lost_rank_message(reason: str, advice: str) -> str:
    """The one line a surviving rank prints: what happened, where to look, what to do."""
    return (
        f"lost contact with another rank ({reason}): it stopped, crashed, hung for more than --dist-timeout "
        f"{_group_timeout_s:g} s, or its node became unreachable, so this rank stopped too; "
        f"see that rank's log for why, then {advice}"
    )


def on_gpu() -> bool:
    """Whether training runs on CUDA: ``DS_ACCELERATOR`` when set, else whether torch sees a GPU."""
    if "DS_ACCELERATOR" in os.environ:
        return os.environ["DS_ACCELERATOR"] == "cuda"
    import torch

    return torch.cuda.is_available()


def long_wait_group(timeout_s: float):
    """A gloo group for waits that may be long (node-local rank 0 tokenizing while the others wait)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def all_ok(error: Exception | None, group=None) -> None:
    """Every rank learns whether any rank failed; all raise the first failure's error.

    A failure on one rank (bad data seen by the rank that tokenizes) would otherwise
    leave the others waiting at the next collective.
    """
    import torch.distributed as dist

    from prunext.errors import UserError

    message = None if error is None else (type(error).__name__, str(error))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message, group=group)
    failures = [m for m in gathered if m is not None]
    if error is not None:
        raise error
    if failures:
        kind, text = failures[0]
        if kind in ("UserError", "DataError", "ModelError", "PlanError"):
            raise UserError(text)
        raise RuntimeError(f"another rank failed: {kind}: {text}")
