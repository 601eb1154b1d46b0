"""A hard time limit for a block of test code, without a plugin: SIGALRM raises `TimeLimitExceeded` in the main
thread. The exception derives from BaseException so that no `except Exception` in the code under test swallows it.
CPython checks for signals between bytecodes and inside long-running C loops such as the `re` matcher, so a
catastrophic regex, a hung parser or an endless loop all end at the deadline."""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class TimeLimitExceeded(BaseException):
    pass


@contextmanager
def within(seconds: float, what: str = "the block") -> Iterator[None]:
    """Fail with TimeLimitExceeded if the block runs longer than `seconds` (wall clock)."""
    assert threading.current_thread() is threading.main_thread(), "SIGALRM time limits work in the main thread only"
    start = time.perf_counter()

    def expire(signum, frame):
        raise TimeLimitExceeded(f"{what} ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.perf_counter() - start < seconds, f"{what} ran longer than {seconds} s"
