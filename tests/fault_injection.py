"""Fault injection at every file operation, for crash-consistency tests.

A Python audit hook (sys.addaudithook) sees every operation that changes the filesystem — file creation or opening
for writing, rename/replace, unlink, rmdir, mkdir, chmod, link, shutil.rmtree, the directory swap (renameat2 through
ctypes, which raises `deltatune.io.exchange`) — whoever issues it; `os.fsync` is wrapped as well. Operation k
(counted from 1) is either a kill (`os._exit` in a forked child: no cleanup handler, no `finally`, no atexit runs —
as with kill -9) or an injected `OSError` (in-process).
Running k = 1, 2, ... until a run finishes without reaching k puts a fault between every pair of operations, not
at a lucky moment.
"""
from __future__ import annotations

import errno
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

KILLED = 17
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_MUTATIONS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
              "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.copymode", "shutil.copystat",
              "shutil.move", "ctypes.call_function", "deltatune.io.exchange"}
_state: dict[str, Any] = {"active": False, "n": 0, "at": set(), "mode": "raise", "log": []}
_installed = False


def _mutation(event: str, args: tuple) -> bool:
    if event in _MUTATIONS:
        return True
    if event == "open":
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        return bool(flags & _WRITE_FLAGS) or any(c in mode for c in "wax+")
    return False


def _step(what: str) -> None:
    _state["n"] += 1
    _state["log"].append(what)
    if _state["n"] in _state["at"]:
        if _state["mode"] == "exit":
            os._exit(KILLED)
        raise OSError(errno.EIO, f"injected failure at file operation {_state['n']}: {what}")


def _hook(event: str, args: tuple) -> None:
    if _state["active"] and _mutation(event, args):
        _step(f"{event} {args[:2]!r:.200}")


def _fsync(fd: int) -> None:
    if _state["active"]:
        _step(f"fsync {fd}")
    _state["fsync"](fd)  # whatever os.fsync was when the run began


def _install() -> None:
    global _installed
    if not _installed:
        sys.addaudithook(_hook)  # cannot be removed; inactive unless a run is in progress
        _installed = True


def fail_at(k: int | set[int], fn: Callable[[], Any]) -> tuple[BaseException | None, int]:
    """Run `fn` in-process with an OSError injected at its k-th file operation (or at each of a set of them).
    Returns (the exception fn raised, or None; the number of operations it did)."""
    _install()
    _state.update(active=True, n=0, at={k} if isinstance(k, int) else set(k), mode="raise", log=[], fsync=os.fsync)
    saved, os.fsync = os.fsync, _fsync
    try:
        fn()
        error = None
    except BaseException as e:  # noqa: BLE001 - reported to the caller
        error = e
    finally:
        _state["active"] = False
        os.fsync = saved
    return error, _state["n"]


def kill_at(k: int, fn: Callable[[], Any], timeout: float = 60.0) -> bool:
    """Run `fn` in a forked child killed (os._exit) at its k-th file operation. True if it was killed, False if it
    finished before reaching k; an exception in the child fails with its traceback."""
    _install()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 3
        try:
            os.close(r)
            _state.update(active=True, n=0, at={k}, mode="exit", log=[], fsync=os.fsync)
            os.fsync = _fsync
            fn()
            _state["active"] = False
            code = 0
        except BaseException:  # noqa: BLE001
            _state["active"] = False
            os.write(w, traceback.format_exc().encode()[-4000:])
        os._exit(code)
    os.close(w)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(r)
            raise AssertionError(f"the child killed at operation {k} hung")
        time.sleep(0.005)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code == KILLED:
        return True
    if code == 0:
        return False
    raise AssertionError(f"the child failed (exit {code}) before operation {k}:\n{message}")


def every_kill(prepare: Callable[[int], None], run: Callable[[int], Any], check: Callable[[int, bool], None],
               limit: int = 500) -> int:
    """For k = 1, 2, ...: `prepare(k)`, `run(k)` in a child killed at its operation k, `check(k, killed)`; until a run
    finishes without being killed. Returns the number of kill points (operations of a complete run)."""
    for k in range(1, limit):
        prepare(k)
        killed = kill_at(k, lambda: run(k))
        check(k, killed)
        if not killed:
            return k - 1
    raise AssertionError(f"still not finished after {limit} operations")


def operations() -> list[str]:
    """The operations of the last run, in order."""
    return list(_state["log"])
