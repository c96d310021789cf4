"""Resolve a data spec (built-in name, local file or folder, hub name) to a data set.

Accepted specs:

* ``builtin:wiki`` (the train split), ``builtin:wiki:train``, ``builtin:wiki:test``;
* a local ``.txt``, ``.jsonl``, ``.json`` or ``.parquet`` file, or a folder
  holding files of one of these kinds (only its top level is read). A ``.txt``
  file is split into documents at blank lines (``sample_by="paragraph"``), so a
  file of articles separated by blank lines gives one row per paragraph block;
* anything else is a Hugging Face hub data set: ``name[:config][@split]``,
  e.g. ``wikitext:wikitext-2-raw-v1@test`` (split ``train`` by default).

Every data set must be non-empty and have a ``text`` column of strings.
"""

import logging
from pathlib import Path
from typing import NamedTuple

import datasets

from prunext.cache import cache_dir
from prunext.data.wiki import SPLITS as WIKI_SPLITS
from prunext.data.wiki import wiki_articles
from prunext.errors import DataError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_SPECS = ("builtin:wiki",) + tuple(f"builtin:wiki:{split}" for split in WIKI_SPLITS)
# The datasets builder that reads each file kind; .json and .jsonl share one.
LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_HUB_SPLIT = "train"
ACCEPTED_FORMS = (
    "builtin:wiki[:train|:test], a .txt/.jsonl/.json/.parquet file or a folder of them, "
    "or a hub data set as name[:config][@split]"
)
_STRING_DTYPES = ("string", "large_string")


class HubSpec(NamedTuple):
    """A hub data set named by ``name[:config][@split]``.

    Attributes:
        name (str): The repository, e.g. ``wikitext`` or ``owner/name``.
        config (str | None): The configuration, if any.
        split (str): The split to load.
    """

    name: str
    config: str | None
    split: str


def parse_hub_spec(spec: str) -> HubSpec:
    """Split ``name[:config][@split]`` into its parts.

    Args:
        spec (str): The spec as given by the user.

    Returns:
        HubSpec: The name, configuration and split.

    Raises:
        DataError: If a part is present but empty (``name:``, ``name@``).
    """
    rest, at, split = spec.rpartition("@") if "@" in spec else (spec, "", DEFAULT_HUB_SPLIT)
    name, colon, config = rest.partition(":")
    if not name or (colon and not config) or (at and not split):
        raise DataError(f"data spec {spec!r} has an empty part; accepted forms: {ACCEPTED_FORMS}.")
    return HubSpec(name=name, config=config or None, split=split)


def looks_like_path(spec: str) -> bool:
    """Tell whether a spec was meant as a local path rather than a hub name.

    A single slash is not enough: hub names are ``owner/name``.

    Args:
        spec (str): The spec as given by the user.

    Returns:
        bool: True for an absolute, home or dot-relative path, a path with two
        or more slashes, or a name ending in a supported file extension.
    """
    return (
        spec.startswith(("/", "~", "."))
        or spec.count("/") >= 2
        or "\\" in spec
        or Path(spec).suffix.lower() in LOADERS
    )


def local_data_files(path: Path) -> tuple[str, list[Path]]:
    """Return the datasets builder and the non-empty files of a local file or folder.

    Args:
        path (Path): An existing file, or a folder whose top-level files are read;
            hidden files and files of other kinds (a README) are skipped.

    Returns:
        tuple[str, list[Path]]: The builder name (``text``, ``json``, ``parquet``)
        and the files, sorted by name.

    Raises:
        DataError: If the kind is not supported, kinds are mixed, or every file is empty.
    """
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            f for f in path.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in LOADERS
        )
        if not files:
            raise DataError(
                f"folder {path} has no .txt, .jsonl, .json or .parquet files at its top level; "
                "put the data files directly in it."
            )
    loaders = {LOADERS.get(f.suffix.lower()) for f in files}
    if None in loaders:
        raise DataError(
            f"{path} is not a .txt, .jsonl, .json or .parquet file; convert it to one of these."
        )
    if len(loaders) > 1:
        kinds = ", ".join(sorted({f.suffix.lower() for f in files}))
        raise DataError(
            f"folder {path} mixes file kinds ({kinds}); keep files of one kind in a data folder."
        )
    non_empty = [f for f in files if f.stat().st_size > 0]
    if not non_empty:
        raise DataError(f"data {path} is empty; give a file or folder with text in it.")
    return loaders.pop(), non_empty


def _load_builtin(spec: str, cache_root: Path | None) -> datasets.Dataset:
    """Load ``builtin:wiki[:split]`` from the cleaned cache."""
    if spec not in BUILTIN_SPECS:
        raise DataError(f"unknown built-in data {spec!r}; known: {', '.join(BUILTIN_SPECS)}.")
    split = spec.split(":")[2] if spec.count(":") == 2 else "train"
    return datasets.Dataset.from_list(wiki_articles(split, cache_root))


