"""The registry of delta file formats: each is a directory layout, recognised by one marker file, with a reader
(directory -> Delta) and a writer (Delta, directory -> directory). `native` and `peft` register themselves when
`deltatune.io` is imported; a new format registers the same way and `dt.save(..., format=)`, `dt.load`,
`Delta.read` and `deltatune inspect` handle it.

Two formats may share a marker file (PEFT's and AdapterHub's `adapter_config.json`): a format that does declares
`claims`, which tells its directories apart by their contents, and the one without `claims` takes the rest.
`library` names the other library that reads a format's files and `kinds` the delta kinds it reads from them
(`loaders`, shown by `deltatune inspect`).

Every writer refuses a delta that is incomplete until placed on a model (`Delta.needs_model`, checked here once for
all formats: `Format.write` is the registered writer behind that check).

A directory holds one delta. Writers go through `write_directory`, which replaces the directory as a whole
(`atomic.replace_dir`): the files of whatever delta it held before, in any registered format, are gone in the same
step, so no reader can find a stale marker next to new files. Reading (`read`) refuses a directory holding the
markers of two formats, puts back a directory an interrupted replacement left missing (`atomic.recover`) and checks
the integrity manifest of formats that have one (`integrity.verify`) before the format's reader runs."""
from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import ConfigError, CorruptFileError, DeltaNotFoundError, UnsupportedError
from . import atomic
from .deferred import settle
from .integrity import MANIFEST, manifest, verify

if TYPE_CHECKING:
    from .delta import Delta


@dataclass(frozen=True)
class CompleteOnly:
    """A format's writer behind the check every writer shares: a delta that is incomplete until placed on a model
    (`Delta.needs_model`: a PEFT file's absolute values, projections sized by the model, prefixes split per layer by
    it) is refused with that reason before the writer runs, so no format stores it half-made."""

    writer: Callable[["Delta", Path], Path]

    def __call__(self, delta: "Delta", path: Path) -> Path:
        if delta.needs_model:
            raise UnsupportedError(delta.needs_model)
        return self.writer(delta, path)


@dataclass(frozen=True)
class Format:
    name: str
    marker: str                                  # the file that identifies a directory of this format
    read: Callable[[Path], "Delta"]
    write: Callable[["Delta", Path], Path]
    description: str = ""
    files: tuple[str, ...] = ()                  # the files its writer writes (the marker among them)
    companions: tuple[str, ...] = ()             # other files such a directory may hold, written by other tools
    manifest: bool = False                       # deltatune writes an integrity manifest beside `files`
    #: directory -> Delta of meta tensors (config, modules, shapes and dtypes from the files' headers; no tensor
    #: data read), with the reader's checks that need no data; None: the format reads everything
    read_meta: Callable[[Path], "Delta"] | None = None
    #: for a marker shared with another format: whether the directory is of this format (read from its files)
    claims: Callable[[Path], bool] | None = None
    #: the other library that loads this format's files ("" none), and the delta kinds it loads from them (None: any)
    library: str = ""
    kinds: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.write, CompleteOnly):
            object.__setattr__(self, "write", CompleteOnly(self.write))


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in _FORMATS and _FORMATS[fmt.name] != fmt:
        raise ConfigError(f"file format {fmt.name!r} is registered twice")
    if fmt.files and fmt.marker not in fmt.files:
        raise ConfigError(f"file format {fmt.name!r}: its marker {fmt.marker!r} must be one of its files {fmt.files}")
    _FORMATS[fmt.name] = fmt
    return fmt


def format_names() -> tuple[str, ...]:
    return tuple(_FORMATS)


def format_named(name: str) -> Format:
    if name not in _FORMATS:
        raise ConfigError(f"unknown format {name!r}; choose one of {format_names()}")
    return _FORMATS[name]


def format_of(path: Path) -> Format:
    """The format of delta directory `path` (the registered format whose marker file it holds)."""
    path = Path(path)
    if not path.exists():
        atomic.recover(path)  # a replacement interrupted between its two renames (see io/atomic.py)
    if not path.exists():
        raise DeltaNotFoundError(f"delta path {str(path)!r} does not exist")
    if path.is_file():
        raise DeltaNotFoundError(f"{str(path)!r} is a file; a delta is a directory — pass the directory that holds "
                                 f"{' or '.join(f.marker for f in _FORMATS.values())}, e.g. {str(path.parent)!r}")
    found = _claimed([fmt for fmt in _FORMATS.values() if (path / fmt.marker).is_file()], path)
    if len(found) > 1:
        raise CorruptFileError(f"{str(path)!r} holds the files of {len(found)} deltas "
                               f"({', '.join(f'{f.marker} ({f.name})' for f in found)}); a directory holds one delta, so "
                               f"all but one are stale (left by an older deltatune). Save the delta again, or remove the "
                               f"stale files")
    if found:
        return found[0]
    raise DeltaNotFoundError(f"{str(path)!r} holds no delta: none of "
                             f"{', '.join(f'{f.marker} ({f.name})' for f in _FORMATS.values())}")


