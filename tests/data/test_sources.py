"""Resolving data specs: built-in, local files and folders, hub names, and their checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from prunext.data.sources import (
    BUILTIN_SPECS,
    HubSpec,
    load_text_dataset,
    looks_like_path,
    parse_hub_spec,
)
from prunext.data.wiki import ensure_wiki_cache, wiki_articles
from prunext.errors import DataError

DOCS = ["First document.\nIt has two lines.", "Second document.", "Third document."]


@pytest.fixture(scope="module")
def wiki_root(tmp_path_factory) -> Path:
    """The same cache folder as test_wiki.py, so one session parses the dump once."""
    root = tmp_path_factory.getbasetemp() / "prunext-wiki-cache"
    ensure_wiki_cache(root)
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_builtin_wiki_defaults_to_train(wiki_root):
    data = load_text_dataset("builtin:wiki", cache_root=wiki_root)
    assert isinstance(data, datasets.Dataset)
    assert data["text"] == [a["text"] for a in wiki_articles("train", wiki_root)]
    assert "title" in data.column_names


def test_builtin_wiki_test_split(wiki_root):
    data = load_text_dataset("builtin:wiki:test", cache_root=wiki_root)
    assert data["title"] == [a["title"] for a in wiki_articles("test", wiki_root)]


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(DataError) as error:
        load_text_dataset("builtin:books")
    assert all(spec in str(error.value) for spec in BUILTIN_SPECS)


def test_txt_file_gives_one_row_per_paragraph(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    data = load_text_dataset(str(path), cache_root=tmp_path)
    assert [text.strip() for text in data["text"]] == DOCS


def test_jsonl_file_keeps_other_columns(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t, "id": i} for i, t in enumerate(DOCS)])
    data = load_text_dataset(str(path), cache_root=tmp_path)
    assert data["text"] == DOCS
    assert data["id"] == [0, 1, 2]


def test_parquet_file(tmp_path):
    path = tmp_path / "corpus.parquet"
    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(path))
    assert load_text_dataset(str(path), cache_root=tmp_path)["text"] == DOCS


def test_folder_reads_its_files_in_name_order(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"text": DOCS[2]}])
    write_jsonl(folder / "a.jsonl", [{"text": t} for t in DOCS[:2]])
    (folder / "README.md").write_text("not data", encoding="utf-8")
    assert load_text_dataset(str(folder), cache_root=tmp_path)["text"] == DOCS


def test_folder_with_mixed_kinds(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": DOCS[0]}])
    (tmp_path / "b.txt").write_text(DOCS[1], encoding="utf-8")
    with pytest.raises(DataError, match="mixes file kinds"):
        load_text_dataset(str(tmp_path), cache_root=tmp_path)


def test_streaming_a_local_file(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in DOCS])
    data = load_text_dataset(str(path), streaming=True, cache_root=tmp_path)
    assert isinstance(data, datasets.IterableDataset)
    assert [row["text"] for row in data] == DOCS


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_text_dataset(str(tmp_path / name), cache_root=tmp_path)


def test_empty_json_list(tmp_path):
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_text_dataset(str(tmp_path / "empty.json"), cache_root=tmp_path)


def test_missing_text_column_names_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"content": t, "id": 1} for t in DOCS])
    with pytest.raises(DataError, match=r"\['content', 'id'\].*'text' column"):
        load_text_dataset(str(path), cache_root=tmp_path)


def test_text_column_must_hold_strings(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": i} for i in range(3)])
    with pytest.raises(DataError, match="not strings"):
        load_text_dataset(str(path), cache_root=tmp_path)


def test_unreadable_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": ', encoding="utf-8")
    with pytest.raises(DataError, match="could not be read"):
        load_text_dataset(str(tmp_path / "bad.jsonl"), cache_root=tmp_path)


@pytest.mark.parametrize("spec", ["missing.jsonl", "./missing", "/no/such/folder", "data/train/part"])
def test_nonexistent_path(spec):
    with pytest.raises(DataError, match="no such file"):
        load_text_dataset(spec)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("wikitext", HubSpec("wikitext", None, "train")),
        ("wikitext:wikitext-2-raw-v1@test", HubSpec("wikitext", "wikitext-2-raw-v1", "test")),
        ("allenai/c4:en", HubSpec("allenai/c4", "en", "train")),
        ("owner/name@validation", HubSpec("owner/name", None, "validation")),
    ],
)
def test_parse_hub_spec(spec, expected):
    assert parse_hub_spec(spec) == expected


@pytest.mark.parametrize("spec", ["wikitext:", "wikitext@", ":config"])
def test_parse_hub_spec_empty_part(spec):
    with pytest.raises(DataError, match="empty part"):
        parse_hub_spec(spec)


@pytest.mark.parametrize(
    "spec, is_path",
    [("owner/name", False), ("wikitext", False), ("a/b/c", True), ("x.parquet", True), ("~/d", True)],
)
def test_looks_like_path(spec, is_path):
    assert looks_like_path(spec) is is_path


def test_unreachable_hub_data_set_is_a_data_error():
    # A child process with the hub switched off fails at once instead of retrying for ~20 s;
    # the switch is read when huggingface_hub is imported, hence the separate process.
    code = (
        "from prunext.data import load_text_dataset\n"
        "from prunext.errors import DataError\n"
        "try:\n"
        "    load_text_dataset('wikitext:wikitext-2-raw-v1@test')\n"
        "except DataError as error:\n"
        "    print('DataError:', error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    message = result.stdout.strip()
    assert message.startswith("DataError: data 'wikitext:wikitext-2-raw-v1@test' is not a local")
    assert "name[:config][@split]" in message
    assert "\n" not in message
