"""Text data for prunext: the built-in Wikipedia text, data specs, token windows."""

from prunext.data.sources import ACCEPTED_FORMS, BUILTIN_SPECS, load_text_dataset
from prunext.data.tokens import check_tokenizer, check_vocab, token_chunks, token_stream, windows
from prunext.data.wiki import ensure_wiki_cache, wiki_articles

__all__ = [
    "ACCEPTED_FORMS",
    "BUILTIN_SPECS",
    "check_tokenizer",
    "check_vocab",
    "ensure_wiki_cache",
    "load_text_dataset",
    "token_chunks",
    "token_stream",
    "wiki_articles",
    "windows",
]
