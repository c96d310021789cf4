"""Print the article, character and token counts of builtin:wiki, for the README.

Usage:
    python scripts/wiki_token_counts.py TOKENIZER_FOLDER

TOKENIZER_FOLDER is any Hugging Face tokenizer folder (``tokenizer.json`` and
``tokenizer_config.json``), e.g. a converted model folder. Counts include the
EOS token appended after each article, as in training.
"""

import argparse
import logging

from transformers import AutoTokenizer

from prunext.data import token_stream, wiki_articles
from prunext.data.wiki import SPLITS


def split_counts(split: str, tokenizer) -> tuple[int, int, int]:
    """Return the articles, characters and tokens of one split.

    Args:
        split (str): ``"train"`` or ``"test"``.
        tokenizer: A Hugging Face tokenizer.

    Returns:
        tuple[int, int, int]: Articles, characters, tokens.
    """
    texts = [article["text"] for article in wiki_articles(split)]
    tokens = token_stream(texts, tokenizer, progress=False)
    return len(texts), sum(len(text) for text in texts), tokens.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer", help="a Hugging Face tokenizer folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(f"builtin:wiki with the tokenizer in {args.tokenizer}:")
    print("| split | articles | characters | tokens |")
    print("|---|---:|---:|---:|")
    for split in SPLITS:
        articles, chars, tokens = split_counts(split, tokenizer)
        print(f"| {split} | {articles:,} | {chars:,} | {tokens:,} |")


if __name__ == "__main__":
    main()
