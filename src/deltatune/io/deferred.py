"""Integrity checks that finish when a block ends instead of when each read returns.

A large file's SHA-256 is computed in a second thread while its tensors are copied (`safetensors_io.read_tensors`,
`formats.read`). By default each read waits for its hash before it returns. Inside `checks_at_exit()`, a read
hands its pending check to the block instead and returns at once, so the caller's own work on the tensors (building
factors, copying them into device banks) overlaps the hash too. The rule that keeps this safe: nothing read in the
block is published before the block has ended without an error. Work that publishes (a cache insertion, say) is
passed to `after_checks`, which runs it only once every pending check has passed — immediately, outside a block.

When the block ends every pending check is waited for (so no hashing thread outlives it), and the first failed
check is raised — in preference to an error the block itself raised, which may only be what a changed file made
of the copy."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

_PENDING: ContextVar[list[Callable[[], None]] | None] = ContextVar("deltatune_pending_checks", default=None)
_AFTER: ContextVar[list[Callable[[], None]] | None] = ContextVar("deltatune_after_checks", default=None)


def settle(check: Callable[[], None]) -> None:
    """Run `check` (it waits for a hash and raises on a mismatch) now, or at the end of the enclosing
    `checks_at_exit` block."""
    pending = _PENDING.get()
    if pending is None:
        check()
    else:
        pending.append(check)


def active() -> bool:
    """Whether a `checks_at_exit` block encloses the caller."""
    return _PENDING.get() is not None


def after_checks(publish: Callable[[], None]) -> None:
    """Run `publish` once the enclosing block's checks have all passed (now, outside a block)."""
    after = _AFTER.get()
    if after is None:
        publish()
    else:
        after.append(publish)


def _run_all(checks: list[Callable[[], None]]) -> BaseException | None:
    first = None
    for check in checks:
        try:
            check()
        except BaseException as e:  # every check still runs (each joins its thread); the first failure is kept
            first = first or e
    return first


@contextmanager
def checks_at_exit() -> Iterator[None]:
    """Defer the hash checks of reads made in this block to its end (see the module doc)."""
    pending: list[Callable[[], None]] = []
    after: list[Callable[[], None]] = []
    tokens = _PENDING.set(pending), _AFTER.set(after)
    try:
        try:
            yield
        except BaseException:
            failure = _run_all(pending)
            if failure is not None:
                raise failure from None
            raise
        failure = _run_all(pending)
        if failure is not None:
            raise failure
    finally:
        _PENDING.reset(tokens[0])
        _AFTER.reset(tokens[1])
    for publish in after:
        publish()
