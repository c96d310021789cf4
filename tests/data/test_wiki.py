"""The built-in Wikipedia text: parsing, cleaning, split and cache."""

import json
from pathlib import Path

import pytest

from prunext.data.wiki import (
    MIN_CHARS,
    SPLITS,
    Page,
    clean_wikitext,
    dump_path,
    ensure_wiki_cache,
    is_article,
    iter_pages,
    parse_articles,
    split_of,
    wiki_articles,
)
from prunext.errors import DataError


@pytest.fixture(scope="module")
def wiki_root(tmp_path_factory) -> Path:
    """A cache shared by the test modules of one session, so the dump is parsed once."""
    root = tmp_path_factory.getbasetemp() / "prunext-wiki-cache"
    ensure_wiki_cache(root)
    return root


@pytest.fixture(scope="module")
def articles(wiki_root) -> dict[str, list[dict[str, str]]]:
    return {split: wiki_articles(split, wiki_root) for split in SPLITS}


@pytest.fixture(scope="module")
def pages() -> list[Page]:
    return list(iter_pages(dump_path()))


def test_both_splits_have_articles(articles):
    assert len(articles["train"]) > 50
    assert len(articles["test"]) > 0
    assert all(len(a["text"]) >= MIN_CHARS for split in SPLITS for a in articles[split])


def test_split_is_by_title_and_disjoint(articles):
    titles = {split: [a["title"] for a in articles[split]] for split in SPLITS}
    assert not set(titles["train"]) & set(titles["test"])
    for split in SPLITS:
        assert len(titles[split]) == len(set(titles[split]))
        assert all(split_of(title) == split for title in titles[split])


def test_split_of_is_pinned_by_the_title_hash():
    # The md5 of a title is the same on every run and machine, so these never move.
    assert split_of("Anarchism") == "train"
    assert split_of("An American in Paris") == "test"
    assert sum(split_of(f"title {i}") == "test" for i in range(1000)) in range(70, 130)


def test_a_second_parse_gives_the_same_articles(articles, pages):
    # Reparsing every test article and a few train ones keeps this test fast.
    chosen = {a["title"] for a in articles["test"]} | {a["title"] for a in articles["train"][:5]}
    reparsed = parse_articles(p for p in pages if p.title in chosen)
    for split in SPLITS:
        cached = {a["title"]: a["text"] for a in articles[split]}
        assert reparsed[split]
        assert all(cached[a["title"]] == a["text"] for a in reparsed[split])


def test_redirects_and_other_namespaces_are_dropped(articles, pages):
    redirects = {p.title for p in pages if p.redirect}
    other_ns = {p.title for p in pages if p.ns != 0}
    assert redirects and other_ns, "the dump should hold both kinds, or this test checks nothing"
    kept = {a["title"] for split in SPLITS for a in articles[split]}
    assert not kept & (redirects | other_ns)


def test_is_article():
    assert is_article(Page("A", 0, False, "Text."))
    assert not is_article(Page("A", 0, True, "Text."))
    assert not is_article(Page("A", 0, False, "  #redirect [[B]]"))
    assert not is_article(Page("Wikipedia:A", 4, False, "Text."))


@pytest.mark.parametrize("markup", ["[[", "]]", "{{", "}}", "<ref", "{|", "\n\n\n"])
def test_no_markup_survives(articles, markup):
    for split in SPLITS:
        for article in articles[split]:
            assert markup not in article["text"], article["title"]


def test_no_blank_or_padded_lines(articles):
    for article in articles["train"][:20]:
        text = article["text"]
        assert text == text.strip()
        assert all(line == line.rstrip() for line in text.split("\n"))


def test_clean_wikitext_drops_non_prose():
    wikitext = (
        "{{Infobox|name=X}}\n'''Foo''' is a [[bar|baz]].<ref>Cited, p. 1.</ref> It is [[qux]].\n"
        "[[File:Foo.jpg|thumb|A [[caption]].]]\n\n\n\n== History ==\nOld.<ref name=a/>\n"
        "{| class=wikitable\n|-\n| cell\n|}\n   \n[[Category:Things]]"
    )
    assert clean_wikitext(wikitext) == "Foo is a baz. It is qux.\n\nHistory\nOld."


def test_clean_wikitext_keeps_prose_after_a_table_closed_mid_line():
    wikitext = "Intro.\n{| class=x\n|-\n| a || b |}\n\n==Economy==\nProse."
    assert clean_wikitext(wikitext) == "Intro.\n\nEconomy\nProse."


def test_cache_is_reused(wiki_root, articles):
    paths = ensure_wiki_cache(wiki_root)
    before = {split: path.stat().st_mtime_ns for split, path in paths.items()}
    assert wiki_articles("test", wiki_root) == articles["test"]
    assert ensure_wiki_cache(wiki_root) == paths
    assert {split: path.stat().st_mtime_ns for split, path in paths.items()} == before
    # The atomic writer leaves no temporary files behind.
    assert sorted(p.name for p in paths["train"].parent.iterdir()) == ["test.jsonl", "train.jsonl"]


def test_cache_is_json_lines(wiki_root):
    lines = ensure_wiki_cache(wiki_root)["test"].read_text(encoding="utf-8").splitlines()
    assert all(set(json.loads(line)) == {"title", "text"} for line in lines)


def test_unknown_split(wiki_root):
    with pytest.raises(DataError, match="train, test"):
        wiki_articles("validation", wiki_root)
