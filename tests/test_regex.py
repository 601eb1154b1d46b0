"""core.regex: module-name patterns matched by an automaton. Differential tests against Python's `re` on generated
patterns and paths (same answers), linear time on the patterns that make `re` backtrack exponentially, and the
non-regular constructs refused."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.core import regex

from time_limit import within

ALPHABET = "ab._1"
atoms = st.sampled_from(["a", "b", r"\.", ".", "_", "1", r"\d", r"\w", r"\W", "[ab]", "[^a]", "[a-b1]", "[.]", "(?:)"])


def _wrap(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    quantifiers = st.sampled_from(["", "*", "+", "?", "*?", "+?", "{2}", "{0,2}", "{1,}", "{1,3}?"])
    group = st.tuples(inner, st.sampled_from(["(", "(?:", "(?i:"]), quantifiers).map(lambda t: f"{t[1]}{t[0]}){t[2]}")
    alternation = st.lists(inner, min_size=2, max_size=3).map(lambda xs: "(?:" + "|".join(xs) + ")")
    sequence = st.lists(inner, min_size=1, max_size=3).map("".join)
    return group | alternation | sequence


patterns = st.tuples(
    st.sampled_from(["", "^", r"\A", "(?i)", r"\b"]),
    st.recursive(atoms, _wrap, max_leaves=6),
    st.sampled_from(["", "$", r"\Z", r"\b", r"\B", "$\n?"]),
).map("".join)
paths = st.text(alphabet=ALPHABET + "A\n", max_size=7)


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(pattern=patterns, path=paths)
def test_same_answer_as_re(pattern, path):
    expected = re.fullmatch(pattern, path) is not None
    assert regex.fullmatch(pattern, path) is expected, (pattern, path)


@settings(max_examples=200, derandomize=True, deadline=None, database=None)
@given(key=patterns.filter(lambda p: not p.startswith("(?i)")), path=paths)
def test_suffix_match_is_pefts_rule(key, path):
    expected = re.fullmatch(rf"(.*\.)?(?:{key})", path) is not None
    assert regex.suffix_match(key, path) is expected, (key, path)


@pytest.mark.parametrize("pattern, path, expected", [
    (r"model\.layers\.\d+\.self_attn\.(q|v)_proj", "model.layers.11.self_attn.v_proj", True),
    (r"model\.layers\.\d+\.self_attn\.(q|v)_proj", "model.layers.11.self_attn.k_proj", False),
    (r".*\.(q_proj|v_proj)", "a.b.q_proj", True),
    (r"(?i)Q_PROJ", "q_proj", True),
    (r"a{2,3}", "aaaa", False),
    (r"^a$\n", "a\n", True),          # as re: $ matches before a final newline
    (r"^a$", "a\n", False),
    (r"\bq", "q", True),
    (r"\b", "", False),
    ("", "", True),
])
def test_examples(pattern, path, expected):
    assert regex.fullmatch(pattern, path) is expected
    assert (re.fullmatch(pattern, path) is not None) is expected


@pytest.mark.parametrize("pattern", [r"((.)*)*Z", r"(a|a)*Z", r"(a|aa)*Z", r"(a*)*b", r"(.*){1,30}Z",
                                     r".*.*.*.*.*.*.*.*.*.*.*.*.*.*.*.*Z", r"(\w|\d)+Z", r"(x+x+)+y"])
def test_catastrophic_patterns_are_linear(pattern):
    for n in (30, 300, 3000):
        with within(2.0, f"{pattern} on {n} characters"):
            assert not regex.fullmatch(pattern, "a" * n + "!")
            assert not regex.fullmatch(pattern, "x" * n)


@pytest.mark.parametrize("pattern, word", [
    ("(?=a)a", "lookahead"), ("(?!a)b", "lookahead"), ("(?<=a)b", "lookbehind"), (r"(a)\1", "backreference"),
    (r"(a)?(?(1)b|c)", "conditional"), ("(?>a)", "atomic group"), ("a*+", "possessive"), ("a++", "possessive"),
    ("a{50000}", "too large"), ("(" * 150 + "a" + ")" * 150, "deep"), ("(", "not a valid regular expression"),
    ("x" * 20_000, "characters long"),
])
def test_refused(pattern, word):
    with within(2.0), pytest.raises(regex.RegexError, match=word):
        regex.compile(pattern)


def test_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(regex, "_CACHE_LIMIT", 500)
    p = regex.compile(r"(?:[a-z]+\.)*[a-z_]*\d*")
    for i in range(3000):
        assert p.fullmatch(f"model.layers.mlp.up_proj{i}")
        assert len(p._cache.steps) <= 500 + 40 and len(p._cache.closures) <= 500 + 40


def test_shared_between_threads():
    """One compiled pattern used by many threads at once (caches filled and replaced concurrently) answers as re."""
    import threading

    p = regex.compile(r"(?:model\.)?layers\.\d+\.(q|v)_proj")
    paths = [f"{'model.' if i % 3 else ''}layers.{i}.{'qkvo'[i % 4]}_proj" for i in range(400)]
    expected = [re.fullmatch(p.pattern, x) is not None for x in paths]
    errors = []

    def work():
        for _ in range(20):
            got = [p.fullmatch(x) for x in paths]
            if got != expected:
                errors.append(got)
            p._cache = regex._Cache() if len(p._cache.steps) > 200 else p._cache  # force replacements

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
