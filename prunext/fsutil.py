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

    On error the temporary folder is removed and ``path`` is untouched. With
    ``overwrite`` an existing ``path`` is moved aside, replaced, then deleted.
    """
    path = check_out_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the final folder gets the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as JSON to ``path`` via a temporary file and a rename."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
