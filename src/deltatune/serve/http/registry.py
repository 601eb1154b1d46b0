"""Which deltas the server serves: every delta directory directly under the delta roots (by directory name), plus
hot loads and unloads, recorded in `<first root>/.deltatune-serve.json` so they survive a restart.

Paths given over HTTP are confined to the roots: resolved with every symlink followed (`realpath`), the directory
and every file in it must lie inside a root's own real path."""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from ...core.errors import ConfigError, DeltaNotFoundError, DeltaTuneError
from ...core.parsing import printable, read_json
from ...io.atomic import write_text
from ..engine import Engine

log = logging.getLogger("deltatune.serve")
STATE_FILE = ".deltatune-serve.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+:-]{0,127}")


class PathRefused(ConfigError):
    """A delta path outside the configured roots (or escaping them through a symlink)."""


def _inside(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


class Registry:
    def __init__(self, engine: Engine, roots: list[Path], base_name: str, convert_rank: int | None = None) -> None:
        self.engine, self.base_name, self.convert_rank = engine, base_name, convert_rank
        self.roots = [Path(os.path.realpath(r)) for r in roots]
        self.paths: dict[str, Path] = {}   # name -> resolved directory
        self.loaded_at: dict[str, int] = {}
        self.unloaded: set[str] = set()    # directory names unloaded over HTTP (kept unloaded across restarts)
        self.lock = threading.Lock()       # one registration change at a time

    # --- start -------------------------------------------------------------------------------------
    def scan(self) -> list[tuple[str, str]]:
        """Register every delta under the roots and apply the recorded hot loads/unloads; returns (name, reason)
        for each one skipped (the rest serve)."""
        skipped: list[tuple[str, str]] = []
        found: dict[str, Path] = {}
        for root in self.roots:
            if not root.is_dir():
                raise DeltaNotFoundError(f"delta root {str(root)!r} is not a directory")
            for entry in sorted(root.iterdir()):
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                if entry.name in found:
                    skipped.append((entry.name, f"the name is also a directory under {str(found[entry.name].parent)!r}"))
                    continue
                found[entry.name] = entry
        state = self._read_state()
        self.unloaded = set(state.get("unloaded", []))
        for name in self.unloaded:
            found.pop(name, None)
        for name, path in state.get("loaded", {}).items():
            found[name] = Path(path)
        for name, path in found.items():
            try:
                self._register(name, self.confine(str(path)))
            except DeltaTuneError as e:
                skipped.append((name, str(e)))
            except OSError as e:
                skipped.append((name, f"{e.strerror or e}"))
        return skipped

    # --- names and paths ---------------------------------------------------------------------------
    def check_name(self, name: str) -> None:
        if not NAME.fullmatch(name):
            raise ConfigError(f"a delta name is 1-128 characters: letters, digits and . _ @ + : - (not first), got "
                              f"{printable(name[:130])!r}")
        if name == self.base_name:
            raise ConfigError(f"{name!r} is the base model's name")

    def confine(self, given: str) -> Path:
        """The real path of `given` (relative: to the first root) if it and its files lie inside a root."""
        if "\x00" in given:
            raise PathRefused("the path holds a NUL character")
        p = Path(given)
        if not p.is_absolute():
            p = self.roots[0] / p
        real = os.path.realpath(p)
        roots = [str(r) for r in self.roots]
        if not any(_inside(real, r) for r in roots):
            raise PathRefused("the path is outside the server's delta roots")
        if not os.path.isdir(real):
            raise DeltaNotFoundError("no delta directory at that path under the delta roots")
        for entry in os.scandir(real):
            target = os.path.realpath(entry.path)
            if not any(_inside(target, r) for r in roots):
                raise PathRefused("a file of that delta links outside the server's delta roots")
        return Path(real)

    def names(self) -> list[str]:
        return sorted(self.paths)

    # --- changes -----------------------------------------------------------------------------------
    def _register(self, name: str, path: Path) -> None:
        self.check_name(name)
        self.engine.register(name, path, convert_rank=self.convert_rank)
        self.paths[name] = path
        self.loaded_at[name] = int(time.time())

    def load(self, name: str, given: str) -> None:
        """Register (or replace, for new requests only) `name` from `given`; typed errors leave everything as it
        was. Recorded for restarts."""
        with self.lock:
            self.check_name(name)
            path = self.confine(given)
            self._register(name, path)
            self.unloaded.discard(name)
            self._record()

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self.paths:
                raise KeyError(name)
            self.engine.unregister(name)
            del self.paths[name]
            self.unloaded.add(name)
            self._record()

    # --- the state file ----------------------------------------------------------------------------
    def _state_path(self) -> Path:
        return self.roots[0] / STATE_FILE

    def _read_state(self) -> dict:
        path = self._state_path()
        if not path.exists():
            return {}
        data = read_json(path, "serve state file", ConfigError)
        if not isinstance(data, dict):
            raise ConfigError(f"serve state file {str(path)!r}: expected an object")
        loaded = data.get("loaded", {})
        unloaded = data.get("unloaded", [])
        if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()):
            raise ConfigError(f"serve state file {str(path)!r}: `loaded` must map names to paths")
        if not isinstance(unloaded, list) or not all(isinstance(n, str) for n in unloaded):
            raise ConfigError(f"serve state file {str(path)!r}: `unloaded` must be a list of names")
        return {"loaded": loaded, "unloaded": unloaded}

    def _record(self) -> None:
        """What differs from a plain scan: names served from another directory, and directories unloaded."""
        plain: dict[str, Path] = {}
        for root in self.roots:
            for entry in sorted(root.iterdir()):
                if not entry.name.startswith(".") and entry.is_dir() and entry.name not in plain:
                    plain[entry.name] = Path(os.path.realpath(entry))
        loaded = {n: str(p) for n, p in self.paths.items() if plain.get(n) != p}
        unloaded = sorted(n for n in self.unloaded if n in plain and n not in self.paths)
        write_text(self._state_path(), json.dumps({"loaded": loaded, "unloaded": unloaded}, indent=2) + "\n")
