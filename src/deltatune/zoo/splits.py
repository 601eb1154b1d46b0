"""`Splits` and the fixed, seeded split rules shared by every dataset."""
from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Example = dict[str, Any]
Task = Literal["classification", "generation"]

SPLIT_SEED = "deltatune-zoo-v1"  # changing it changes every split; never do that silently


@dataclass(frozen=True)
class Splits:
    """A dataset's fixed train / validation / test splits.

    classification examples are `{"text": str, "label": int}` with `labels[label]` the class name;
    generation examples are `{"prompt": str, "response": str, "answer": str}` and `labels` is None.
    """

    name: str
    task: Task
    train: list[Example] = field(repr=False)
    validation: list[Example] = field(repr=False)
    test: list[Example] = field(repr=False)
    labels: list[str] | None = None

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        labels = f", labels={len(self.labels)}" if self.labels is not None else ""
        return f"Splits({self.name!r}, {self.task}, {sizes}{labels})"


def _key(index: int) -> bytes:
    """Seeded, platform- and version-independent sort key of an example's position."""
    return hashlib.sha256(f"{SPLIT_SEED}:{index}".encode()).digest()


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def seeded_split(
    strata: Sequence[Any], fractions: Sequence[float]
) -> list[list[int]]:
    """Partition positions `0..len(strata)-1` into `len(fractions)` parts, stratified by `strata`.

    Within each stratum positions are ordered by a seeded SHA-256 key; part i takes the next
    round(n_stratum * fractions[i]) positions, the last part takes the rest. Each part is returned sorted.
    """
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, s in enumerate(strata):
        groups[s].append(i)
    parts: list[list[int]] = [[] for _ in fractions]
    for members in groups.values():
        members = sorted(members, key=_key)
        start = 0
        for p, frac in enumerate(fractions[:-1]):
            take = _round(len(members) * frac)
            parts[p] += members[start : start + take]
            start += take
        parts[-1] += members[start:]
    return [sorted(p) for p in parts]


def dedupe_classification(
    pairs: Sequence[tuple[str, str]], exclude: set[str] | frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """Drop empty texts, texts in `exclude`, texts seen with two different labels, and repeats (first kept)."""
    seen: dict[str, str | None] = {}
    for text, label in pairs:
        if not text or text in exclude:
            continue
        if text in seen and seen[text] != label:
            seen[text] = None  # conflicting labels: drop every copy
        else:
            seen.setdefault(text, label)
    kept, emitted = [], set()
    for text, label in pairs:
        if text in seen and seen[text] is not None and text not in emitted:
            kept.append((text, label))
            emitted.add(text)
    return kept


def _examples(pairs: Sequence[tuple[str, str]], index: dict[str, int], rows: Sequence[int]) -> list[Example]:
    return [{"text": pairs[i][0], "label": index[pairs[i][1]]} for i in rows]


def classification_splits(
    name: str,
    pairs: Sequence[tuple[str, str]],
    test_pairs: Sequence[tuple[str, str]] | None = None,
    *,
    validation: float = 0.1,
    test: float = 0.1,
) -> Splits:
    """Deduplicate and split (text, label name) pairs; with `test_pairs` the source's test split is kept.

    Without a source test split: stratified seeded 80/10/10 (train/validation/test by default).
    With one: test = the source's test split, validation = a stratified seeded 10% of the source's train,
    and train texts that also occur in test are dropped.
    """
    if test_pairs is not None:
        test_pairs = dedupe_classification(test_pairs)
        pairs = dedupe_classification(pairs, exclude={t for t, _ in test_pairs})
        labels = sorted({label for _, label in pairs} | {label for _, label in test_pairs})
        index = {label: i for i, label in enumerate(labels)}
        val_rows, train_rows = seeded_split([label for _, label in pairs], [validation, 1.0 - validation])
        return Splits(name, "classification", _examples(pairs, index, train_rows),
                      _examples(pairs, index, val_rows), _examples(test_pairs, index, range(len(test_pairs))),
                      labels)
    pairs = dedupe_classification(pairs)
    labels = sorted({label for _, label in pairs})
    index = {label: i for i, label in enumerate(labels)}
    test_rows, val_rows, train_rows = seeded_split(
        [label for _, label in pairs], [test, validation, 1.0 - test - validation]
    )
    return Splits(name, "classification", _examples(pairs, index, train_rows), _examples(pairs, index, val_rows),
                  _examples(pairs, index, test_rows), labels)
