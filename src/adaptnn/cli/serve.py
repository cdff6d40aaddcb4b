"""Serve a calibrated run over HTTP with the stage-level early-exit engine (needs ``pip install adaptnn[serve]``).

``POST /v1/predict`` takes JSON (``{"inputs": [[...]]}``, one sample or a batch) or raw tensor bytes
(``Content-Type: application/octet-stream`` with ``X-Shape`` and ``X-Dtype`` headers) and answers each row's
prediction, exit and MACs with the request's queue and compute time. Beyond ``--max_inflight`` rows the server
answers 503 with ``Retry-After`` at once; ``/health``, ``/ready`` and ``/metrics`` (Prometheus) are there for
orchestrators. Ctrl-C / SIGTERM stops accepting and finishes the admitted requests.
"""

from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace

from ._shared import add_run_access, run_access

HELP = "Serve a calibrated run over HTTP (stage-level early exit, admission control, Prometheus metrics)."


def build(parser: ArgumentParser) -> None:
    parser.add_argument("run_dir", type=str, help="A trained and calibrated run directory.")
    parser.add_argument("--backend", type=str, default="torch", help="torch, or onnx (RUN_DIR/onnx_stages).")
    parser.add_argument("--max_batch", type=int, default=32, help="Most rows in one stage batch.")
    parser.add_argument("--max_inflight", type=int, default=256, help="Most rows admitted at once (then 503).")
    parser.add_argument("--max_rows", type=int, default=64, help="Most rows in one request (then 413).")
    parser.add_argument(
        "--scheduler", type=str, default="fill", help="fill (pool survivors across batches), oldest or deadline."
    )
    parser.add_argument("--max_wait_ms", type=float, default=20.0, help="fill: longest wait for a fuller batch.")
    parser.add_argument(
        "--switch_interval_ms",
        type=float | None,
        default=None,
        help="Python's GIL switch interval while serving (default: Python's 5 ms); smaller lets the event loop "
        "answer (and shed) sooner while a stage runs, at some throughput cost.",
    )
    parser.add_argument("--host", type=str, default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    parser.add_argument("--threads", type=int | None, default=None, help="torch intra-op threads (default: torch's).")
    add_run_access(parser)


def run(args: Namespace) -> None:
    import torch

    from ..errors import ConfigError
    from ..serve.loading import load_served

    try:
        import uvicorn

        from ..serve.app import ServeConfig, create_app
    except ImportError as err:
        raise ConfigError(
            f"adaptnn serve needs the serve extra ({err.name} is missing): pip install 'adaptnn[serve]'"
        ) from None
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    served = load_served(args.run_dir, backend=args.backend, **run_access(args))
    config = ServeConfig(
        max_batch=args.max_batch,
        max_inflight=args.max_inflight,
        max_rows=args.max_rows,
        scheduler=args.scheduler,
        max_wait_ms=args.max_wait_ms,
        switch_interval_ms=args.switch_interval_ms,
    )
    app = create_app(served.backend, config, model_name=str(args.run_dir))
    print(f"serving {args.run_dir} ({args.backend}, {served.policy_name} rule) on http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
