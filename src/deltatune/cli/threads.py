"""How many torch threads the file commands (merge, compress, extract) use: one, unless told otherwise.

Their work is many small matrix products and SVDs (a module at a time: a few hundred by a few thousand), which
gain little from more threads and lose a lot when the cores are shared: OpenMP threads spin waiting for each
other while other processes hold the cores. On the loaded 2-core development machine torch's default (2 threads)
made merge, compress and extract 10-30x slower than one thread (docs/merging.md, "Threads", for the
measurements and bench/threads.py to repeat them). These commands therefore run with
`min(torch's current thread count, MAX_FILE_THREADS)` threads — never more than the user asked for through
OMP_NUM_THREADS or torch — or with $DELTATUNE_FILE_THREADS threads when that is set, and restore the count
afterwards.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

#: the most torch threads merge / compress / extract use
MAX_FILE_THREADS = 1


#: environment variable that sets the thread count of these commands instead (a positive integer)
THREADS_ENV = "DELTATUNE_FILE_THREADS"


@contextmanager
def file_command_threads(limit: int = MAX_FILE_THREADS) -> Iterator[int]:
    """torch's intra-op thread count inside the block (restored after): $DELTATUNE_FILE_THREADS if set, else at
    most `limit`; yields it."""
    import torch

    from ..core.errors import ConfigError
    from ..core.threads import torch_threads

    before = torch.get_num_threads()
    given = os.environ.get(THREADS_ENV)
    if given is not None:
        if not given.strip().isdigit() or int(given) < 1:
            raise ConfigError(f"{THREADS_ENV} must be a positive integer (torch threads), got {given!r}")
        now = int(given)
    else:
        now = max(1, min(before, limit))
    with torch_threads(now):
        yield now
