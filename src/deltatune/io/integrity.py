"""Integrity manifests: a small JSON file beside a delta's standard files recording each file's size and SHA-256.

Formats whose own files carry no integrity record (PEFT: `adapter_config.json` + `adapter_model.safetensors`)
get one when deltatune writes them (`Format.manifest`); other tools ignore it (PEFT reads only its own files).
`verify(path)` checks a directory against its manifest before it is read, so a directory whose files do not belong
together — torn by an interrupted copy, or a file changed afterwards by another tool — is refused with a
`CorruptFileError` naming the file instead of loading a mixture. A directory without a manifest (e.g. written by
PEFT itself) is read as it is.

    {"format": "deltatune.manifest", "version": 1,
     "files": {"adapter_config.json": {"bytes": 913, "sha256": "…"}, "adapter_model.safetensors": {…}}}
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from ..core.errors import CorruptFileError, UnsupportedError

MANIFEST = "deltatune_manifest.json"
FORMAT = "deltatune.manifest"
VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20  # a manifest lists a handful of files; anything larger is not one of ours
_CHUNK = 1 << 20


def manifest(files: Mapping[str, bytes]) -> bytes:
    """The manifest (JSON bytes) recording `files` ({name: contents})."""
    record = {"format": FORMAT, "version": VERSION,
              "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                        for name, data in sorted(files.items())}}
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str | Path) -> None:
    """Check the files of delta directory `path` against its manifest, if it has one; raise `CorruptFileError`
    naming the first file that is missing or differs. Streams the files (memory stays bounded)."""
    path = Path(path)
    file = path / MANIFEST
    try:
        size = os.stat(file).st_size
    except FileNotFoundError:
        return
    except OSError as e:
        raise CorruptFileError(f"{str(file)!r} cannot be read ({e.strerror})") from None
    where = f"{str(file)!r}"
    if size > MAX_MANIFEST_BYTES:
        raise CorruptFileError(f"{where} is {size} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES}); the file is "
                               f"damaged or not deltatune's")
    try:
        with open(file, "rb") as f:
            record = json.loads(f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CorruptFileError(f"{where} is not valid JSON ({type(e).__name__}); the file is damaged") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CorruptFileError(f"{where} is not a deltatune manifest (format "
                               f"{record.get('format') if isinstance(record, dict) else None!r:.60})")
    version = record.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptFileError(f"{where}: version must be a positive integer, got {version!r:.60}")
    if version > VERSION:
        raise UnsupportedError(f"{where} has version {version}; this deltatune reads up to {VERSION} — upgrade deltatune")
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptFileError(f"{where}: files must be a non-empty object {{name: {{bytes, sha256}}}}")
    for name, entry in files.items():
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise CorruptFileError(f"{where}: {name!r:.60} is not a file name")
        if (not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or isinstance(entry["bytes"], bool)
                or not isinstance(entry.get("sha256"), str)):
            raise CorruptFileError(f"{where}: the entry of {name!r:.60} must be {{\"bytes\": integer, \"sha256\": hex}}")
    hint = (f"the directory was torn (an interrupted copy or save) or the file was changed after deltatune wrote it "
            f"(e.g. saved again by another tool); if the files are what you want, delete {MANIFEST}")
    for name, entry in files.items():
        target = path / name
        try:
            actual = os.stat(target).st_size
        except OSError:
            raise CorruptFileError(f"{str(target)!r} is missing but {MANIFEST} lists it: {hint}") from None
        if actual != entry["bytes"]:
            raise CorruptFileError(f"{str(target)!r} has {actual} bytes but {MANIFEST} records {entry['bytes']}: {hint}")
        if _sha256(target) != entry["sha256"]:
            raise CorruptFileError(f"{str(target)!r} does not match the SHA-256 recorded in {MANIFEST}: {hint}")
