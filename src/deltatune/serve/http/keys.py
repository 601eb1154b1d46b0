"""API keys (`keys.yaml`): salted hashes, never plain keys; per-key delta patterns, rate limits and an admin flag.

A key reads `dt-<id>-<secret>`: `id` (public, 8 hex digits) finds the entry, the secret (32 random bytes, URL-safe
base64) is checked against `sha256(salt ‖ secret)` in constant time. The secret is random and long, so one fast
salted hash suffices (no password stretching is needed: there is nothing to guess).

```yaml
keys:
  - id: 3f2a9c01
    name: alice
    salt: 9b0c...           # 16 random bytes, hex
    hash: 5e88...           # sha256(salt ‖ secret), hex
    deltas: ["alice-*", shared]   # names or glob patterns (fnmatch); [] = the base only
    base: true              # may use the base model (default true)
    admin: false            # may load/unload deltas and read /metrics
    requests_per_minute: 60 # optional
    tokens_per_minute: 20000  # optional: prompt + completion tokens
```
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ...core.errors import ConfigError
from ...core.parsing import load_yaml, short
from ...io.atomic import write_text

_FIELDS = {"id", "name", "salt", "hash", "deltas", "base", "admin", "requests_per_minute", "tokens_per_minute"}


@dataclass(frozen=True)
class KeyEntry:
    id: str
    name: str
    salt: str
    hash: str
    deltas: tuple[str, ...] = ()
    base: bool = True
    admin: bool = False
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def may_use(self, model: str, base_name: str) -> bool:
        if model == base_name:
            return self.base
        return any(fnmatch.fnmatchcase(model, p) for p in self.deltas)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name, "salt": self.salt, "hash": self.hash,
                               "deltas": list(self.deltas), "base": self.base, "admin": self.admin}
        for k in ("requests_per_minute", "tokens_per_minute"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode("utf-8")).hexdigest()


def _entry(raw: Any, where: str) -> KeyEntry:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {short(raw)}")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(map(str, unknown))}; expected some of {sorted(_FIELDS)}")

    def text(k: str, hexa: bool = False) -> str:
        v = raw.get(k)
        if not isinstance(v, str) or not v or (hexa and any(c not in "0123456789abcdef" for c in v)):
            raise ConfigError(f"{where}.{k}: expected {'lower-case hex' if hexa else 'a non-empty string'}, got {short(v)}")
        return v

    def flag(k: str, default: bool) -> bool:
        v = raw.get(k, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{where}.{k}: expected true or false, got {short(v)}")
        return v

    def limit(k: str) -> int | None:
        v = raw.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{where}.{k}: expected a whole number ≥ 1, got {short(v)}")
        return v

    deltas = raw.get("deltas", [])
    if not isinstance(deltas, list) or not all(isinstance(p, str) and p for p in deltas):
        raise ConfigError(f"{where}.deltas: expected a list of names or glob patterns, got {short(deltas)}")
    name = raw.get("name", "")
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name: expected a string, got {short(name)}")
    return KeyEntry(text("id", True), name, text("salt", True), text("hash", True), tuple(deltas),
                    flag("base", True), flag("admin", False), limit("requests_per_minute"), limit("tokens_per_minute"))


def read_keys(path: str | Path) -> list[KeyEntry]:
    """The entries of a keys file (bounded YAML; every field checked). A missing file is an empty list."""
    path = Path(path)
    if not path.exists():
        return []
    if path.stat().st_size > 16 << 20:
        raise ConfigError(f"keys file {str(path)!r} is over 16 MiB")
    data = load_yaml(path.read_text(encoding="utf-8"), f"keys file {str(path)!r}")
    if data is None:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list) or set(data) - {"keys"}:
        raise ConfigError(f"keys file {str(path)!r}: expected a mapping with one field, `keys`, a list of keys")
    entries = [_entry(raw, f"keys file {str(path)!r}: keys[{i}]") for i, raw in enumerate(data.get("keys") or [])]
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"keys file {str(path)!r}: two keys share an id")
    return entries


def add_key(path: str | Path, name: str, deltas: list[str], *, base: bool = True, admin: bool = False,
            requests_per_minute: int | None = None, tokens_per_minute: int | None = None) -> str:
    """Append a new key to `path` (created if missing, written atomically, mode 0600) and return the plain key —
    the only time it exists; the file keeps its salted hash."""
    entries = read_keys(path)
    taken = {e.id for e in entries}
    key_id = secrets.token_hex(4)
    while key_id in taken:
        key_id = secrets.token_hex(4)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    salt = secrets.token_hex(16)
    entry = _entry({"id": key_id, "name": name, "salt": salt, "hash": _digest(salt, secret), "deltas": list(deltas),
                    "base": base, "admin": admin, "requests_per_minute": requests_per_minute,
                    "tokens_per_minute": tokens_per_minute}, "new key")
    text = ("# deltatune API keys: salted hashes only (`deltatune keys add` writes this file)\n"
            + yaml.safe_dump({"keys": [e.to_dict() for e in entries + [entry]]}, sort_keys=False))
    path = Path(path)
    write_text(path, text)
    os.chmod(path, 0o600)
    return f"dt-{key_id}-{secret}"


class KeyStore:
    """Checks presented keys against the file's entries."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        self.by_id = {e.id: e for e in entries}

    @classmethod
    def load(cls, path: str | Path) -> "KeyStore":
        return cls(read_keys(path))

    def check(self, key: str | None) -> KeyEntry | None:
        """The entry of a valid key, else None (the same answer for a malformed, unknown or wrong key)."""
        if not key or not key.startswith("dt-") or len(key) > 200:
            return None
        parts = key.split("-", 2)
        if len(parts) != 3:
            return None
        entry = self.by_id.get(parts[1])
        if entry is None:
            return None
        return entry if hmac.compare_digest(_digest(entry.salt, parts[2]), entry.hash) else None


@dataclass
class _Window:
    requests: deque = field(default_factory=deque)  # times
    tokens: deque = field(default_factory=deque)    # (time, count)
    token_sum: int = 0


class RateLimiter:
    """Per key, over the last 60 seconds: requests started, and prompt + completion tokens used."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def _window(self, key_id: str, now: float) -> _Window:
        w = self._windows.setdefault(key_id, _Window())
        while w.requests and w.requests[0] <= now - 60:
            w.requests.popleft()
        while w.tokens and w.tokens[0][0] <= now - 60:
            w.token_sum -= w.tokens.popleft()[1]
        return w

    def admit(self, entry: KeyEntry, prompt_tokens: int) -> str | None:
        """None and the request counted, or the reason it is over a limit (nothing counted)."""
        with self._lock:
            now = self.clock()
            w = self._window(entry.id, now)
            if entry.requests_per_minute is not None and len(w.requests) >= entry.requests_per_minute:
                return f"rate limit reached: {entry.requests_per_minute} requests per minute"
            if entry.tokens_per_minute is not None and w.token_sum + prompt_tokens > entry.tokens_per_minute:
                return f"rate limit reached: {entry.tokens_per_minute} tokens per minute"
            w.requests.append(now)
            self._add(w, now, prompt_tokens)
            return None

    def used(self, entry: KeyEntry, tokens: int) -> None:
        with self._lock:
            now = self.clock()
            self._add(self._window(entry.id, now), now, tokens)

    @staticmethod
    def _add(w: _Window, now: float, tokens: int) -> None:
        if tokens:
            w.tokens.append((now, tokens))
            w.token_sum += tokens
