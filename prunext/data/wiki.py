"""The built-in Wikipedia text (``builtin:wiki``).

The ``gensim`` wheel ships a shortened English Wikipedia dump (206 pages). Its
articles are parsed once into plain text (106 articles, 2.9M characters, about
650K tokens), split by title into train and test, and cached as JSON lines
under ``cache_dir()/wiki/v1``; later calls only read the cache.
"""

import bz2
import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import mwparserfromhell

from prunext.cache import cache_dir
from prunext.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
# Bump when the cleaning changes, so an old cache is not read as the new text.
CACHE_VERSION = "v1"
# Shorter articles are stubs or lists whose text is mostly gone after cleaning.
MIN_CHARS = 200

_DUMP_IN_GENSIM = (
    "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
_HIDDEN_LINK_PREFIXES = ("file:", "image:", "media:", "category:")
_NON_PROSE_TAGS = ("ref", "table")
_INLINE_TABLE_END_RE = re.compile(r"^(\|[^\n]*?)\|\}[ \t]*$", re.MULTILINE)
_REF_RE = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_TAG_RE = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>")
_TEMPLATE_RE = re.compile(r"\{\{[^{}]*\}\}")
_PIPED_LINK_RE = re.compile(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]")
_LINK_RE = re.compile(r"\[\[([^\[\]|]*)\]\]")
# Category and file lines, and table starts, rows, cells and headers ("{|", "| x", "! x").
_DEBRIS_LINE_RE = re.compile(r"^\s*((category|file|image):|\{\||\||! )", re.IGNORECASE)
_BLANK_LINES_RE = re.compile(r"\n{3,}")


class Page(NamedTuple):
    """One ``<page>`` of a MediaWiki dump.

    Attributes:
        title (str): The page title.
        ns (int): The namespace number; 0 is an article.
        redirect (bool): Whether the page has a ``<redirect>`` element.
        text (str): The wikitext of the page's revision.
    """

    title: str
    ns: int
    redirect: bool
    text: str


def dump_path() -> Path:
    """Return the Wikipedia dump shipped in the ``gensim`` wheel.

    The package is located without being imported: importing gensim would pull
    in scipy and compiled extensions that prunext does not need.

    Returns:
        Path: The ``.xml.bz2`` dump.

    Raises:
        DataError: If gensim is not installed or the file is missing from it.
    """
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "builtin:wiki needs the gensim wheel, which is not installed; "
            "run `make setup` or `pip install --no-deps gensim==4.4.0`."
        )
    path = Path(spec.submodule_search_locations[0]) / _DUMP_IN_GENSIM
    if not path.is_file():
        raise DataError(
            f"builtin:wiki expects {path}, which this gensim install lacks; "
            "run `pip install --no-deps --force-reinstall gensim==4.4.0`."
        )
    return path


def _local_name(tag: str) -> str:
    """Drop the ``{namespace}`` prefix ElementTree puts on every tag."""
    return tag.rsplit("}", 1)[-1]


def _child(element: ET.Element, name: str) -> ET.Element | None:
    """Return the first child with local name ``name``, whatever the XML namespace."""
    return next((c for c in element if _local_name(c.tag) == name), None)


def _page_from_element(page: ET.Element) -> Page:
    """Read the fields prunext needs from a ``<page>`` element."""
    title = _child(page, "title")
    ns = _child(page, "ns")
    revision = _child(page, "revision")
    text = _child(revision, "text") if revision is not None else None
    return Page(
        title=(title.text or "") if title is not None else "",
        ns=int(ns.text) if ns is not None and ns.text else 0,
        redirect=_child(page, "redirect") is not None,
        text=(text.text or "") if text is not None else "",
    )


def iter_pages(path: Path) -> Iterator[Page]:
    """Stream the pages of a bz2-compressed MediaWiki XML dump.

    Args:
        path (Path): The ``.xml.bz2`` dump.

    Yields:
        Page: Each page in file order.
    """
    with bz2.open(path, "rb") as stream:
        for _, element in ET.iterparse(stream, events=("end",)):
            if _local_name(element.tag) == "page":
                yield _page_from_element(element)
                # Freed page by page so a large dump is never held in memory.
                element.clear()


