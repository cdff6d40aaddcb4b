"""The asyncio front of the engine: ``await front.predict(x)``, the compute in one worker thread.

The :class:`~adaptnn.serve.engine.Engine` is synchronous; :class:`AsyncEngine` owns it in a single worker
thread (PyTorch releases the GIL inside kernels, so the event loop keeps accepting requests while a stage runs).
Requests cross into the thread through an inbox; answers come back with ``loop.call_soon_threadsafe``.

Admission control is here, not in the HTTP layer: at most ``max_inflight`` rows are admitted (queued or running)
at any time; :meth:`AsyncEngine.predict` raises :class:`Overloaded` at once beyond that, so the memory held by
requests is bounded by ``max_inflight`` rows whatever the offered load.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

from torch import Tensor

from ..errors import AdaptnnError
from .engine import Engine, Request, Result

__all__ = ["AsyncEngine", "Overloaded", "ShuttingDown"]


class Overloaded(AdaptnnError):
    """``max_inflight`` rows are already admitted; retry later (HTTP 503)."""


class ShuttingDown(AdaptnnError):
    """The engine is stopping and admits nothing new (HTTP 503)."""


class AsyncEngine:
    """An :class:`Engine` stepped by one worker thread, with admission control.

    Args:
        engine: the synchronous engine (only the worker thread touches it after :meth:`start`).
        max_inflight: most rows admitted at once.
    """

    def __init__(self, engine: Engine, *, max_inflight: int = 256) -> None:
        if max_inflight < 1:
            raise AdaptnnError(f"max_inflight must be >= 1, got {max_inflight}")
        self.engine = engine
        self.max_inflight = int(max_inflight)
        self._inflight = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[tuple[Tensor, Any, float | None]] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.peak_inflight = 0
        self.shed = 0

    @property
    def inflight(self) -> int:
        """Rows admitted and not yet answered."""
        return self._inflight

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="adaptnn-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Admit nothing new, answer every admitted request, then end the worker thread."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def admit(self, n: int) -> None:
        """Reserve ``n`` rows or raise :class:`Overloaded` / :class:`ShuttingDown` (no waiting)."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._inflight + n > self.max_inflight:
                self.shed += 1
                raise Overloaded(f"{self._inflight} of {self.max_inflight} rows in flight; {n} more do not fit")
            self._inflight += n
            self.peak_inflight = max(self.peak_inflight, self._inflight)

    async def predict(self, x: Tensor, *, deadline_s: float | None = None, admitted: bool = False) -> Result:
        """Answer the rows of ``x`` (``[n, ...]``); raises :class:`Overloaded` at once when full.

        ``admitted``: the caller already reserved the rows with :meth:`admit` (e.g. to answer 503 before parsing).
        Input errors of the backend's check are raised here, in the caller's task.
        """
        n = int(x.shape[0]) if x.dim() else 0
        if not admitted:
            self.admit(n)
        try:
            x = self.engine.backend.check(x)
        except BaseException:
            self._release(n)
            raise
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Request] = loop.create_future()

        def answered(request: Request) -> None:  # in the worker thread
            self._release(request.n)
            loop.call_soon_threadsafe(_set, future, request)

        with self._lock:
            self._inbox.append((x, answered, deadline_s))
            self._wake.notify()
        request = await future
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _release(self, n: int) -> None:
        with self._lock:
            self._inflight -= n

    def _work(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                while not self._inbox and engine.idle and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._inbox and engine.idle:
                    return
                arrivals = list(self._inbox)
                self._inbox.clear()
            for x, callback, deadline_s in arrivals:
                try:
                    engine.submit(x, callback=callback, deadline_s=deadline_s, checked=True)
                except Exception as err:  # noqa: BLE001 - answered to its caller, the worker goes on
                    failed = Request(-1, int(x.shape[0]), -1, 0.0, 0.0, callback)
                    failed.error = err
                    callback(failed)
            engine.step()


def _set(future: asyncio.Future[Request], request: Request) -> None:
    if not future.done():
        future.set_result(request)
