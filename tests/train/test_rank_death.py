"""A rank that dies or hangs makes the survivor exit with one clear line, not hang or show gloo's traceback.

Two ranks of ``python -m prunext train`` are started by hand (RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment, no launcher), so nothing but prunext
itself can stop the survivor: torchrun would kill it for us. Rank 1 is then
SIGKILLed (its connections close: rank 0 fails at its next collective) or
SIGSTOPped (it stays connected and silent: rank 0 fails after --dist-timeout).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunext.train.dist import free_port, lost_rank_reason

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

TIMEOUT_S = 10  # --dist-timeout


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank_death")
    return tiny.build_tiny_pruned(root / "model"), tiny.write_text(root / "text.txt"), root


def _start_two_ranks(model: Path, text: Path, out: Path, logs: Path) -> list[subprocess.Popen]:
    """Rank 0 and rank 1 of a run far longer than the test (2000 steps), stderr to logs/rankN.err."""
    args = tiny.train_args(model, text, out, "--tokens", str(2000 * 2 * 2 * 32), "--save-every", "0",
                           "--dist-timeout", str(TIMEOUT_S))
    port = str(free_port())
    ranks = []
    for rank in (0, 1):
        env = tiny.env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        with open(logs / f"rank{rank}.err", "w") as err:
            ranks.append(subprocess.Popen([sys.executable, "-m", "prunext", "train", *map(str, args)], env=env, cwd=tiny.REPO,
                                          stdout=subprocess.DEVNULL, stderr=err, start_new_session=True))
    return ranks


def _wait_for_steps(metrics: Path, ranks: list[subprocess.Popen], steps: int = 2, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        assert all(r.poll() is None for r in ranks), "a rank exited before training started"
        time.sleep(0.05)
    pytest.fail(f"no {steps} steps in {metrics} after {limit_s} s")


def _kill(ranks: list[subprocess.Popen]) -> None:
    for r in ranks:
        if r.poll() is None:
            r.kill()  # SIGKILL ends a stopped process too
        r.wait(timeout=30)


def test_errors_before_a_group_exists_keep_their_own_message():
    # Words like gloo's while the group is being formed (a port in use, a wrong address) are set-up mistakes.
    assert lost_rank_reason(RuntimeError("Connection reset by peer")) is None


@pytest.mark.integration  # two processes
@pytest.mark.parametrize(
    ("sig", "bound_s"),
    [(signal.SIGKILL, TIMEOUT_S), (signal.SIGSTOP, TIMEOUT_S + 30)],
    ids=["killed", "hung"],
)
def test_survivor_exits_with_one_clear_line(inputs, tmp_path, sig, bound_s):
    model, text, _ = inputs
    out = tmp_path / "run"
    ranks = _start_two_ranks(model, text, out, tmp_path)
    try:
        _wait_for_steps(out / "metrics.jsonl", ranks)
        ranks[1].send_signal(sig)
        sent = time.monotonic()
        try:
            code = ranks[0].wait(timeout=bound_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {bound_s} s after rank 1 got {sig.name}")
        waited = time.monotonic() - sent
    finally:
        _kill(ranks)

    stderr = (tmp_path / "rank0.err").read_text()
    errors = [line for line in stderr.splitlines() if line.startswith("prunext train: error:")]
    assert code == 1, stderr[-3000:]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    line = errors[0]
    assert "lost contact with another rank" in line and f"--dist-timeout {TIMEOUT_S} s" in line
    assert "see that rank's log" in line and "with --resume" in line
    if sig == signal.SIGKILL:
        assert "Connection reset by peer" in line or "Connection closed by peer" in line, line
    else:
        assert "Timed out" in line, line  # the collective timeout, not a closed connection, ended it
        assert waited >= TIMEOUT_S - 1, f"rank 0 stopped after {waited:.1f} s, before --dist-timeout {TIMEOUT_S}"
