"""The engine's own thread: it alone calls `Engine.submit` and `Engine.step`, so a request's handle is known before
the request can finish; tokens and completions are handed to the asyncio side with `call_soon_threadsafe`."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

from ..engine import Engine
from ..sampling import SamplingParams

log = logging.getLogger("deltatune.serve")


class Handle:
    """One request as the HTTP side sees it: a queue of ("token", id), then ("done", Request) or ("error", exc)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics, model: str) -> None:
        self.loop, self.metrics, self.model = loop, metrics, model
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request = None
        self.cancelled = False
        self.created = time.perf_counter()
        self.first_token: float | None = None

    def put(self, item: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def on_token(self, request, token: int) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
            self.metrics.ttft.observe(self.first_token - self.created)
        self.put(("token", token))

    def cancel(self) -> None:
        """Stop generating (the client went away): the engine drops it at its next step, freeing KV and slot."""
        self.cancelled = True
        if self.request is not None:
            self.request.cancel()


class Runner:
    def __init__(self, engine: Engine, metrics) -> None:
        self.engine, self.metrics = engine, metrics
        self._pending: deque[tuple[list[int], str | None, SamplingParams, Handle]] = deque()
        self._live: dict[int, Handle] = {}
        self._wake = threading.Event()
        self._stop = False
        self.delta_admissions = 0
        self._thread = threading.Thread(target=self._loop, name="deltatune-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, prompt: list[int], delta: str | None, sampling: SamplingParams, handle: Handle) -> None:
        self._pending.append((prompt, delta, sampling, handle))
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Finish what runs for at most `timeout` seconds, then cancel the rest and end the thread."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self._pending or not self.engine.idle) and self._thread.is_alive():
            time.sleep(0.02)
        for h in list(self._live.values()):
            h.cancel()
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _take_pending(self) -> None:
        while self._pending:
            prompt, delta, sampling, handle = self._pending.popleft()
            if handle.cancelled:
                handle.put(("error", asyncio.CancelledError()))
                continue
            try:
                req = self.engine.submit(prompt, delta, sampling, on_token=handle.on_token)
            except Exception as e:  # noqa: BLE001 - reported to that request only
                handle.put(("error", e))
                continue
            handle.request = req
            self._live[req.id] = handle
            if delta is not None:
                self.delta_admissions += 1
            if handle.cancelled:
                req.cancel()

    def _loop(self) -> None:
        while True:
            self._take_pending()
            if self._stop:
                break
            if self.engine.idle:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                finished = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails the requests in it, not the server
                log.exception("engine step failed; its requests are failed and the server goes on")
                for h in list(self._live.values()):
                    if h.request is not None:
                        h.request.cancel()
                    h.put(("error", e))
                self._live.clear()
                continue
            for r in finished:
                h = self._live.pop(r.id, None)
                if h is not None:
                    h.put(("done", r))
        # the engine's hooks stay: the process is ending