def is_article(page: Page) -> bool:
    """Tell whether a page is an article: main namespace and not a redirect.

    Args:
        page (Page): A page of the dump.

    Returns:
        bool: True for an article.
    """
    is_redirect = page.redirect or page.text.lstrip().upper().startswith("#REDIRECT")
    return page.ns == 0 and not is_redirect


def _close_tables_on_own_line(wikitext: str) -> str:
    """Move a table end written after a cell (``| x |}``) onto its own line.

    MediaWiki only ends a table at a ``|}`` that starts a line, so such a table
    runs on to the next table end and swallows the sections between.
    """
    return _INLINE_TABLE_END_RE.sub("\\1\n|}", wikitext)


def _is_prose_free_tag(tag: mwparserfromhell.nodes.Tag) -> bool:
    """Tell whether a tag holds citations or table cells rather than prose.

    A table holding a section heading was left open by mistake and runs over
    the article's prose, so it is kept.
    """
    name = str(tag.tag).strip().lower()
    if tag.contents is None or name not in _NON_PROSE_TAGS:
        return False
    return name != "table" or not tag.contents.filter_headings(recursive=True)


def _drop_non_prose(code: mwparserfromhell.wikicode.Wikicode) -> None:
    """Empty image and category links, references and tables, which are not prose.

    Nodes are emptied in place rather than removed: an empty node strips to
    nothing, and this avoids searching the tree for each node's parent.
    """
    for link in code.filter_wikilinks(recursive=True):
        if str(link.title).strip().lower().startswith(_HIDDEN_LINK_PREFIXES):
            link.title = ""
            link.text = None
    # mwparserfromhell counts these tags' contents as visible text, but references
    # are citations and table cells are mostly numbers.
    for tag in code.filter_tags(recursive=True):
        if _is_prose_free_tag(tag):
            tag.contents = ""


def _drop_tables(text: str) -> str:
    """Remove ``{| ... |}`` tables that the parser left as literal text.

    A table whose end is missing is kept: dropping it would drop the rest of
    the article.
    """
    lines = text.split("\n")
    kept: list[str] = []
    depth, opened_at = 0, 0
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("{|"):
            opened_at = index if depth == 0 else opened_at
            depth += 1
        elif depth == 0:
            kept.append(line)
        if depth and (stripped.startswith("|}") or stripped.endswith("|}")):
            depth -= 1
    if depth:
        kept.extend(lines[opened_at:])
    return "\n".join(kept)


def _sub_until_stable(pattern: re.Pattern, replacement: str, text: str) -> str:
    """Apply a substitution until nothing changes, for nested markup."""
    while True:
        text, count = pattern.subn(replacement, text)
        if not count:
            return text


def clean_leftovers(text: str) -> str:
    """Clean what ``strip_code`` leaves behind when wikitext is malformed.

    Args:
        text (str): Text after ``strip_code``.

    Returns:
        str: The text without tables or table rows, references, tags,
        templates, link brackets, category or file lines, runs of blank lines,
        and with each line stripped.
    """
    text = _drop_tables(text)
    text = _REF_RE.sub("", text)
    text = _TAG_RE.sub("", text)
    text = _sub_until_stable(_TEMPLATE_RE, "", text)
    text = _sub_until_stable(_PIPED_LINK_RE, r"\1", text)
    text = _sub_until_stable(_LINK_RE, r"\1", text)
    lines = [line.strip() for line in text.split("\n") if not _DEBRIS_LINE_RE.match(line)]
    return _BLANK_LINES_RE.sub("\n\n", "\n".join(lines)).strip()


def clean_wikitext(wikitext: str) -> str:
    """Turn an article's wikitext into plain text.

    Args:
        wikitext (str): The raw wikitext.

    Returns:
        str: Plain prose with section titles, paragraphs separated by one blank line.
    """
    code = mwparserfromhell.parse(_close_tables_on_own_line(wikitext))
    _drop_non_prose(code)
    return clean_leftovers(code.strip_code())


