"""Atomic file writes: write a temporary file in the target directory, fsync, rename over the target.

`write_files` does the same for several files that belong together (delta.json + delta.safetensors): all are
written to temporary files first, then renamed one by one; if a rename fails the files already replaced are
restored, so a failed save leaves the previous version of every file in place.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-global)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_copy(path: Path, data: bytes) -> str:
    """Write `data` to a fsynced temporary file next to `path` with the permissions `path` would get; return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:  # mkstemp makes a private 0600 file; give it the mode of the file it replaces, or the umask default
            mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
            os.fchmod(fd, mode)
        except OSError:
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def write_bytes(path: str | Path, data: bytes) -> None:
    write_files({Path(path): data})


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_files(files: dict[Path, bytes]) -> None:
    """Replace every file in `files` (in order) or, on failure, none of them."""
    temps: dict[Path, str] = {}
    backups: dict[Path, str | None] = {}
    done: list[Path] = []
    try:
        for path, data in files.items():
            temps[Path(path)] = _temp_copy(Path(path), data)
        if len(temps) > 1:  # keep the old versions until every rename has succeeded
            for path in temps:
                if path.exists():
                    fd, bak = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".bak", dir=path.parent)
                    os.close(fd)
                    os.unlink(bak)
                    try:
                        os.link(path, bak)
                    except OSError:  # no hard links on this filesystem
                        shutil.copy2(path, bak)
                    backups[path] = bak
                else:
                    backups[path] = None
        for path, tmp in temps.items():
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        for path in reversed(done):
            try:
                if backups.get(path) is not None:
                    os.replace(backups.pop(path), path)
                else:
                    os.unlink(path)
            except OSError:
                pass
        raise
    finally:
        for leftover in list(temps.values()) + [b for b in backups.values() if b is not None]:
            if os.path.exists(leftover):
                os.unlink(leftover)
