"""Where prunext keeps what it derives once: the built-in model folder, cleaned text."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Return ``$PRUNEXT_CACHE`` (default ``~/.cache/prunext``), created if missing."""
    root = Path(os.environ.get("PRUNEXT_CACHE") or Path.home() / ".cache" / "prunext")
    root.mkdir(parents=True, exist_ok=True)
    return root
