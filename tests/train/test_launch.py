"""launch/*.sh: the wrappers parse, pass flags through to `prunext train`, and refuse a missing hostfile."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

LAUNCH = tiny.REPO / "launch"


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


@pytest.mark.integration
def test_single_node_passes_flags_through_torchrun():
    """Smoke test: torchrun starts launch/train.py, which prints the train verb's help."""
    env = tiny.env() | {"NGPU": "0", "NPROC": "1", "TORCHRUN": str(tiny.BIN / "torchrun"), "PATH": f"{tiny.BIN}:{tiny.env()['PATH']}"}
    proc = subprocess.run(["bash", str(LAUNCH / "single_node.sh"), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, tiny.tail(proc)
    assert "--trainable {replacement,adapters,all}" in proc.stdout and "torchrun --nproc_per_node 8 -m prunext train" in proc.stdout


def test_multi_node_without_hostfile_refused(tmp_path):
    env = tiny.env() | {"HOSTFILE": str(tmp_path / "missing")}
    proc = subprocess.run(["bash", str(LAUNCH / "multi_node.sh"), "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "no hostfile" in proc.stderr
