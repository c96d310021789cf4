"""Output folders that are either complete or absent.

Every command writes its output folder under a temporary sibling name and
renames it into place only when everything is written, so a crash or a kill
never leaves a half-written folder that looks complete, and an existing
folder the user owns is replaced only when asked (``--overwrite``) and only
after the new one is whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prunext.errors import UserError


def check_out_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output folder that exists and is not empty, unless ``overwrite``.

    Call it before any work starts.

    Raises:
        UserError: when ``path`` is a file, or a non-empty folder and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file; give a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"--out {path} exists and is not empty; choose another folder or pass --overwrite")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` when the block finishes without error.

    On error the temporary folder is removed and ``path`` is untouched. The new
    folder's files and the folder itself are flushed to disk (fsync) before it
    is renamed into place. With ``overwrite`` an existing ``path`` is swapped
    with the new folder in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so
    at every moment either the old or the new folder is at ``path``; the old one
    is deleted afterwards. Where the exchange is not available (another OS or
    file system) the old folder is moved aside first, and for that moment
    ``path`` is absent while both copies exist on disk.

    A folder that holds a model (``config.json``) gets its model card
    (``README.md``, :mod:`prunext.core.card`) last, from everything written
    into it; a README.md that prunext did not write is kept.
    """
    path = check_out_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the final folder gets the usual permissions
    try:
        yield tmp
        if (tmp / "config.json").is_file():
            _write_card(tmp, path)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists() and exchange(tmp, path):
        fsync_dir(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_card(tmp: Path, path: Path) -> None:
    import logging

    from prunext.core.card import write_model_card

    try:
        write_model_card(tmp, path)
    except Exception:  # a card documents the model; a fault in it must not discard the model
        logging.getLogger(__name__).warning("could not write the model card of %s", path, exc_info=True)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it, new files) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder, deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            file = Path(folder) / name
            if file.is_symlink():
                continue
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(folder))


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a flushed temporary file and a rename: the old or the new file, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as JSON to ``path`` via a temporary file and a rename."""
    import json

    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
