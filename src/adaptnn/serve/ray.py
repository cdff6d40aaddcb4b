"""Scale-out on Ray Serve (``pip install 'adaptnn[ray]'``): one stage-level engine per replica.

Each replica loads the run once and owns one :class:`~adaptnn.serve.app.ServeHandler` (engine, worker thread,
admission control, metrics): requests Ray routes to a replica are pooled by that replica's engine. Two limits
answer 503 at once: Ray's own queue (``max_queued_requests``, requests waiting for a replica slot) and the
replica's ``max_inflight`` rows. Scaling is Ray's: a fixed ``num_replicas``, or ``autoscaling`` on ongoing
requests per replica (``target_ongoing_requests`` defaults to the batch cap, the load at which a replica's
deep stages run full batches).

When it pays: Ray adds a proxy hop and a replica call per request (about a millisecond on loopback on a
small CPU), so it pays once one replica's compute saturates (the model needs more than one process' cores or
more than one device); below that, ``adaptnn serve`` (one process) answers faster.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from ..errors import ConfigError
from .app import ServeConfig

__all__ = ["build_deployment", "run_deployment"]


def _ray_serve() -> Any:
    try:
        from ray import serve
    except ImportError as err:
        missing = err.name
        raise ConfigError(
            f"the Ray deployment needs the ray extra ({missing} is missing): pip install 'adaptnn[ray]'"
        ) from None
    return serve


def build_deployment(
    run_dir: str,
    *,
    backend: str = "torch",
    config: ServeConfig | None = None,
    num_replicas: int | None = 1,
    autoscaling: dict[str, Any] | None = None,
    max_queued_requests: int = 64,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    threads: int | None = 1,
    trust_code: bool = False,
) -> Any:
    """A bound Ray Serve application serving ``run_dir`` (pass it to ``ray.serve.run``).

    Args:
        run_dir: a trained and calibrated run directory, readable from every replica's node.
        backend: ``torch`` or ``onnx`` (the run's ``onnx_stages`` export).
        config: per-replica limits (batch cap, ``max_inflight`` rows, ...).
        num_replicas: fixed replica count (ignored with ``autoscaling``).
        autoscaling: Ray's ``autoscaling_config``; keys not given default to ``min_replicas=1``,
            ``max_replicas=4`` and ``target_ongoing_requests=config.max_batch``.
        max_queued_requests: requests Ray queues for busy replicas before answering 503.
        num_cpus, num_gpus: resources of each replica (one engine per replica and device).
        threads: torch intra-op threads per replica (``None``: torch's default).
    """
    serve = _ray_serve()
    config = config or ServeConfig()
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_inflight,
        "max_queued_requests": max_queued_requests,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
    }
    if autoscaling is not None:
        options["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": 4,
            "target_ongoing_requests": config.max_batch,
            **autoscaling,
        }
    else:
        options["num_replicas"] = num_replicas

    @serve.deployment(name="adaptnn", **options)
    class AdaptnnReplica:
        def __init__(
            self, run_dir: str, backend: str, config: dict[str, Any], threads: int | None, trust: bool
        ) -> None:
            import torch

            from .app import ServeHandler
            from .loading import load_served

            if threads is not None:
                torch.set_num_threads(max(1, threads))
            served = load_served(run_dir, backend=backend, trust_code=trust)
            self.handler = ServeHandler(served.backend, ServeConfig(**config), model_name=str(run_dir))
            self.handler.start()
            self.replica = f"{os.getpid()}"

        async def __call__(self, request: Any) -> Any:
            response = await self.handler.route(request)
            response.headers["x-adaptnn-replica"] = self.replica
            return response

        def __del__(self) -> None:
            handler = getattr(self, "handler", None)
            if handler is not None:
                handler.stop()

    return AdaptnnReplica.bind(run_dir, backend, asdict(config), threads, trust_code)


def run_deployment(app: Any, *, host: str = "127.0.0.1", port: int = 8000, name: str = "adaptnn") -> None:
    """Start Ray Serve's HTTP proxy on ``host:port`` and deploy ``app`` at ``/`` (blocks until it is running)."""
    serve = _ray_serve()
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix="/")