def _load_local(
    path: Path, streaming: bool, cache_root: Path | None
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a local file or folder with the builder its extension calls for."""
    loader, files = local_data_files(path)
    options = {"sample_by": "paragraph"} if loader == "text" else {}
    try:
        return datasets.load_dataset(
            loader,
            data_files=[str(f) for f in files],
            split="train",
            streaming=streaming,
            # Derived Arrow files belong with prunext's other derived data.
            cache_dir=str(Path(cache_root or cache_dir()) / "datasets"),
            **options,
        )
    # A file that yields no rows fails with a ValueError ("corresponds to no
    # data"), a malformed one with a DatasetGenerationError.
    except (datasets.exceptions.DatasetGenerationError, ValueError) as error:
        cause = error.__cause__ or error
        raise DataError(
            f"data {path} is empty or could not be read as {loader} data ({cause}); "
            "check that it holds at least one document in that format."
        ) from error


def _load_hub(spec: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """Load a hub data set, turning 'not reachable' and 'not found' into a DataError."""
    hub = parse_hub_spec(spec)
    try:
        return datasets.load_dataset(hub.name, hub.config, split=hub.split, streaming=streaming)
    # OSError covers no connection, offline mode, unknown repositories and HTTP
    # errors (ConnectionError: the hub could not be reached, HF_HUB_OFFLINE=1
    # included); ValueError covers an unknown config or split.
    except (OSError, ValueError) as error:
        if isinstance(error, ConnectionError):
            raise DataError(
                f"data {spec!r} is not a local file or folder, and the Hugging Face hub could not be reached "
                f"(offline mode or no network); check your network, or give local data or builtin:wiki instead "
                f"(accepted forms: {ACCEPTED_FORMS})."
            ) from error
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"data {spec!r} is not a local file or folder and could not be loaded from the "
            f"Hugging Face hub ({reason}); accepted forms: {ACCEPTED_FORMS}."
        ) from error


def _first_row(data: datasets.IterableDataset) -> dict | None:
    """Return the first row of a streamed data set, or None when it has none."""
    return next(iter(data), None)


def check_text_dataset(
    data: datasets.Dataset | datasets.IterableDataset, spec: str
) -> datasets.Dataset | datasets.IterableDataset:
    """Check that a data set has rows and a ``text`` column of strings.

    A streamed data set is checked on its first row only.

    Args:
        data (datasets.Dataset | datasets.IterableDataset): The loaded data.
        spec (str): The spec it came from, for the message.

    Returns:
        datasets.Dataset | datasets.IterableDataset: ``data`` unchanged.

    Raises:
        DataError: If it is empty, has no ``text`` column, or the column is not text.
    """
    if isinstance(data, datasets.IterableDataset):
        first = _first_row(data)
        columns = list(first) if first is not None else []
        is_empty = first is None
    else:
        columns = list(data.column_names)
        is_empty = len(data) == 0
    if is_empty:
        raise DataError(f"data {spec!r} is empty; give a data set with at least one document.")
    if "text" not in columns:
        raise DataError(
            f"data {spec!r} has columns {columns} but needs a 'text' column; "
            "rename the column that holds the documents to 'text'."
        )
    feature = (data.features or {}).get("text")
    if feature is not None and getattr(feature, "dtype", None) not in _STRING_DTYPES:
        raise DataError(
            f"data {spec!r} has a 'text' column of {feature}, not strings; "
            "store the documents as plain strings."
        )
    return data


def load_text_dataset(
    spec: str, streaming: bool = False, cache_root: Path | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """Load the data set a spec names and check it has a ``text`` column.

    Args:
        spec (str): ``builtin:wiki[:train|:test]``, a local file or folder, or a
            hub data set ``name[:config][@split]`` (see the module docstring).
        streaming (bool): Stream local files and hub data sets instead of
            loading them (returns an ``IterableDataset``); the built-in data is
            small and always loaded.
        cache_root (Path | None): The prunext cache, for the built-in text and
            the Arrow files of local data; ``cache_dir()`` when None.

    Returns:
        datasets.Dataset | datasets.IterableDataset: The data; other columns
        than ``text`` are kept.

    Raises:
        DataError: If the spec names nothing usable (see :func:`check_text_dataset`).
    """
    spec = spec.strip()
    if spec.startswith(BUILTIN_PREFIX):
        data = _load_builtin(spec, cache_root)
    elif Path(spec).expanduser().exists():
        data = _load_local(Path(spec).expanduser(), streaming, cache_root)
    elif looks_like_path(spec):
        raise DataError(f"no such file or folder: {spec}; check the path.")
    else:
        data = _load_hub(spec, streaming)
    logger.info("Loaded data %r.", spec)
    return check_text_dataset(data, spec)
