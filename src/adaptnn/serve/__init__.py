"""Serving early exit: a stage-level engine that pools the survivors of many requests, its asyncio front,
an HTTP app (``adaptnn[serve]``) and a Ray Serve deployment (``adaptnn[ray]``).

* :mod:`.engine`: :class:`Engine`, one queue per stage, scheduler steps over pooled rows (synchronous core);
* :mod:`.backends`: how a stage runs (:class:`TorchBackend`, :class:`OnnxBackend` over a ``stages`` export);
* :mod:`.frontend`: :class:`AsyncEngine`, ``await predict(x)`` with admission control, compute in one thread;
* :mod:`.app` (needs ``adaptnn[serve]``) and :mod:`.ray` (needs ``adaptnn[ray]``) are imported on demand.
"""

from .backends import OnnxBackend, StageBackend, TorchBackend
from .engine import BATCH_INVARIANCE_ATOL, SCHEDULERS, BatchRecord, Engine, Request, Result
from .frontend import AsyncEngine, Overloaded, ShuttingDown

__all__ = [
    "AsyncEngine",
    "BATCH_INVARIANCE_ATOL",
    "BatchRecord",
    "Engine",
    "OnnxBackend",
    "Overloaded",
    "Request",
    "Result",
    "SCHEDULERS",
    "ShuttingDown",
    "StageBackend",
    "TorchBackend",
]