def _claimed(found: list[Format], path: Path) -> list[Format]:
    """Of formats whose marker is in `path`, per marker: the one whose `claims` accepts the directory, else the one
    without `claims`."""
    by_marker: dict[str, list[Format]] = {}
    for fmt in found:
        by_marker.setdefault(fmt.marker, []).append(fmt)
    out = []
    for group in by_marker.values():
        if len(group) == 1:
            out += group
            continue
        claimed = [f for f in group if f.claims is not None and f.claims(path)]
        out += claimed[:1] or [f for f in group if f.claims is None][:1]
    return out


def loaders(fmt: Format, kind: str) -> list[str]:
    """deltatune and the other library that load a delta of `kind` from files of format `fmt`."""
    reads = fmt.library and (fmt.kinds is None or kind in fmt.kinds)
    return ["deltatune", fmt.library] if reads else ["deltatune"]



def read(path: str | Path, meta: bool = False) -> "Delta":
    """Read a delta directory of any registered format, after the checks every format shares (see the module doc).
    With `meta`, its tensors are meta tensors from the files' headers (the format's `read_meta`): no tensor data is
    read, so the integrity record and the data's hash are checked when the data is (`read`)."""
    path = Path(path)
    fmt = format_of(path)
    if meta and fmt.read_meta is not None:
        return fmt.read_meta(path)
    if not (path / MANIFEST).is_file() or written_bytes(path) < _OVERLAP_BYTES:
        verify(path)
        return fmt.read(path)
    return _read_verifying(path, fmt)


_OVERLAP_BYTES = 4 << 20  # from this size on, hashing (which releases the GIL) runs beside the reader


def _read_verifying(path: Path, fmt: Format) -> "Delta":
    """`verify` in a second thread while the format's reader runs; the reader's result is returned only after the
    hashes matched (inside `deferred.checks_at_exit()`: the check is handed to that block), and a mismatch is
    reported in preference to whatever the reader made of the torn files."""
    failure: list[BaseException] = []

    def check() -> None:
        try:
            verify(path)
        except BaseException as e:  # handed to the reading thread, raised there
            failure.append(e)

    def finish() -> None:
        worker.join()
        if failure:
            raise failure[0] from None

    worker = threading.Thread(target=check, name="deltatune-verify", daemon=True)
    worker.start()
    try:
        delta = fmt.read(path)
    except BaseException:
        finish()
        raise
    settle(finish)
    return delta


# --- writing -----------------------------------------------------------------------------------------------------
_LEFTOVER = re.compile(r"\.(?P<file>.+)\.[A-Za-z0-9_]+\.(tmp|bak)")  # temporaries of older deltatune's file writes


def owns(name: str) -> bool:
    """Whether a file named `name` may be part of a delta directory: a file of some registered format, a companion
    file, the integrity manifest, or a temporary an interrupted save of an older deltatune left there."""
    known = {MANIFEST, *(f for fmt in _FORMATS.values() for f in (*fmt.files, *fmt.companions, fmt.marker))}
    if name in known:
        return True
    m = _LEFTOVER.fullmatch(name)
    return m is not None and m.group("file") in known


def check_output(path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an unsafe delta output before any work (`atomic.check_output` with the registry's files): the root,
    the home directory, a file, a symlink loop, a mount point, the current directory, an input, or a directory holding
    anything but a delta. Returns the real path."""
    return atomic.check_output(path, owns, inputs)


def write_directory(name: str, path: str | Path, files: dict[str, bytes]) -> Path:
    """Make `path` a directory of format `name` holding exactly `files` (plus the integrity manifest where the format
    has one), replacing whatever delta was there in one step (`atomic.replace_dir`)."""
    fmt = format_named(name)
    if fmt.files and set(files) != set(fmt.files):
        raise ConfigError(f"format {name!r} writes {sorted(fmt.files)}, got {sorted(files)}")
    if fmt.manifest:
        files = {**files, MANIFEST: manifest(files)}
    return atomic.replace_dir(path, files, owns)


def written_bytes(path: str | Path) -> int:
    """The size of the delta files in directory `path` (no walk, no symlinks): what its writer wrote there."""
    return atomic.dir_bytes(path, owns)
