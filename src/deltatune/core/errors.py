"""One exception hierarchy: every error says what was wrong, where, and what to do."""
from __future__ import annotations

__all__ = ['DeltaTuneError', 'ConfigError', 'TargetError', 'NameError_', 'ShapeMismatchError', 'CorruptFileError', 'NonFiniteError', 'DeltaNotFoundError', 'StateError', 'UnsupportedError', 'DeltaNameError']


class DeltaTuneError(Exception):
    """Base class of every error deltatune raises on purpose."""


class ConfigError(DeltaTuneError, ValueError):
    """A delta config (or a file's config section) is invalid."""


class TargetError(DeltaTuneError, ValueError):
    """Targeting matched nothing, or matched a module the method cannot adapt."""


class DeltaNameError(DeltaTuneError, KeyError):
    """A delta name is unknown or already taken."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(DeltaTuneError, ValueError):
    """Tensors in a file do not fit the model they are loaded into."""


class CorruptFileError(DeltaTuneError, ValueError):
    """A delta file is truncated, unreadable or inconsistent with its metadata."""


class NonFiniteError(DeltaTuneError, ValueError):
    """A delta carries NaN or infinite values."""


class DeltaNotFoundError(DeltaTuneError, FileNotFoundError):
    """A path given for reading a delta does not exist or holds no delta."""


class StateError(DeltaTuneError, RuntimeError):
    """The requested operation does not fit the model's current state (e.g. merging twice)."""


class UnsupportedError(DeltaTuneError, NotImplementedError):
    """The operation is not defined for this method, module type or format."""


# The old name, kept so code that caught it keeps working.
NameError_ = DeltaNameError


class OutputPathError(ConfigError):
    """An output path is unsafe to write: the filesystem root, the home directory, a file, a symlink loop, a mount
    point, the current directory, or a directory holding files that are not a delta's (or a checkpoint's)."""


__all__ += ['OutputPathError']


class MissingDependencyError(UnsupportedError, ImportError):
    """An optional dependency is not installed (bitsandbytes for quantised bases: the `quant` extra)."""


class RoundingWarning(UserWarning):
    """Merging into (or unmerging from) a quantised weight requantised it: the stored weight differs from the exact
    sum by rounding. `report` maps module paths to {max_abs, relative, relative_to_update} (docs/quantization.md)."""

    def __init__(self, message: str, report: dict[str, dict[str, float]] | None = None) -> None:
        super().__init__(message)
        self.report = dict(report or {})


__all__ += ['MissingDependencyError', 'RoundingWarning']


class NotSmallerWarning(UserWarning):
    """A compression wrote (or would write) files no smaller than its input's: the size ratio is at most 1, so its
    error bought nothing (`deltatune compress` refuses to write such a result unless given --force)."""


__all__ += ['NotSmallerWarning']
