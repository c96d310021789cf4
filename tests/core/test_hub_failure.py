"""A hub model or data set that cannot be fetched is one line and exit 2 that says so and what to use instead.

Each command runs as a subprocess: huggingface_hub and datasets read
HF_HUB_OFFLINE once, at import. With HF_HUB_OFFLINE=1 the answer is the same
on every machine; the plain case (no network at all) runs only where the hub
is unreachable, and takes the hub client's retries (about 30 s).
"""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
import tiny  # noqa: E402

HUB_MODEL = "some-org/some-model"
HUB_DATA = "some-org/some-data"
# The model's message comes from core/loading.py, which must tell "unreachable" apart from "no such model".


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """A plain tiny HF folder with its tokenizer, for the cases where only the data comes from the hub."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import make_tiny_hf, make_tiny_tokenizer

    folder = tmp_path_factory.mktemp("hub") / "model"
    make_tiny_hf("llama", layers=4).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def _argv(verb: str, model: str, data: str, out: Path) -> list[str]:
    if verb == "prune":
        return ["prune", "--model", model, "--calib", data, "--ratio", "0.3", "--out", str(out)]
    if verb == "train":
        return ["train", "--model", model, "--data", data, "--tokens", "4096", "--seq-len", "32", "--trainable", "all", "--out", str(out)]
    return ["eval", "--model", model, "--ppl", data, "--json", str(out)]


def _refused(verb: str, argv: list[str], out: Path, offline: bool = True, timeout: float = 120) -> str:
    env = tiny.env()
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-m", "prunext", *argv], env=env, capture_output=True, text=True, timeout=timeout, cwd=tiny.REPO)
    assert proc.returncode == 2, tiny.tail(proc)
    assert "Traceback" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"prunext {verb}: error: "), proc.stderr[-3000:]
    assert not out.exists()
    return errors[0]


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("verb", ["prune", "train", "eval"])
def test_hub_model_offline(tmp_path, verb):
    out = tmp_path / "out"
    line = _refused(verb, _argv(verb, HUB_MODEL, "builtin:wiki:test", out), out)
    assert f"'{HUB_MODEL}'" in line and "Hugging Face hub could not be reached" in line
    assert "local" in line and "builtin:smollm2-135m" in line


@pytest.mark.parametrize("verb", ["prune", "train", "eval"])
def test_hub_data_offline(tmp_path, local_model, verb):
    out = tmp_path / "out"
    line = _refused(verb, _argv(verb, str(local_model), HUB_DATA, out), out)
    assert f"'{HUB_DATA}'" in line and "Hugging Face hub could not be reached" in line
    assert "local" in line and "builtin:wiki" in line


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["model", "data"])
def test_no_network(tmp_path, local_model, kind):
    if _hub_reachable():
        pytest.skip("the hub is reachable here; the HF_HUB_OFFLINE cases cover the message")
    out = tmp_path / "out"
    model, data = (HUB_MODEL, "builtin:wiki:test") if kind == "model" else (str(local_model), HUB_DATA)
    line = _refused("eval", _argv("eval", model, data, out), out, offline=False, timeout=240)
    assert "Hugging Face hub could not be reached" in line
