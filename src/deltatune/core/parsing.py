"""Reading what a user may not have written: bounded JSON and YAML, short reprs for messages, printable text.

Every JSON or YAML document deltatune reads goes through `read_json` / `load_json` / `load_yaml`, which refuse,
with a typed error naming the file, what would make reading or checking it hang or exhaust memory:

* nesting deeper than `MAX_DEPTH` (a 200 000-deep JSON array, a 10 000-deep YAML recipe), checked before
  Python's recursive parsers run (YAML) or caught from them (JSON), so no `RecursionError` escapes;
* a YAML alias tree that expands to more than `MAX_NODES` values (a "billion laughs": ~400 bytes that stand for
  10^9 strings); the size is counted on the parser's event stream, before anything is built (YAML files are
  configuration: recipes, training options);
* JSON files larger than `MAX_JSON_BYTES`, numbers of more digits than Python converts.

Messages show values with `short`, which never builds more than a bounded prefix of a value's repr, however large
or self-similar the value is.
"""
from __future__ import annotations

import json
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError, CorruptFileError, DeltaNotFoundError, DeltaTuneError

__all__ = ["MAX_DEPTH", "MAX_NODES", "MAX_JSON_BYTES", "short", "printable", "read_json", "load_json", "load_yaml",
           "check_tree", "expect"]

#: the deepest nesting of lists/objects accepted in any JSON or YAML document
MAX_DEPTH = 100
#: the most values a YAML document (or a dict given in code for one) may expand to, aliases counted at every use
MAX_NODES = 100_000
#: the largest JSON file read
MAX_JSON_BYTES = 256 << 20

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6
_REPR.maxlong = 40


def short(value: Any, limit: int = 60) -> str:
    """repr(value), at most `limit` characters; only a bounded part of the value is ever looked at."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that fails: say what it is
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str, keep_newlines: bool = False) -> str:
    """`text` with every control or otherwise non-printable character (terminal escape sequences, bidi overrides)
    written as a Python escape, so printing it cannot change the terminal."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or (keep_newlines and ch == "\n"):
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1] if ch not in "'\"" else ch)
    return "".join(out)


# --- JSON --------------------------------------------------------------------------------------------------------
def load_json(text: str | bytes, where: str, error: type[DeltaTuneError] = CorruptFileError) -> Any:
    """`text` parsed as JSON; `error` naming `where` if it is not JSON or nests deeper than MAX_DEPTH."""
    try:
        data = json.loads(text)
    except DeltaTuneError:
        raise
    except RecursionError:
        raise error(f"{where} nests lists/objects more than {MAX_DEPTH} deep; it is not a file deltatune wrote") from None
    except UnicodeDecodeError as e:
        raise error(f"{where} is not UTF-8 text ({e}); the file is damaged") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more digits than Python converts
        raise error(f"{where} is not valid JSON ({short(str(e), 200)}); the file is damaged") from None
    _check_depth(data, where, error)  # JSON has no aliases (its size is the file's) and no shared values
    return data


def _check_depth(data: Any, where: str, error: type[DeltaTuneError], max_depth: int = MAX_DEPTH) -> None:
    """`check_tree` for freshly parsed JSON (a tree: no shared values, no cycles, size bounded by the file): depth only,
    walking containers alone."""
    stack = [(data, 1)] if isinstance(data, (dict, list)) else []
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise error(f"{where} nests lists/mappings more than {max_depth} deep; refused")
        for child in (value.values() if isinstance(value, dict) else value):
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


