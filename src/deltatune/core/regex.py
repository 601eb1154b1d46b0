"""Regular expressions on module paths, matched in linear time.

Module-name patterns come from files a user may not have written (a PEFT `rank_pattern` key, a recipe's
`modules.include`, a delta config's `targets`). Python's `re` backtracks, so a pattern such as ``((.)*)*Z`` takes
exponential time on a path that almost matches, and ``.*.*.*.*.*.*Z`` polynomial time of high degree. Here a pattern
is parsed with Python's own regex parser (so the syntax is exactly `re`'s) and matched by an automaton: the set of
positions of the pattern reached after each character of the path, built lazily and cached, so a match costs
O(len(pattern) · len(path)) at worst and one dictionary lookup per character once warm.

The language matched is the same as `re.fullmatch`'s; the constructs that are not regular and so have no
automaton are refused with `RegexError`: lookahead/lookbehind, backreferences, conditionals, atomic groups and
possessive quantifiers. Counted repeats are expanded (``a{2,5}`` is five copies), so a pattern is also refused when
its automaton would exceed `MAX_STATES` positions.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from re import _compiler, _parser
from re import _constants as C  # noqa: N812 - the opcodes of Python's regex parser (Python 3.11)
from re import error as ReError  # noqa: N812

__all__ = ["RegexError", "Pattern", "compile", "fullmatch", "suffix_match", "check", "MAX_STATES", "MAX_LENGTH"]

#: the most positions (characters, branches, loop points) a compiled pattern may have
MAX_STATES = 20_000
#: the longest pattern accepted, in characters
MAX_LENGTH = 10_000
#: the deepest nesting of groups accepted
MAX_NESTING = 100
_CACHE_LIMIT = 100_000  # cached transitions per pattern before the cache is emptied

_F_M, _F_A = C.SRE_FLAG_MULTILINE, C.SRE_FLAG_ASCII


class RegexError(ValueError):
    """A pattern that is not a valid regular expression, or one deltatune does not match (see the module doc). The
    message is a predicate: "<pattern> " + str(error) reads as a sentence."""


# --- character tests --------------------------------------------------------------------------------------------
def _char_test(op: object, av: object, flags: int) -> Callable[[str], bool]:
    """The test of one character-consuming item (a literal, a class, `.`) under `flags`, delegated to Python's own
    engine compiled for that single item: exactly `re`'s semantics (case folding, categories, ASCII/Unicode), and a
    one-character pattern cannot backtrack."""
    state = _parser.State()
    state.flags = flags
    compiled = _compiler.compile(_parser.SubPattern(state, [(op, av)]), flags)
    match = compiled.fullmatch
    return lambda c: match(c) is not None


def _is_word(c: str, ascii_only: bool) -> bool:
    """A word character as `\\b` sees it (sre: alphanumeric or underscore)."""
    if ascii_only:
        return c.isascii() and (c.isalnum() or c == "_")
    return c.isalnum() or c == "_"


# --- the automaton -----------------------------------------------------------------------------------------------
# A state is one of
#   ("char", test, next)        consumes one character for which test(c) is true
#   ("split", [targets])        goes on to every target without consuming anything
#   ("assert", condition, next) goes on if condition(context) holds at the current position
#   ("match",)                  the whole pattern has matched
# Contexts: (at_start, at_end, prev_newline, next_newline, next_is_last_newline, prev_word, next_word,
#            prev_word_ascii, next_word_ascii) — everything an anchor or a word boundary can ask.
_AT_START, _AT_END, _PREV_NL, _NEXT_NL, _LAST_NL, _PREV_W, _NEXT_W, _PREV_WA, _NEXT_WA = range(9)


class _Builder:
    def __init__(self) -> None:
        self.states: list[tuple] = []
        self.tests: dict[tuple, Callable[[str], bool]] = {}  # one test per distinct character item
        self.asserts = False

    def add(self, state: tuple) -> int:
        if len(self.states) >= MAX_STATES:
            raise RegexError(f"is too large to match safely (more than {MAX_STATES} positions once counted repeats are "
                             f"expanded); simplify it")
        self.states.append(state)
        return len(self.states) - 1

    def sequence(self, items: list, flags: int, nxt: int, depth: int) -> int:
        for op, av in reversed(list(items)):
            nxt = self.item(op, av, flags, nxt, depth)
        return nxt

    def char(self, op: object, av: object, flags: int, nxt: int) -> int:
        key = (op, repr(av), flags)
        test = self.tests.get(key)
        if test is None:
            test = self.tests[key] = _char_test(op, av, flags)
        return self.add(("char", test, nxt))

    def item(self, op: object, av: object, flags: int, nxt: int, depth: int) -> int:
        if depth > MAX_NESTING:
            raise RegexError(f"nests groups more than {MAX_NESTING} deep")
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            return self.char(op, av, flags, nxt)
        if op is C.BRANCH:
            _, alternatives = av  # type: ignore[misc]
            return self.add(("split", [self.sequence(alt, flags, nxt, depth + 1) for alt in alternatives]))
        if op is C.SUBPATTERN:
            _, add_flags, del_flags, body = av  # type: ignore[misc]
            return self.sequence(body, _compiler._combine_flags(flags, add_flags, del_flags), nxt, depth + 1)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):  # greedy or lazy: the same language
            low, high, body = av  # type: ignore[misc]
            if high is C.MAXREPEAT:
                loop = self.add(("split", []))
                start = self.sequence(body, flags, loop, depth + 1)
                self.states[loop] = ("split", [start, nxt])
                cur = loop
            else:
                cur = nxt
                for _ in range(high - low):  # (x(x(x)?)?)? : each optional copy may stop at nxt
                    cur = self.add(("split", [self.sequence(body, flags, cur, depth + 1), nxt]))
            for _ in range(low):
                cur = self.sequence(body, flags, cur, depth + 1)
            return cur
        if op is C.AT:
            self.asserts = True
            return self.add(("assert", _anchor(av, flags), nxt))
        names = {C.ASSERT: "a lookahead/lookbehind", C.ASSERT_NOT: "a negative lookahead/lookbehind",
                 C.GROUPREF: "a backreference", C.GROUPREF_EXISTS: "a conditional group",
                 C.ATOMIC_GROUP: "an atomic group", C.POSSESSIVE_REPEAT: "a possessive quantifier"}
        raise RegexError(f"uses {names.get(op, op)}, which module-name patterns do not support (they are matched "
                         f"by an automaton, in linear time); rewrite it, e.g. with exclude= for what must not match")


def _anchor(code: object, flags: int) -> Callable[[tuple], bool]:
    multiline, ascii_only = bool(flags & _F_M), bool(flags & _F_A)
    prev_w, next_w = (_PREV_WA, _NEXT_WA) if ascii_only else (_PREV_W, _NEXT_W)
    if code is C.AT_BEGINNING:
        return (lambda x: x[_AT_START] or x[_PREV_NL]) if multiline else (lambda x: x[_AT_START])
    if code is C.AT_BEGINNING_STRING:
        return lambda x: x[_AT_START]
    if code is C.AT_END:
        return (lambda x: x[_AT_END] or x[_NEXT_NL]) if multiline else (lambda x: x[_AT_END] or x[_LAST_NL])
    if code is C.AT_END_STRING:
        return lambda x: x[_AT_END]
    # like re, neither \b nor \B holds in an empty string
    if code is C.AT_BOUNDARY:
        return lambda x: x[prev_w] != x[next_w] and not (x[_AT_START] and x[_AT_END])
    if code is C.AT_NON_BOUNDARY:
        return lambda x: x[prev_w] == x[next_w] and not (x[_AT_START] and x[_AT_END])
    raise RegexError(f"uses the anchor {code}, which is not supported")


def _context(s: str, i: int) -> tuple:
    n = len(s)
    prev, nxt = (s[i - 1] if i else ""), (s[i] if i < n else "")
    return (i == 0, i == n, prev == "\n", nxt == "\n", nxt == "\n" and i == n - 1,
            bool(prev) and _is_word(prev, False), bool(nxt) and _is_word(nxt, False),
            bool(prev) and _is_word(prev, True), bool(nxt) and _is_word(nxt, True))


_NO_CONTEXT = (False,) * 9


class _Cache:
    """The automaton built so far: closures (state set, context) -> state set, steps (state set, character) -> the
    state set after it (empty: no match possible), and which sets accept. Entries are only ever added, and a
    full cache is replaced by a fresh one rather than emptied, so threads sharing a pattern never see a torn one."""

    __slots__ = ("closures", "steps", "accepting")

    def __init__(self) -> None:
        self.closures: dict[tuple[frozenset[int], tuple], frozenset[int]] = {}
        self.steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}
        self.accepting: dict[frozenset[int], bool] = {}


class Pattern:
    """A compiled module-name pattern: `fullmatch(path)` says whether the whole path matches. Safe to share between
    threads."""

    def __init__(self, pattern: str, states: list[tuple], start: int, asserts: bool) -> None:
        self.pattern = pattern
        self._states = states
        self._start = frozenset((start,))
        self._asserts = asserts
        self._cache = _Cache()

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r})"

    def _closure(self, cache: _Cache, kernel: frozenset[int], ctx: tuple) -> frozenset[int]:
        key = (kernel, ctx)
        found = cache.closures.get(key)
        if found is not None:
            return found
        seen: set[int] = set()
        out: set[int] = set()
        stack = list(kernel)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            st = self._states[i]
            if st[0] == "split":
                stack.extend(st[1])
            elif st[0] == "assert":
                if st[1](ctx):
                    stack.append(st[2])
            else:  # char or match
                out.add(i)
        found = frozenset(out)
        cache.accepting[found] = any(self._states[i][0] == "match" for i in out)
        cache.closures[key] = found
        return found

    def _step(self, cache: _Cache, current: frozenset[int], c: str) -> frozenset[int]:
        key = (current, c)
        found = cache.steps.get(key)
        if found is None:
            found = cache.steps[key] = frozenset(
                st[2] for st in (self._states[i] for i in current) if st[0] == "char" and st[1](c))
        return found

    def fullmatch(self, s: str) -> bool:
        """True when the whole of `s` matches (as `re.fullmatch(pattern, s) is not None`)."""
        cache = self._cache
        if len(cache.closures) > _CACHE_LIMIT or len(cache.steps) > _CACHE_LIMIT:  # bounded memory: start afresh
            cache = self._cache = _Cache()
        asserts = self._asserts
        current = self._closure(cache, self._start, _context(s, 0) if asserts else _NO_CONTEXT)
        for i, c in enumerate(s):
            kernel = self._step(cache, current, c)
            if not kernel:
                return False
            current = self._closure(cache, kernel, _context(s, i + 1) if asserts else _NO_CONTEXT)
        return cache.accepting[current]


def _parse(pattern: str) -> tuple[list, int]:
    if not isinstance(pattern, str):
        raise RegexError(f"is a {type(pattern).__name__}, not a string")
    if len(pattern) > MAX_LENGTH:
        raise RegexError(f"is {len(pattern)} characters long; at most {MAX_LENGTH} are accepted")
    try:
        parsed = _parser.parse(pattern, 0)
    except ReError as e:
        raise RegexError(f"is not a valid regular expression ({e})") from None
    except RecursionError:
        raise RegexError(f"nests groups more than {MAX_NESTING} deep") from None
    except (OverflowError, ValueError) as e:  # e.g. a repeat count beyond the regex engine's limit
        raise RegexError(f"is not a valid regular expression ({e})") from None
    return parsed.data, parsed.state.flags


def _build(parts: list[tuple[list, int]], pattern: str) -> Pattern:
    b = _Builder()
    nxt = b.add(("match",))
    try:
        for items, flags in reversed(parts):
            nxt = b.sequence(items, flags, nxt, 0)
    except RecursionError:
        raise RegexError(f"nests groups more than {MAX_NESTING} deep") from None
    return Pattern(pattern, b.states, nxt, b.asserts)


@functools.lru_cache(maxsize=1024)
def compile(pattern: str) -> Pattern:  # noqa: A001 - the module's verb, as re.compile
    """`pattern` compiled for `fullmatch`; RegexError if it is invalid or not matchable in linear time."""
    return _build([_parse(pattern)], pattern)


_DOTTED_PREFIX = r"(?:.*\.)?"


@functools.lru_cache(maxsize=1024)
def _suffix_pattern(key: str) -> Pattern:
    return _build([_parse(_DOTTED_PREFIX), _parse(key)], f"{_DOTTED_PREFIX}(?:{key})")


def check(pattern: str) -> None:
    """Raise RegexError unless `pattern` compiles (see `compile`)."""
    compile(pattern)


def fullmatch(pattern: str, s: str) -> bool:
    """`re.fullmatch(pattern, s) is not None`, in linear time."""
    return compile(pattern).fullmatch(s)


def suffix_match(key: str, path: str) -> bool:
    """PEFT's rule for a pattern key: `key` matches the whole path or its end after a dot, i.e. the path fully
    matches ``(.*\\.)?(?:key)`` (`key` is parsed on its own, so it cannot change the prefix)."""
    return _suffix_pattern(key).fullmatch(path)
