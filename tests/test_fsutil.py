"""prunext/fsutil.py: output folders and files are whole or absent, the old one replaced in one step."""

import os
from pathlib import Path

import pytest

from prunext import fsutil


def _write(folder: Path, text: str) -> None:
    (folder / "sub").mkdir()
    (folder / "a.txt").write_text(text)
    (folder / "sub" / "b.txt").write_text(text)


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("from a")
    (b / "x").write_text("from b")
    assert fsutil.exchange(a, b)  # Linux with renameat2: the platform prunext's tests run on
    assert (a / "x").read_text() == "from b" and (b / "x").read_text() == "from a"


def test_overwrite_never_leaves_the_path_absent(tmp_path, monkeypatch):
    """The old folder is swapped with the new one, not moved aside first: with every plain rename
    failing (as a kill between two renames would leave it), the swap still lands and nothing is lost."""
    out = tmp_path / "out"
    with fsutil.atomic_dir(out) as tmp:
        _write(tmp, "old")

    def no_rename(*args, **kwargs):
        raise OSError("a plain rename would leave a moment without the folder")

    monkeypatch.setattr(fsutil.os, "replace", no_rename)
    with fsutil.atomic_dir(out, overwrite=True) as tmp:
        _write(tmp, "new")
    assert (out / "a.txt").read_text() == "new" and (out / "sub" / "b.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old copy is gone, no partial left


def test_new_folder_is_flushed_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", spy)
    with fsutil.atomic_dir(tmp_path / "out") as tmp:
        _write(tmp, "x")
    names = {Path(p).name for p in synced}
    assert {"a.txt", "b.txt", "sub"} <= names  # every file and folder of the new tree
    assert str(tmp_path) in synced  # and the parent, after the rename


def test_write_text_atomic_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("line 1\nline 2\n")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fsutil.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        fsutil.write_text_atomic(path, "line 1\n")
    assert path.read_text() == "line 1\nline 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_metrics_resume_rewrites_through_a_new_file(tmp_path, monkeypatch):
    """Resuming drops the redone steps' lines by writing a new file; a kill then leaves the old one whole."""
    import json

    from prunext.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + "\n")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(fsutil.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            MetricsLog(path, active=True, resume_step=2)
    assert path.read_text().splitlines() == lines  # nothing lost
    MetricsLog(path, active=True, resume_step=2)
    assert path.read_text().splitlines() == lines[:2]