def read_json(path: Path, what: str = "", error: type[DeltaTuneError] = CorruptFileError,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON file at `path`, bounded (see the module doc); `what` names it in messages ("delta file")."""
    where = f"{what + ' ' if what else ''}{str(path)!r}"
    return load_json(_read_file(path, where, "JSON", error, DeltaNotFoundError, max_bytes), where, error)


def _read_file(path: Path, where: str, kind: str, error: type[DeltaTuneError], missing: type[DeltaTuneError],
               max_bytes: int | None = None) -> bytes:
    """The bytes of the `kind` ("JSON") file at `path`, as typed errors naming `where`: `missing` when it does not
    exist, `error` when it is a directory, unreadable, or larger than `max_bytes`."""
    try:
        if max_bytes is not None:
            size = path.stat().st_size
            if size > max_bytes:
                raise error(f"{where} is {size} bytes; a {kind} file deltatune reads is at most {max_bytes}")
        return path.read_bytes()
    except FileNotFoundError:
        raise missing(f"{where} does not exist") from None
    except IsADirectoryError:
        raise error(f"{where} is a directory, not a {kind} file") from None
    except OSError as e:
        raise error(f"{where} cannot be read ({e.strerror or e})") from None


def check_tree(data: Any, where: str, error: type[DeltaTuneError] = ConfigError, max_depth: int = MAX_DEPTH,
               max_nodes: int | None = MAX_NODES) -> None:
    """Refuse a parsed document (or a dict given in code) that nests deeper than `max_depth` (a cycle nests without
    end) or holds more than `max_nodes` values, counting a shared value at every place it appears, without walking
    it twice."""
    sizes: dict[int, tuple[int, int]] = {}  # id -> (values it expands to, its height)
    keep_alive: list[Any] = []  # ids stay unique while we hold the values
    stack: list[tuple[Any, int, bool]] = [(data, 1, False)]  # iterative post-order walk: (value, depth, done?)
    while stack:
        value, depth, done = stack.pop()
        if not isinstance(value, (dict, list, tuple)):
            continue
        children = value.values() if isinstance(value, dict) else value
        if done:
            known = [sizes.get(id(c), (1, 0)) for c in children if isinstance(c, (dict, list, tuple))]
            total = 1 + len(value) - len(known) + sum(k[0] for k in known)
            if max_nodes is not None and total > max_nodes:
                raise error(f"{where} holds more than {max_nodes} values (counting every use of a YAML alias); "
                            f"refused")
            sizes[id(value)] = (total, 1 + max((k[1] for k in known), default=0))
            continue
        if id(value) in sizes:
            if depth + sizes[id(value)][1] - 1 > max_depth:
                raise error(f"{where} nests lists/mappings more than {max_depth} deep; refused")
            continue
        if depth > max_depth:
            raise error(f"{where} nests lists/mappings more than {max_depth} deep; refused")
        keep_alive.append(value)
        stack.append((value, depth, True))
        stack.extend((c, depth + 1, False) for c in children if isinstance(c, (dict, list, tuple)))


# --- YAML --------------------------------------------------------------------------------------------------------
def _yaml_bounds(text: str, where: str, error: type[DeltaTuneError]) -> None:
    """Walk the YAML event stream (no recursion, nothing built) and refuse deep nesting and alias blow-up."""
    import yaml
    from yaml import events as ev

    sizes: dict[str, int] = {}       # anchor -> how many values it expands to
    stack: list[list] = []           # open collections: [size so far, anchor]
    grand = 0                        # values so far, every alias expanded
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (ev.MappingStartEvent, ev.SequenceStartEvent)):
            if len(stack) >= MAX_DEPTH:
                raise error(f"{where} nests lists/mappings more than {MAX_DEPTH} deep; refused")
            stack.append([1, event.anchor])
            grand += 1
            size = 0
        elif isinstance(event, (ev.MappingEndEvent, ev.SequenceEndEvent)):
            size, anchor = stack.pop()
            if anchor is not None:
                sizes[anchor] = size
            if stack:
                stack[-1][0] += size
            continue
        elif isinstance(event, ev.ScalarEvent):
            size = 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, ev.AliasEvent):
            size = sizes.get(event.anchor, 1)
        else:  # stream / document start and end
            continue
        if size and stack:
            stack[-1][0] += size
        grand += size
        if grand > MAX_NODES:
            raise error(f"{where} expands to more than {MAX_NODES} values (YAML aliases counted at every use, as in "
                        f"a 'billion laughs' file); refused")


def load_yaml(text: str, where: str, error: type[DeltaTuneError] = ConfigError) -> Any:
    """`text` parsed as YAML (safe: plain data only), bounded (see the module doc); `error` naming `where`."""
    import yaml

    try:
        _yaml_bounds(text, where, error)
        return yaml.safe_load(text)
    except DeltaTuneError:
        raise
    except yaml.YAMLError as e:
        raise error(f"{where} is not valid YAML: {short(str(e), 300)}") from None
    except RecursionError:
        raise error(f"{where} nests lists/mappings more than {MAX_DEPTH} deep; refused") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise error(f"{where} holds a value YAML cannot convert ({short(str(e), 200)})") from None


def read_yaml(path: Path, what: str, error: type[DeltaTuneError] = ConfigError) -> Any:
    """The YAML file at `path` (see `load_yaml`); `what` names it ("recipe")."""
    where = f"{what} {str(path)!r}"
    try:
        text = _read_file(path, where, "YAML", error, error).decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where} is not UTF-8 text ({e})") from None
    return load_yaml(text, where, error)


# --- fields of a parsed file -------------------------------------------------------------------------------------
def expect(ok: bool | Callable[[], bool], where: str, field: str, expected: str, value: Any,
           error: type[DeltaTuneError] = CorruptFileError) -> None:
    """Raise `error` "<where>: <field> must be <expected>, got <value>" unless `ok`."""
    if callable(ok):
        ok = ok()
    if not ok:
        raise error(f"{where}: {field} must be {expected}, got {short(value)}")
