"""The registry of delta file formats: each is a directory layout, recognised by one marker file, with a reader
(directory -> Delta) and a writer (Delta, directory -> directory). `native` and `peft` register themselves when
`deltatune.io` is imported; a new format registers the same way and `dt.save(..., format=)`, `dt.load`,
`Delta.read` and `deltatune inspect` handle it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import ConfigError, DeltaNotFoundError

if TYPE_CHECKING:
    from .delta import Delta


@dataclass(frozen=True)
class Format:
    name: str
    marker: str                                  # the file that identifies a directory of this format
    read: Callable[[Path], "Delta"]
    write: Callable[["Delta", Path], Path]
    description: str = ""
    #: directory -> Delta of meta tensors (config, modules, shapes and dtypes from the files' headers; no tensor
    #: data read), with the reader's checks that need no data; None: the format reads everything
    read_meta: Callable[[Path], "Delta"] | None = None


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in _FORMATS and _FORMATS[fmt.name] != fmt:
        raise ConfigError(f"file format {fmt.name!r} is registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def format_names() -> tuple[str, ...]:
    return tuple(_FORMATS)


def format_named(name: str) -> Format:
    if name not in _FORMATS:
        raise ConfigError(f"unknown format {name!r}; choose one of {format_names()}")
    return _FORMATS[name]


def format_of(path: Path) -> Format:
    """The format of delta directory `path` (the first registered whose marker file it holds)."""
    path = Path(path)
    if not path.exists():
        raise DeltaNotFoundError(f"delta path {str(path)!r} does not exist")
    if path.is_file():
        raise DeltaNotFoundError(f"{str(path)!r} is a file; a delta is a directory — pass the directory that holds "
                                 f"{' or '.join(f.marker for f in _FORMATS.values())}, e.g. {str(path.parent)!r}")
    for fmt in _FORMATS.values():
        if (path / fmt.marker).is_file():
            return fmt
    raise DeltaNotFoundError(f"{str(path)!r} holds no delta: none of "
                             f"{', '.join(f'{f.marker} ({f.name})' for f in _FORMATS.values())}")