def split_of(title: str) -> str:
    """Return the split an article belongs to, fixed by its title alone.

    Args:
        title (str): The article title.

    Returns:
        str: ``"test"`` for about one title in ten, else ``"train"``.
    """
    digest = hashlib.md5(title.encode("utf-8")).hexdigest()
    return "test" if int(digest, 16) % 10 == 0 else "train"


def parse_articles(pages: Iterable[Page]) -> dict[str, list[dict[str, str]]]:
    """Clean the articles among ``pages`` and split them by title.

    Args:
        pages (Iterable[Page]): Pages of a dump.

    Returns:
        dict[str, list[dict[str, str]]]: For each split, ``{"title", "text"}``
        records in dump order; articles shorter than ``MIN_CHARS`` are dropped.
    """
    splits: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    for page in pages:
        if not is_article(page):
            continue
        text = clean_wikitext(page.text)
        if len(text) >= MIN_CHARS:
            splits[split_of(page.title)].append({"title": page.title, "text": text})
    return splits


def wiki_cache_dir(cache_root: Path | None = None) -> Path:
    """Return the folder that holds the cleaned ``{train,test}.jsonl``.

    Args:
        cache_root (Path | None): The prunext cache; ``cache_dir()`` when None.

    Returns:
        Path: ``<cache_root>/wiki/<CACHE_VERSION>`` (not created here).
    """
    return Path(cache_root or cache_dir()) / "wiki" / CACHE_VERSION


def _write_jsonl_atomically(records: list[dict[str, str]], path: Path) -> None:
    """Write JSON lines so that a reader never sees a half-written file.

    Several processes (one per rank) may build the cache at once; each writes
    its own temporary file and the last ``os.replace`` wins with identical text.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_wiki_cache(cache_root: Path | None = None) -> dict[str, Path]:
    """Parse the dump and (re)write the cleaned splits.

    Args:
        cache_root (Path | None): The prunext cache; ``cache_dir()`` when None.

    Returns:
        dict[str, Path]: The JSON lines file of each split.
    """
    folder = wiki_cache_dir(cache_root)
    folder.mkdir(parents=True, exist_ok=True)
    source = dump_path()
    logger.info("Parsing the built-in Wikipedia text from %s (once).", source)
    start = time.perf_counter()
    splits = parse_articles(iter_pages(source))
    paths = {name: folder / f"{name}.jsonl" for name in SPLITS}
    for name in SPLITS:
        _write_jsonl_atomically(splits[name], paths[name])
    logger.info(
        "Parsed %s articles in %.1f s into %s.",
        " + ".join(f"{len(splits[n])} {n}" for n in SPLITS),
        time.perf_counter() - start,
        folder,
    )
    return paths


def ensure_wiki_cache(cache_root: Path | None = None) -> dict[str, Path]:
    """Return the cleaned split files, parsing the dump only if they are missing.

    Args:
        cache_root (Path | None): The prunext cache; ``cache_dir()`` when None.

    Returns:
        dict[str, Path]: The JSON lines file of each split.
    """
    paths = {name: wiki_cache_dir(cache_root) / f"{name}.jsonl" for name in SPLITS}
    if all(path.is_file() for path in paths.values()):
        return paths
    return build_wiki_cache(cache_root)


def wiki_articles(split: str = "train", cache_root: Path | None = None) -> list[dict[str, str]]:
    """Return the cleaned articles of one split of ``builtin:wiki``.

    Args:
        split (str): ``"train"`` or ``"test"``.
        cache_root (Path | None): The prunext cache; ``cache_dir()`` when None.

    Returns:
        list[dict[str, str]]: ``{"title", "text"}`` records in dump order.

    Raises:
        DataError: If ``split`` is not a known split or gensim is missing.
    """
    if split not in SPLITS:
        raise DataError(f"builtin:wiki has no split {split!r}; use one of {', '.join(SPLITS)}.")
    path = ensure_wiki_cache(cache_root)[split]
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]
