"""The HTTP app (Starlette, ``adaptnn[serve]``): ``POST /v1/predict`` over the engine, health, readiness, metrics.

Request bodies are data: JSON is parsed with :func:`json.loads` into numbers only, raw tensors are read with
``torch.frombuffer`` after their declared dtype, shape and byte count agree; nothing is ever unpickled. Bodies
are read with a size cap (413 beyond it, before reading more). Admission happens before the body is parsed when
the server is already full, so a shed answer costs almost nothing (503 with ``Retry-After``).

Status codes: 200 answer; 400 malformed JSON or raw body; 413 body or row count too large; 415 other content
types; 422 well-formed but wrong input (shape, dtype, NaN/inf); 503 full or shutting down; 500 engine failure.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ConfigError, InputError
from .backends import StageBackend
from .engine import BatchRecord, Engine, Result
from .frontend import AsyncEngine, Overloaded, ShuttingDown

__all__ = ["ServeConfig", "ServeHandler", "ServeMetrics", "create_app", "DTYPES"]

#: raw-body dtypes accepted in ``X-Dtype`` (the body must still match the model's input dtype)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int64": torch.int64, "int32": torch.int32}  # fmt: skip


@dataclass
class ServeConfig:
    """Limits of the server.

    Attributes:
        max_batch: most rows in one stage batch.
        max_inflight: most rows admitted at once; beyond it requests are shed with 503.
        max_rows: most rows in one request (413 beyond).
        max_body_bytes: body cap (413 beyond); default: ``max_rows`` samples as JSON text, generously.
        retry_after_s: the ``Retry-After`` of a 503.
        scheduler: the engine's scheduler (see :class:`~adaptnn.serve.Engine`); ``"fill"`` (default) pools the
            survivors of many batches into deep-stage batches, ``"oldest"`` answers each batch's rows first.
        max_wait_ms: ``"fill"``: the longest a row waits in one stage queue for a fuller batch.
        switch_interval_ms: Python's GIL switch interval while the app runs (process-wide, restored at shutdown;
            ``None``, the default, leaves Python's 5 ms). The event loop and the engine thread share the GIL, so an
            arriving request may wait up to one interval while a stage's Python code runs. On a loaded 2-core
            loopback benchmark 0.5 ms did not change the shed answers' latency measurably (noise from CPU
            contention dominated; ``benchmarks/results/serve_cpu_http_switch.md``); a knob for quieter hosts.
    """

    max_batch: int = 32
    max_inflight: int = 256
    max_rows: int = 64
    max_body_bytes: int | None = None
    retry_after_s: int = 1
    scheduler: str = "fill"
    max_wait_ms: float = 20.0
    switch_interval_ms: float | None = None

    def body_cap(self, sample_numel: int) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return 64 * 1024 + self.max_rows * sample_numel * 32  # JSON numbers take up to ~25 characters


class ServeMetrics:
    """Prometheus metrics of one app (own registry: several apps may live in one process, e.g. tests)."""

    def __init__(self, num_exits: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adaptnn_requests", "Requests by outcome.", ["outcome"], registry=r)
        self.rows = Counter("adaptnn_answered_rows", "Answered rows by the exit they took.", ["exit"], registry=r)
        self.shed = Counter("adaptnn_shed", "Requests shed with 503 (full or shutting down).", registry=r)
        self.batch = Histogram(
            "adaptnn_stage_batch_size", "Rows per stage batch.", ["stage"], registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )  # fmt: skip
        self.queue = Gauge("adaptnn_queue_depth", "Rows waiting at each stage.", ["stage"], registry=r)
        self.inflight = Gauge("adaptnn_inflight_rows", "Rows admitted and not yet answered.", registry=r)
        self.macs = Histogram(
            "adaptnn_request_macs", "MACs spent per request (sum over its rows).", registry=r,
            buckets=tuple(10.0**e for e in range(4, 13)),
        )  # fmt: skip
        self.latency = Histogram(
            "adaptnn_latency_seconds", "Request latency by the exit of its rows (one observation per row).",
            ["exit"], registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
        )  # fmt: skip
        for k in range(num_exits):  # every series present from the start (dashboards see zeros, not gaps)
            self.rows.labels(str(k))
            self.latency.labels(str(k))
            self.batch.labels(str(k))

    def on_batch(self, record: BatchRecord) -> None:
        self.batch.labels(str(record.stage)).observe(record.size)

    def answered(self, result: Result) -> None:
        self.requests.labels("ok").inc()
        self.macs.observe(float(result.macs.sum()))
        for k in result.exits:
            self.rows.labels(str(k)).inc()
            self.latency.labels(str(k)).observe(result.latency_ms / 1e3)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _read_body(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > cap:
                raise _BadRequest(413, f"body of {declared} bytes is larger than the limit of {cap} bytes")
        except ValueError:
            raise _BadRequest(400, f"Content-Length must be an integer, got {declared!r}") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise _BadRequest(413, f"body larger than the limit of {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_tensor(body: bytes, dtype: torch.dtype, sample_dims: int) -> torch.Tensor:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise _BadRequest(400, f"malformed JSON ({' '.join(str(err).split())[:120]})") from None
    if not isinstance(data, dict) or "inputs" not in data:
        raise _BadRequest(400, 'expected a JSON object {"inputs": [...]} holding one sample or a batch')
    try:
        x = torch.tensor(data["inputs"], dtype=torch.float64 if dtype.is_floating_point else torch.int64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise _BadRequest(400, f'"inputs" must be a rectangular array of numbers ({str(err)[:120]})') from None
    if x.dim() == sample_dims:
        x = x.unsqueeze(0)
    return x.to(dtype)


def _raw_tensor(request: Request, body: bytes, dtype: torch.dtype) -> torch.Tensor:
    name = request.headers.get("x-dtype", "")
    if name not in DTYPES:
        raise _BadRequest(400, f"X-Dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if DTYPES[name] != dtype:
        raise InputError(f"expected dtype {str(dtype).replace('torch.', '')}, got {name}")
    try:
        shape = [int(s) for s in request.headers.get("x-shape", "").split(",")]
    except ValueError:
        given = request.headers.get("x-shape")
        raise _BadRequest(400, f"X-Shape must be comma-separated integers, got {given!r}") from None
    if any(s < 0 for s in shape):
        raise _BadRequest(400, f"X-Shape must not be negative, got {shape}")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if math.prod(shape) * itemsize != len(body):
        raise _BadRequest(400, f"X-Shape {shape} of {name} needs {math.prod(shape) * itemsize} bytes, got {len(body)}")
    if not body:
        raise InputError(f"expected at least one row, got shape {shape}")
    return torch.frombuffer(bytearray(body), dtype=dtype).reshape(shape)


class ServeHandler:
    """The request handling of one server process: engine, admission, parsing, metrics (no routing).

    :func:`create_app` routes Starlette requests to it; the Ray Serve deployment (:mod:`adaptnn.serve.ray`)
    calls it from its replicas. :meth:`start` / :meth:`stop` run and drain the engine's worker thread.
    """

    def __init__(self, backend: StageBackend, config: ServeConfig | None = None, *, model_name: str = "model") -> None:
        config = config or ServeConfig()
        if config.max_rows < 1 or config.max_inflight < config.max_rows:
            raise ConfigError(
                f"need 1 <= max_rows <= max_inflight, got max_rows={config.max_rows}, "
                f"max_inflight={config.max_inflight}"
            )
        if config.switch_interval_ms is not None and not 0.0 < config.switch_interval_ms <= 1000.0:
            raise ConfigError(f"switch_interval_ms must be in (0, 1000] ms, got {config.switch_interval_ms}")
        if backend.sample_shape is None:
            raise ConfigError("the served model's input shape is not fixed; serving needs one sample shape")
        self.backend, self.config, self.model_name = backend, config, model_name
        self.shape: tuple[int, ...] = backend.sample_shape
        self.metrics = metrics = ServeMetrics(backend.num_exits)
        self.engine = engine = Engine(
            backend,
            max_batch=config.max_batch,
            scheduler=config.scheduler,
            max_wait_ms=config.max_wait_ms,
            on_batch=metrics.on_batch,
        )
        self.front = front = AsyncEngine(engine, max_inflight=config.max_inflight)
        for k in range(engine.num_exits):
            metrics.queue.labels(str(k)).set_function(lambda k=k: engine.queue_depths[k])
        metrics.inflight.set_function(lambda: front.inflight)
        self.cap = config.body_cap(math.prod(self.shape))
        self.retry = {"Retry-After": str(config.retry_after_s)}

    def start(self) -> None:
        self.front.start()

    def stop(self) -> None:
        """Admit nothing new, answer every admitted request, end the worker thread."""
        self.front.stop()

    def _shed(self, message: str) -> JSONResponse:
        self.metrics.requests.labels("shed").inc()
        self.metrics.shed.inc()
        return _error(503, message, self.retry)

    async def predict(self, request: Request) -> Response:
        """``POST /v1/predict``."""
        front, config, metrics, backend = self.front, self.config, self.metrics, self.backend
        if not front.running:
            return self._shed("the server is not accepting requests (starting or shutting down)")
        if front.inflight >= config.max_inflight:  # full: answer before reading the body
            front.shed += 1
            return self._shed(f"server full ({config.max_inflight} rows in flight); retry later")
        try:
            body = await _read_body(request, self.cap)
            kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
            if kind == "application/json":
                x = _json_tensor(body, backend.input_dtype, len(self.shape))
            elif kind == "application/octet-stream":
                x = _raw_tensor(request, body, backend.input_dtype)
            else:
                raise _BadRequest(415, f"Content-Type must be application/json or application/octet-stream, got {kind}")
            if x.dim() >= 1 and x.shape[0] > config.max_rows:
                raise _BadRequest(413, f"{x.shape[0]} rows in one request; the limit is {config.max_rows}")
            if x.dim() == 0:
                raise InputError("expected a sample or a batch of samples, got a scalar")
            front.admit(int(x.shape[0]))
        except _BadRequest as err:
            metrics.requests.labels("too_large" if err.status == 413 else "bad_request").inc()
            return _error(err.status, str(err))
        except InputError as err:
            metrics.requests.labels("bad_request").inc()
            return _error(422, str(err))
        except (Overloaded, ShuttingDown) as err:
            return self._shed(str(err))
        try:
            result = await front.predict(x, admitted=True)
        except InputError as err:
            metrics.requests.labels("bad_request").inc()
            return _error(422, str(err))
        except Exception as err:  # noqa: BLE001 - an engine failure is the server's fault
            metrics.requests.labels("error").inc()
            return _error(500, f"inference failed: {type(err).__name__}: {str(err)[:200]}")
        metrics.answered(result)
        answer: dict[str, Any] = {
            "predictions": result.logits.argmax(dim=-1).tolist(),
            "exits": list(result.exits),
            "macs": result.macs.tolist(),
            "queue_ms": result.queue_ms,
            "compute_ms": result.compute_ms,
            "latency_ms": result.latency_ms,
        }
        if request.query_params.get("logits") in ("1", "true"):
            answer["logits"] = result.logits.float().tolist()
        return JSONResponse(answer)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        if self.front.running:
            return JSONResponse({"ready": True, "model": self.model_name, "inflight": self.front.inflight})
        return JSONResponse({"ready": False}, status_code=503)

    async def metrics_text(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def route(self, request: Request) -> Response:
        """Dispatch by path (for hosts that hand over every request, e.g. a Ray Serve replica)."""
        path = request.url.path.rstrip("/")
        if path.endswith("/v1/predict"):
            if request.method != "POST":
                return _error(405, "use POST for /v1/predict")
            return await self.predict(request)
        for suffix, handler in (("/health", self.health), ("/ready", self.ready), ("/metrics", self.metrics_text)):
            if path.endswith(suffix):
                return await handler(request)
        return _error(404, f"no route {request.url.path}; POST /v1/predict, GET /health, /ready, /metrics")


def create_app(backend: StageBackend, config: ServeConfig | None = None, *, model_name: str = "model") -> Starlette:
    """The ASGI app serving ``backend``; the engine's worker thread starts and stops with the app's lifespan."""
    handler = ServeHandler(backend, config, model_name=model_name)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        switch = sys.getswitchinterval()
        if handler.config.switch_interval_ms is not None:
            sys.setswitchinterval(handler.config.switch_interval_ms / 1e3)
        handler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(handler.stop)  # admits nothing new, answers every admitted request
            sys.setswitchinterval(switch)

    app = Starlette(
        routes=[
            Route("/v1/predict", handler.predict, methods=["POST"]),
            Route("/health", handler.health),
            Route("/ready", handler.ready),
            Route("/metrics", handler.metrics_text),
        ],
        lifespan=lifespan,
    )
    app.state.handler = handler
    app.state.engine = handler.engine
    app.state.front = handler.front
    app.state.metrics = handler.metrics
    return app
