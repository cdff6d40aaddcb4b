"""Load test of serving early exit: stage-level pooling vs request-level early exit vs the full model.

Four servers answer the same one-sample requests (same model, inputs, exits) on one compute thread:

* ``full``: request batching (up to ``--max-batch`` waiting requests), the plain full model;
* ``req_ee_batch_end``: request batching, ``run_dynamic`` on the batch, every answer at the batch's end;
* ``req_ee_own_exit``: request batching, each request answered at its own exit: the engine with the
  ``oldest`` scheduler (a batch's survivors run on before newer arrivals, so deep stages only see the survivors
  of one batch);
* ``stage_engine``: the stage-level engine with the ``fill`` scheduler (deep stages pool the survivors of many
  stage-0 batches, bounded by ``--max-wait-ms``).

In-process (default) the load generator and the server share one thread: arrivals are scheduled in advance
(open loop: Poisson; closed loop: ``--clients`` clients with no think time) and admitted when the clock passes
them, so time a request waits while a batch computes counts in its latency, and nothing else competes for the
GIL. Admission control sheds arrivals beyond ``--max-inflight`` rows. Saturation throughput is the closed-loop
rate (repeated, interleaved across servers); open-loop runs at multiples of the stage engine's saturation give
p50/p99 latency per exit. ``--http`` (or ``--http-only``) adds runs over loopback HTTP: ``adaptnn.serve.app`` under
uvicorn in its own process (torch threads ``--threads``), this process the load client on raw keep-alive connections;
per server config (``--http-configs``: stage-level ``fill``, request-level ``oldest``, GIL switch interval) the
closed-loop capacity, then Poisson runs at ``--http-loads`` times it: client-side latency per exit, the server's own
queue/compute/latency times from the answers, the shed answers' latency.

``--baseline-caps 64 128``: the request-level servers (and the full model) also run their closed loops at those
batch caps, interleaved with the others: on a CPU a larger cap gives request-level early exit fuller deep batches
too, so the stage engine (at ``--max-batch``) is also compared with request-level early exit at its best cap
(``stage_vs_best_request_ee_any_cap``), which also answers the open-loop loads (latency at equal load).

Before the runs each model's latency model is profiled (``adaptnn.measure.profile_latency``, every piece alone at
batch sizes up to the cap) and predicts three saturation rates: the full model, request-level early exit (each batch
of ``--max-batch`` requests runs its deep stages on its own survivors) and ideal pooling (every stage on full
batches, ``LatencyModel.predict_pooled``). Their ratio is the most stage-level pooling can gain on this device: on a
CPU, where a row costs about the same at any batch size, it is small, and the measured ratio is read against it.

Models (random weights, thresholds set on random inputs so that about ``--exit-rate`` of the rows still running
stop at each early exit): ``msdnet_cifar10`` (3x32x32) and a timm ResNet-50 staged at its stages (3x64x64 input
to fit a small CPU; ``--resnet-input``). Bounded: ``--count`` requests and ``--max-seconds`` per run.

``--device cuda``: every server runs CUDA graphs captured at bucketed batch sizes up to ``--max-batch``
(:class:`adaptnn.runtime.GraphedModel`): ``full`` is the graphed full model, ``req_ee_batch_end`` its fused
``run_dynamic``, and both engine servers replay one stage graph per pooled batch
(:class:`adaptnn.runtime.cuda_graphs.PooledGraphStages`). The figure of merit there is the stage engine's
saturation over the graphed full model's, next to the MACs-ideal speed-up (no latency-model bound: it times
eager pieces).

Usage::

    python benchmarks/serve_load.py                         # both models, writes benchmarks/results/serve_cpu.*
    python benchmarks/serve_load.py --models msdnet --count 100 --loads 0.5 2   # quick look
    python benchmarks/serve_load.py --models mecnn --http-only --max-inflight 16 --max-wait-ms 20 \
        --out benchmarks/results/serve_cpu_http                                 # over HTTP
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from adaptnn import ConfidencePolicy, create_model
from adaptnn.measure import machine_info
from adaptnn.measure.latency import profile_latency
from adaptnn.serve import Engine, TorchBackend

RESULTS = Path(__file__).parent / "results"
SYSTEMS = ("full", "req_ee_batch_end", "req_ee_own_exit", "stage_engine")
REQUEST_LEVEL = ("req_ee_batch_end", "req_ee_own_exit")


def at_cap(system: str, cap: int) -> str:
    """The name of ``system`` run with batch cap ``cap`` (``--baseline-caps``)."""
    return f"{system}@{cap}"


def split_cap(system: str, default: int) -> tuple[str, int]:
    """``"req_ee_own_exit@128"`` -> ``("req_ee_own_exit", 128)``; a plain name gets ``default``."""
    name, _, cap = system.partition("@")
    return name, int(cap) if cap else default


FLAGS = ("http", "http_only", "out", "emulate_graphs")  # written apart in the command line of the results


def build(name: str, resnet_input: int = 64) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if name == "msdnet":
        return create_model("msdnet_cifar10").eval(), (3, 32, 32)
    if name == "mecnn":  # a small 4-exit CNN: per-call overhead dominates, as in the prototype
        return create_model("mecnn_cifar").eval(), (3, 32, 32)
    from adaptnn.adapters import from_timm

    shape = (3, resnet_input, resnet_input)
    return from_timm("resnet50", num_classes=10, input_size=shape).eval(), shape


def calibrate(model, x: torch.Tensor, rate: float) -> ConfidencePolicy:
    """Thresholds under which about ``rate`` of the rows still running stop at each early exit."""
    with torch.inference_mode():
        scores, _ = ConfidencePolicy([0.0] * (model.num_exits - 1)).scores(model.forward_all(x))
    alive = torch.ones(x.shape[0], dtype=torch.bool)
    thresholds = []
    for k in range(model.num_exits - 1):
        s = scores[k][alive]
        t = float(torch.quantile(s, 1 - rate)) if s.numel() else float("inf")
        thresholds.append(t)
        alive &= scores[k] < t
    return ConfidencePolicy(thresholds)


class BatchServer:
    """Request batching over whole requests: ``full`` or ``req_ee_batch_end`` (``model`` eager or a GraphedModel).

    On a GPU the full model is pipelined like the engine: the next batch is launched before the previous one is
    waited for, so the host's answering overlaps the device's compute (``run_dynamic`` reads its exit counts
    as it goes and cannot be)."""

    def __init__(self, model, policy, max_batch: int, dynamic: bool, num_exits: int, pipeline: bool = False) -> None:
        self.model, self.policy, self.max_batch, self.dynamic = model, policy, max_batch, dynamic
        self.waiting: deque = deque()
        self.launched: deque = deque()  # (batch, CUDA event) of full-model batches not answered yet
        self.pipeline = pipeline and not dynamic
        self.last = num_exits - 1

    @property
    def inflight(self) -> int:
        return len(self.waiting) + sum(len(b) for b, _ in self.launched)

    def submit(self, rid: int, x: torch.Tensor, done: Callable[[int, int], None]) -> None:
        self.waiting.append((rid, x, done))

    def _take(self) -> tuple[list, torch.Tensor]:
        batch = [self.waiting.popleft() for _ in range(min(self.max_batch, len(self.waiting)))]
        return batch, torch.cat([b[1] for b in batch])

    def step(self) -> bool:
        if self.pipeline:
            return self._pipelined_step()
        if not self.waiting:
            return False
        batch, x = self._take()
        with torch.inference_mode():
            exits = self.model.run_dynamic(x, self.policy).exit_index.tolist() if self.dynamic else None
            if not self.dynamic:
                out = self.model(x)
                if out.is_cuda:  # answered once computed
                    torch.cuda.synchronize()
        for i, (rid, _, done) in enumerate(batch):
            done(rid, self.last if exits is None else exits[i])
        return True

    def _pipelined_step(self) -> bool:
        if self.waiting:
            batch, x = self._take()
            with torch.inference_mode():
                self.model(x)
            event = torch.cuda.Event()
            event.record()
            self.launched.append((batch, event))
        if not self.launched:
            return False
        if len(self.launched) >= 2 or not self.waiting:
            batch, event = self.launched.popleft()
            event.synchronize()
            for rid, _, done in batch:
                done(rid, self.last)
        return True


class EngineServer:
    """The engine (``oldest``: request-level early exit answering at own exit; ``fill``: stage-level pooling)."""

    def __init__(self, model, policy, max_batch: int, scheduler: str, max_wait_ms: float, executor=None) -> None:
        self.engine = Engine(
            TorchBackend(model, policy, executor=executor),
            max_batch=max_batch,
            scheduler=scheduler,
            max_wait_ms=max_wait_ms,
        )
        self.batches: list[tuple[int, int]] = []
        self.engine.on_batch = lambda b: self.batches.append((b.stage, b.size))

    @property
    def inflight(self) -> int:
        return self.engine.pending_rows

    def submit(self, rid: int, x: torch.Tensor, done: Callable[[int, int], None]) -> None:
        self.engine.submit(x, callback=lambda r: done(rid, r.result.exits[0]), checked=True)

    def step(self) -> bool:
        return self.engine.step() > 0


def pooling_bound(model, inputs: torch.Tensor, exits: torch.Tensor, args) -> dict:
    """What the latency model (each piece measured alone at batch sizes up to the cap) predicts per request.

    Saturation req/s of the full model, of request-level early exit (each batch of ``--max-batch`` requests runs its
    deep stages on its own survivors) and of ideal pooling (every stage on full batches); ``bound`` = pooled over
    request-level: the most stage-level pooling can gain on this device, engine bookkeeping not counted."""
    b = args.max_batch
    sizes = sorted({s for s in (1, 2, 4, 8, 16, 32, 64) if s < b} | {b})
    lm = profile_latency(model, inputs, batch_sizes=sizes, repeats=10, warmup_s=0.3, num_threads=args.threads)
    order = torch.randperm(8 * len(exits), generator=torch.Generator().manual_seed(0))
    mixed = exits.repeat(8)[order]  # the served inputs' exits in shuffled batches, as requests arrive
    rps = {
        "full": 1e3 * b / lm.predict_full(b),
        "request_level": 1e3 * b / lm.predict_batches(mixed, b),
        "pooled": 1e3 * b / lm.predict_pooled(mixed, b),
    }
    return {"predicted_saturation_rps": rps, "bound": rps["pooled"] / rps["request_level"], "batch_sizes": sizes}


def graph_bound(graphed, inputs: torch.Tensor, exits: torch.Tensor, batch: int) -> dict:
    """What the captured graphs' own GPU times allow at batch ``batch`` (host work not counted): ms per request of
    the full model's graph, of the stage graphs chained, and of every stage on full pooled batches, each stage
    run by the share of the served inputs that reach it; ``bound`` = full graph over pooled."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    x = inputs[torch.arange(batch, device=inputs.device) % len(inputs)]
    samples = []
    with torch.inference_mode():
        for _ in range(10):  # the full model's graph, with its input copy and output clone
            begin.record()
            graphed(x)
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
    full = statistics.median(samples) / batch
    stages = [graphed.stage_ms[(batch, k)] / batch for k in range(graphed.model.num_exits)]
    reach = [float((exits >= k).float().mean()) for k in range(len(stages))]
    pooled = sum(r * ms for r, ms in zip(reach, stages, strict=True))
    return {"full_graph_ms_per_request": full, "stage_graphs_ms_per_request": stages, "share_reaching_stage": reach,
            "pooled_ms_per_request": pooled, "bound": full / pooled}  # fmt: skip


def make_server(system: str, model, policy, args, graphed=None):
    """One server (``name`` or ``name@cap``, see :func:`split_cap`); with ``graphed`` (a GraphedModel of ``model``)
    every system runs through its CUDA graphs."""
    system, cap = split_cap(system, args.max_batch)
    if system in ("full", "req_ee_batch_end"):
        runner = graphed if graphed is not None else model
        return BatchServer(runner, policy, cap, dynamic=system != "full", num_exits=model.num_exits,
                           pipeline=args.device == "cuda")  # fmt: skip
    scheduler = "oldest" if system == "req_ee_own_exit" else "fill"
    executor = graphed.pooled_executor() if graphed is not None else None
    return EngineServer(model, policy, cap, scheduler, args.max_wait_ms, executor=executor)


def drive(server, inputs: torch.Tensor, args, *, rate: float | None, seed: int) -> dict:
    """One run: open loop at ``rate`` req/s (Poisson) or closed loop (``rate=None``); returns latencies and counts."""
    rng = random.Random(seed)
    count = args.count
    if rate is not None:
        count = max(20, min(count, int(rate * args.max_seconds)))
        arrivals, t = [], 0.0
        for _ in range(count):
            t += rng.expovariate(rate)
            arrivals.append(t)
    else:
        arrivals = [0.0] * min(args.clients, count)
    pending = deque(arrivals)
    issued = len(arrivals)
    arrival_of: dict[int, float] = {}
    lat: list[tuple[float, int]] = []  # (ms, exit)
    shed = 0
    t0 = time.perf_counter()
    next_id = 0

    def done(rid: int, exit_index: int) -> None:
        nonlocal issued
        now = time.perf_counter() - t0
        lat.append((1e3 * (now - arrival_of.pop(rid)), exit_index))
        if rate is None and issued < count:  # closed loop: the client sends its next request at once
            pending.append(now)
            issued += 1

    while True:
        now = time.perf_counter() - t0
        if now > args.max_seconds:
            break
        while pending and pending[0] <= now:
            t_arrival = pending.popleft()
            if server.inflight >= args.max_inflight:
                shed += 1
                continue
            rid, next_id = next_id, next_id + 1
            arrival_of[rid] = t_arrival
            server.submit(rid, inputs[rid % len(inputs)].unsqueeze(0), done)
        if server.step():
            continue
        if not pending:
            if not arrival_of:
                break
            continue
        wait = pending[0] - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)
    elapsed = time.perf_counter() - t0
    return {"lat": lat, "shed": shed, "elapsed_s": elapsed, "unfinished": len(arrival_of), "offered": len(arrivals)}


def summarise(run: dict, num_exits: int) -> dict:
    lat = run["lat"]

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    all_ms = [ms for ms, _ in lat]
    per_exit = {}
    for k in range(num_exits):
        ms = [m for m, e in lat if e == k]
        if ms:
            per_exit[str(k)] = {"count": len(ms), "p50_ms": pct(ms, 0.5), "p99_ms": pct(ms, 0.99)}
    return {
        "answered": len(lat),
        "shed": run["shed"],
        "unfinished": run["unfinished"],
        "throughput_rps": len(lat) / run["elapsed_s"] if run["elapsed_s"] > 0 else 0.0,
        "p50_ms": pct(all_ms, 0.5),
        "p99_ms": pct(all_ms, 0.99),
        "per_exit": per_exit,
    }


def _serve_child(args) -> None:
    """The server process of the HTTP runs: the same model, policy and limits as the parent builds, on loopback."""
    import uvicorn

    from adaptnn.serve.app import ServeConfig, create_app

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, shape = build(args.models[0])
    policy = calibrate(model, torch.randn(128, *shape), args.exit_rate)
    config = ServeConfig(
        max_batch=args.max_batch, max_inflight=args.max_inflight, max_rows=1, scheduler=args.serve_scheduler,
        max_wait_ms=args.serve_wait_ms, switch_interval_ms=args.serve_switch_ms,
    )  # fmt: skip
    uvicorn.run(create_app(TorchBackend(model, policy), config), host="127.0.0.1", port=args.serve_port,
                log_level="warning", backlog=4096)  # fmt: skip


class _Conn:
    """One keep-alive HTTP/1.1 connection of the load client (raw asyncio streams: little client CPU per request)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> _Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def send(self, payload: bytes) -> tuple[int, bytes]:
        self.writer.write(payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return int(head[9:12]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def _request_bytes(inputs: torch.Tensor) -> list[bytes]:
    shape = ",".join(str(s) for s in (1, *inputs.shape[1:]))
    out = []
    for x in inputs:
        body = x.unsqueeze(0).numpy().tobytes()
        head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                f"X-Dtype: float32\r\nX-Shape: {shape}\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
        out.append(head.encode() + body)
    return out


async def _closed_http(port: int, payloads: list[bytes], clients: int, count: int, max_s: float) -> dict:
    """Closed loop: ``clients`` keep-alive connections, each sending its next request as soon as answered."""
    conns = [await _Conn.open(port) for _ in range(clients)]
    sent, answered, shed = 0, 0, 0
    t0 = time.perf_counter()

    async def worker(conn: _Conn) -> None:
        nonlocal sent, answered, shed
        while sent < count and time.perf_counter() - t0 < max_s:
            sent += 1
            status, _ = await conn.send(payloads[sent % len(payloads)])
            answered += status == 200
            shed += status == 503

    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    return {"clients": clients, "answered": answered, "shed": shed, "elapsed_s": elapsed,
            "throughput_rps": answered / elapsed}  # fmt: skip


async def _open_http(
    port: int, payloads: list[bytes], rate: float, count: int, seed: int, pool: int, num_exits: int
) -> dict:
    """Open loop: Poisson arrivals at ``rate``; each request takes an idle keep-alive connection (a new one if none
    is idle, its connect time counted). Latency: from the write of the request to the last byte of the answer."""
    rng = random.Random(seed)
    idle = [await _Conn.open(port) for _ in range(pool)]
    ok: list[tuple[float, int, float, float, float]] = []  # client ms, exit, server queue, compute, latency ms
    shed_ms: list[float] = []
    lag_ms: list[float] = []
    failed = 0
    opened = 0

    async def one(i: int) -> None:
        nonlocal failed, opened
        t = time.perf_counter()
        if idle:
            conn = idle.pop()
        else:
            opened += 1
            conn = await _Conn.open(port)
        try:
            status, body = await conn.send(payloads[i % len(payloads)])
        except (OSError, asyncio.IncompleteReadError):
            failed += 1
            conn.close()
            return
        ms = 1e3 * (time.perf_counter() - t)
        idle.append(conn)
        if status == 200:
            a = json.loads(body)
            ok.append((ms, a["exits"][0], a["queue_ms"], a["compute_ms"], a["latency_ms"]))
        elif status == 503:
            shed_ms.append(ms)
        else:
            failed += 1

    tasks, t0, t = [], time.perf_counter(), 0.0
    for i in range(count):
        t += rng.expovariate(rate)
        delay = t - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        lag_ms.append(1e3 * max(0.0, -delay))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    for c in idle:
        c.close()
    lat = [(m, e) for m, e, *_ in ok]
    out = summarise({"lat": lat, "shed": len(shed_ms), "elapsed_s": elapsed, "unfinished": 0}, num_exits)
    out.update(
        rate_rps=rate,
        offered=count,
        transport_errors=failed,
        connections_opened_during_run=opened,
        shed_p50_ms=_pct(shed_ms, 0.5),
        shed_p99_ms=_pct(shed_ms, 0.99),
        shed_max_ms=max(shed_ms) if shed_ms else None,
        send_lag_p99_ms=_pct(lag_ms, 0.99),
        server_queue_p50_ms=_pct([q for _, _, q, _, _ in ok], 0.5),
        server_compute_p50_ms=_pct([c for _, _, _, c, _ in ok], 0.5),
        server_latency_p50_ms=_pct([s for *_, s in ok], 0.5),
        server_latency_p99_ms=_pct([s for *_, s in ok], 0.99),
    )
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


HTTP_CONFIGS = {  # name: (scheduler, GIL switch interval in the server in ms; 5 is Python's default)
    "stage_fill_default_switch": ("fill", 5.0),
    "stage_fill": ("fill", 0.5),
    "req_ee_own_exit": ("oldest", 0.5),
}


def http_runs(name: str, inputs: torch.Tensor, num_exits: int, args) -> dict:
    """Loopback HTTP, the server (uvicorn, ``adaptnn.serve.app``) in its own process, this process the load client.

    Per repeat and config (order rotating): the closed-loop capacity, then Poisson runs at multiples of it (order
    alternating)."""
    import subprocess

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    payloads = _request_bytes(inputs)
    configs = [c for c in args.http_configs]
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        for cfg in order:
            scheduler, switch = HTTP_CONFIGS[cfg]
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, __file__, "--serve-port", str(port), "--models", name, "--max-batch",
                   str(args.max_batch), "--max-inflight", str(args.max_inflight), "--exit-rate", str(args.exit_rate),
                   "--threads", str(args.threads), "--serve-scheduler", scheduler, "--serve-wait-ms",
                   str(args.max_wait_ms), "--serve-switch-ms", str(switch)]  # fmt: skip
            child = subprocess.Popen(cmd)
            try:
                _wait_ready(port, child)
                record: dict = {"config": cfg, "repeat": rep, "loadavg_before": [round(v, 2) for v in os.getloadavg()]}
                asyncio.run(_closed_http(port, payloads, 4, 60, 3.0))  # warm-up
                closed = asyncio.run(_closed_http(port, payloads, args.http_clients, args.count, args.max_seconds))
                record["closed"] = closed
                cap = closed["throughput_rps"]
                loads = args.http_loads if rep % 2 == 0 else args.http_loads[::-1]
                for load in loads:
                    count = max(20, min(args.count, int(load * cap * args.max_seconds)))
                    pool = min(4 * args.max_inflight, 256)
                    record[f"{load}x"] = asyncio.run(
                        _open_http(port, payloads, load * cap, count, 100 * rep + 7, pool, num_exits)
                    )
                record["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
            finally:
                child.terminate()
                child.wait(30)
            runs[cfg].append(record)
            r2 = record.get("2.0x", {})
            print(f"  http {cfg:<26} rep {rep}: capacity {cap:6.1f} req/s; " + "; ".join(
                f"{ld}x p50 {record[f'{ld}x']['p50_ms']:.1f} p99 {record[f'{ld}x']['p99_ms']:.1f} ms"
                for ld in args.http_loads) + f"; 2x shed {r2.get('shed')} p50/p99 {r2.get('shed_p50_ms')}/"
                f"{r2.get('shed_p99_ms')} ms; load {record['loadavg_after']}", flush=True)  # fmt: skip
    return {"configs": {c: {"scheduler": HTTP_CONFIGS[c][0], "server_switch_interval_ms": HTTP_CONFIGS[c][1]}
                        for c in configs}, "runs": runs, "summary": _http_summary(runs, args)}  # fmt: skip


def _wait_ready(port: int, child) -> None:
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"the server process exited with {child.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
                if b" 200 " in s.recv(1024):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server process did not become ready in 120 s")


def _http_summary(runs: dict[str, list[dict]], args) -> dict:
    """Medians over repeats of the figures the issue's targets name."""

    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    out: dict = {}
    for cfg, records in runs.items():
        s: dict = {"capacity_rps": med([r["closed"]["throughput_rps"] for r in records])}
        for load in args.http_loads:
            key = f"{load}x"
            rs = [r[key] for r in records]
            s[key] = {m: med([r[m] for r in rs]) for m in ("p50_ms", "p99_ms", "shed", "answered", "shed_p50_ms",
                      "shed_p99_ms", "shed_max_ms", "server_latency_p99_ms", "server_queue_p50_ms", "send_lag_p99_ms",
                      "transport_errors")}  # fmt: skip
            per = [r["per_exit"] for r in rs]
            exits = sorted({int(k) for p in per for k in p})
            s[key]["per_exit_p50_ms"] = {str(k): med([_get(p, str(k), "p50_ms") for p in per]) for k in exits}
        half = s.get("0.5x", {}).get("per_exit_p50_ms", {})
        if half and len(half) > 1:
            deepest = max(half, key=int)
            s["first_vs_deepest_exit_p50_at_half_load"] = half["0"] / half[deepest] if half.get("0") else None
            s["deepest_exit_at_half_load"] = deepest
        ratios = [r["2.0x"]["p99_ms"] / r["0.8x"]["p99_ms"] for r in records if "2.0x" in r and "0.8x" in r]
        s["p99_2x_vs_p99_0.8x"] = med(ratios)
        s["p99_2x_vs_p99_0.8x_runs"] = ratios
        out[cfg] = s
    if "stage_fill" in out and "req_ee_own_exit" in out:
        out["stage_vs_request_ee_capacity"] = out["stage_fill"]["capacity_rps"] / out["req_ee_own_exit"]["capacity_rps"]
    return out


def bench_model(name: str, args) -> dict:
    torch.manual_seed(0)
    model, shape = build(name, args.resnet_input)
    calib = torch.randn(128, *shape)
    policy = calibrate(model, calib, args.exit_rate)
    inputs = torch.randn(64, *shape)
    exits = model.run_dynamic(inputs, policy).exit_index
    mix = torch.bincount(exits, minlength=model.num_exits).tolist()
    costs = model.exit_costs(inputs).tolist()
    ideal = costs[-1] / (sum(c * m for c, m in zip(costs, mix, strict=True)) / len(inputs))
    print(f"{name}: exits {model.num_exits}, mix on 64 inputs {mix}, MACs-ideal speedup {ideal:.2f}x", flush=True)
    graphed = None
    if args.device == "cuda" or args.emulate_graphs:
        from adaptnn.runtime import GraphedModel

        model, inputs = model.to(args.device), inputs.to(args.device)
        t0 = time.perf_counter()
        graphed = GraphedModel(model, inputs, max_batch=args.max_batch)
        gpu_exits = graphed.run_dynamic(inputs, policy).exit_index
        served = torch.bincount(gpu_exits, minlength=model.num_exits).tolist()
        print(f"  CUDA graphs: {len(graphed.buckets)} buckets captured in {time.perf_counter() - t0:.1f} s; "
              f"exit mix on the GPU {served}", flush=True)  # fmt: skip
        bound = None
        if graphed.use_graphs:
            gb = graph_bound(graphed, inputs, gpu_exits, args.max_batch)
            full_ms, pooled_ms = gb["full_graph_ms_per_request"], gb["pooled_ms_per_request"]
            print(f"  graph GPU times at batch {args.max_batch}: full {full_ms:.4f} ms per request, pooled stages "
                  f"{pooled_ms:.4f}: bound {gb['bound']:.2f}x", flush=True)  # fmt: skip
    else:
        bound = pooling_bound(model, inputs, exits, args)
        print(
            f"  latency model: saturation {bound['predicted_saturation_rps']}, pooling bound {bound['bound']:.2f}x",
            flush=True,
        )
    if args.http_only:
        http = http_runs(name, inputs, model.num_exits, args)
        return {"model": name, "input_shape": list(shape), "exit_macs": costs, "thresholds": policy.thresholds,
                "exit_mix_64": mix, "macs_ideal_speedup": ideal, "latency_model": bound, "http": http}  # fmt: skip
    # the request-level servers and the full model at the other caps, in the same rotation
    extra = [at_cap(s, c) for c in args.baseline_caps if c != args.max_batch for s in ("full", *REQUEST_LEVEL)]
    closed_systems = [*SYSTEMS, *extra]
    for system in closed_systems:  # warm-up: every server on a short closed loop
        short = argparse.Namespace(**{**vars(args), "count": 40, "max_seconds": 3.0})
        drive(make_server(system, model, policy, args, graphed), inputs, short, rate=None, seed=0)
    saturation: dict[str, list[float]] = {s: [] for s in closed_systems}
    closed: dict[str, dict] = {}
    for rep in range(args.repeats):
        shift = rep % len(closed_systems)
        for system in closed_systems[shift:] + closed_systems[:shift]:  # who goes first rotates
            run = drive(make_server(system, model, policy, args, graphed), inputs, args, rate=None, seed=rep)
            summary = summarise(run, model.num_exits)
            saturation[system].append(summary["throughput_rps"])
            closed[system] = summary
            print(f"  closed loop {system:<18} {summary['throughput_rps']:7.1f} req/s", flush=True)
    sat = {s: statistics.median(v) for s, v in saturation.items()}
    capacity = sat["stage_engine"]
    open_systems = list(SYSTEMS)
    if extra:  # request-level early exit at its best other cap answers the same open loads (latency at equal load)
        open_systems.append(max((s for s in extra if split_cap(s, 0)[0] in REQUEST_LEVEL), key=sat.get))
    open_loop: dict[str, dict] = {}
    for load in args.loads:
        open_loop[f"{load}x"] = {}
        for system in open_systems:
            server = make_server(system, model, policy, args, graphed)
            run = drive(server, inputs, args, rate=load * capacity, seed=int(100 * load))
            summary = summarise(run, model.num_exits)
            if isinstance(server, EngineServer):
                deep = [size for stage, size in server.batches if stage > 0]
                summary["mean_deep_batch"] = sum(deep) / len(deep) if deep else None
            open_loop[f"{load}x"][system] = summary
            print(
                f"  {load}x ({load * capacity:6.1f} req/s) {system:<18} p50 {summary['p50_ms']:8.1f} ms  "
                f"p99 {summary['p99_ms']:8.1f} ms  shed {summary['shed']}",
                flush=True,
            )
    out = {
        "model": name,
        "device": args.device,
        "input_shape": list(shape),
        "exit_macs": costs,
        "thresholds": policy.thresholds,
        "exit_mix_64": mix,
        "macs_ideal_speedup": ideal,
        "latency_model": bound,
        "cuda_graph_buckets": graphed.buckets if graphed is not None else None,
        "graph_bound": gb if graphed is not None and graphed.use_graphs else None,
        "saturation_rps": sat,
        "saturation_runs_rps": saturation,
        "closed_loop": closed,
        "open_loop": open_loop,
    }
    if args.http:
        out["http"] = http_runs(name, inputs, model.num_exits, args)
    return out


def _get(d: dict, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k)
    return d


def acceptance(entry: dict) -> dict:
    out: dict = {}
    if "saturation_rps" in entry:
        out.update(_in_process_acceptance(entry))
    if "http" in entry:
        summary = entry["http"]["summary"]
        out["http_stage_vs_request_ee_capacity"] = summary.get("stage_vs_request_ee_capacity")
        for cfg, s in summary.items():
            if not isinstance(s, dict):
                continue
            out[f"http_{cfg}_first_vs_deepest_exit_p50_at_half_load"] = s.get("first_vs_deepest_exit_p50_at_half_load")
            out[f"http_{cfg}_p99_2x_vs_p99_0.8x"] = s.get("p99_2x_vs_p99_0.8x")
            out[f"http_{cfg}_shed_p50_ms_at_2x"] = _get(s, "2.0x", "shed_p50_ms")
            out[f"http_{cfg}_shed_p99_ms_at_2x"] = _get(s, "2.0x", "shed_p99_ms")
    return out


def _in_process_acceptance(entry: dict) -> dict:
    sat = entry["saturation_rps"]
    ol = entry["open_loop"]
    half = _get(ol, "0.5x", "stage_engine", "per_exit") or {}
    deepest = max(half, key=int, default=None)  # the deepest exit any request took in that run
    first_p50 = _get(half, "0", "p50_ms")
    last_p50 = _get(half, deepest, "p50_ms") if deepest not in (None, "0") else None
    p99_80 = _get(ol, "0.8x", "stage_engine", "p99_ms")
    p99_2x = _get(ol, "2.0x", "stage_engine", "p99_ms")
    any_cap = {s: v for s, v in sat.items() if split_cap(s, 0)[0] in REQUEST_LEVEL}
    best = max(any_cap, key=any_cap.get)
    out = {
        "stage_vs_request_ee_throughput": sat["stage_engine"] / max(sat["req_ee_own_exit"], sat["req_ee_batch_end"]),
        "stage_vs_best_request_ee_any_cap": sat["stage_engine"] / any_cap[best],
        "best_request_ee_any_cap": best,
        "first_vs_deepest_exit_p50_at_half_load": first_p50 / last_p50 if first_p50 and last_p50 else None,
        "deepest_exit_taken_at_half_load": deepest,
        "p99_2x_vs_p99_0.8x": p99_2x / p99_80 if p99_2x and p99_80 else None,
    }
    if entry.get("latency_model"):
        out["pooling_bound_latency_model"] = entry["latency_model"]["bound"]
    full = sat["full"]
    if entry.get("graph_bound"):
        out["graph_gpu_time_bound"] = entry["graph_bound"]["bound"]
    out["stage_vs_full_throughput"] = sat["stage_engine"] / full
    out["stage_vs_full_over_macs_ideal"] = sat["stage_engine"] / full / entry["macs_ideal_speedup"]
    out["request_ee_vs_full_over_macs_ideal"] = (
        max(sat["req_ee_own_exit"], sat["req_ee_batch_end"]) / full / entry["macs_ideal_speedup"]
    )
    return out


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Serving early exit: stage-level engine vs request-level early exit vs full model",
        "",
        f"{result['machine']}; torch threads {result['threads']}; load average before/after "
        f"{result['loadavg_before']} / {result['loadavg_after']}. Command: `{result['command']}`",
        "",
    ]
    for entry in result["models"]:
        lines += [f"## {entry['model']} (input {entry['input_shape']}, exit mix on 64 inputs {entry['exit_mix_64']}, "
                  f"MACs-ideal speedup {entry['macs_ideal_speedup']:.2f}x)", ""]  # fmt: skip
        if "saturation_rps" in entry:
            _in_process_markdown(entry, lines)
        acc = entry["acceptance"]
        lines += ["", "Acceptance figures: " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                                          for k, v in acc.items()), ""]  # fmt: skip
        if "http" in entry:
            _http_markdown(entry["http"], lines)
    path.write_text("\n".join(lines) + "\n")


def _http_markdown(http: dict, lines: list[str]) -> None:
    def f(v, nd: int = 1) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    lines += [
        "Loopback HTTP: uvicorn serving `adaptnn.serve.app` in its own process (torch threads as above), the load "
        "client (raw asyncio keep-alive connections, uvloop) in another; median over repeats. Latency is client-side, "
        "from writing the request to the last byte of the answer; server latency is the answer's own `latency_ms`.",
        "",
        "| server config | capacity req/s | load | answered | shed | p50 ms | p99 ms | server p99 ms | "
        "shed answer p50 / p99 / max ms | p50 per exit ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg, s in http["summary"].items():
        if not isinstance(s, dict):
            continue
        for load in [k for k, v in s.items() if isinstance(v, dict) and "per_exit_p50_ms" in v]:
            r = s[load]
            per = ", ".join(f"{k}: {f(v)}" for k, v in r["per_exit_p50_ms"].items())
            lines.append(
                f"| {cfg} | {f(s['capacity_rps'])} | {load} | {f(r['answered'], 0)} | {f(r['shed'], 0)} | "
                f"{f(r['p50_ms'])} | {f(r['p99_ms'])} | {f(r['server_latency_p99_ms'])} | "
                f"{f(r['shed_p50_ms'], 2)} / {f(r['shed_p99_ms'], 2)} / {f(r['shed_max_ms'], 2)} | {per} |"
            )
    lines.append("")
    loads = [r[k][0] for rs in http["runs"].values() for r in rs for k in ("loadavg_before", "loadavg_after")]
    lines += [
        f"1-minute load average during the HTTP runs: {min(loads):.2f} to {max(loads):.2f} on {os.cpu_count()} "
        "cores (the server's two threads, the client and other jobs on the host share them: tails above a few ms "
        "are mostly waiting for a core, see `send_lag_p99_ms`, the client's own lateness, in the JSON).",
        "",
        "Targets over HTTP (medians over repeats):",
        "",
        *_http_verdicts(http["summary"]),
        "",
    ]
    configs = http["configs"].items()
    lines.append("Configs: " + "; ".join(f"{c}: scheduler {v['scheduler']}, server GIL switch interval "
                 f"{v['server_switch_interval_ms']} ms" for c, v in configs))  # fmt: skip
    lines.append("")


def _http_verdicts(summary: dict) -> list[str]:
    """The issue's targets over HTTP, each with its measured figure and met / not met."""

    def yes(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = []
    ratio = summary.get("stage_vs_request_ee_capacity")
    if ratio is not None:
        out.append(f"- stage-level capacity >= 1.3x request-level early exit (own-exit answers, same server): "
                   f"{ratio:.2f}x, {yes(ratio >= 1.3)}")  # fmt: skip
    for cfg, s in summary.items():
        if not isinstance(s, dict):
            continue
        first = s.get("first_vs_deepest_exit_p50_at_half_load")
        if first is not None:
            out.append(f"- {cfg}: half-load p50 of exit-0 requests <= 0.5x that of the deepest exit "
                       f"({s['deepest_exit_at_half_load']}): {first:.2f}x, {yes(first <= 0.5)}")  # fmt: skip
        p99 = s.get("p99_2x_vs_p99_0.8x")
        shed = s.get("2.0x", {})
        if p99 is not None:
            out.append(f"- {cfg}: admitted p99 at 2x <= 2x p99 at 0.8x: {p99:.2f}x (runs "
                       f"{', '.join(f'{r:.2f}' for r in s['p99_2x_vs_p99_0.8x_runs'])}), {yes(p99 <= 2)}")  # fmt: skip
        if shed.get("shed_p99_ms") is not None:
            out.append(f"- {cfg}: shed answers < 5 ms at 2x: p50 {shed['shed_p50_ms']:.2f} ms, p99 "
                       f"{shed['shed_p99_ms']:.2f} ms: p50 {yes(shed['shed_p50_ms'] < 5)}, "
                       f"p99 {yes(shed['shed_p99_ms'] < 5)}")  # fmt: skip
    return out


def _in_process_markdown(entry: dict, lines: list[str]) -> None:
    lines += [
        "Saturation (closed loop, median of repeats), req/s:",
        "",
        "| " + " | ".join(SYSTEMS) + " |",
        "|" + "---|" * len(SYSTEMS),
        "| " + " | ".join(f"{entry['saturation_rps'][s]:.1f}" for s in SYSTEMS) + " |",
        "",
    ]
    others = [s for s in entry["saturation_rps"] if "@" in s]
    if others:
        caps = sorted({split_cap(s, 0)[1] for s in others})
        names = ("full", *REQUEST_LEVEL)
        lines += [
            "The full model and request-level early exit at other batch caps (closed loop, in the same rotation):",
            "",
            "| cap | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
            *(f"| {c} | " + " | ".join(f"{entry['saturation_rps'].get(at_cap(n, c), float('nan')):.1f}" for n in names)
              + " |" for c in caps),
            "",
        ]  # fmt: skip
    lm = entry.get("latency_model")
    if lm:
        pred = lm["predicted_saturation_rps"]
        measured = entry["saturation_rps"]["stage_engine"] / max(
            entry["saturation_rps"]["req_ee_own_exit"], entry["saturation_rps"]["req_ee_batch_end"]
        )
        lines += [
            f"Latency model (every piece measured alone at batch {lm['batch_sizes']}), predicted saturation req/s: "
            f"full {pred['full']:.1f}, request-level early exit {pred['request_level']:.1f}, every stage on full "
            f"batches {pred['pooled']:.1f}: pooling can gain at most **{lm['bound']:.2f}x** here (measured "
            f"{measured:.2f}x).",
            "",
        ]
    gb = entry.get("graph_bound")
    if gb:
        lines += [
            f"CUDA graphs' own GPU time at the batch cap (host work not counted): full model "
            f"{1e3 * gb['full_graph_ms_per_request']:.1f} us per request, every stage on full pooled batches "
            f"{1e3 * gb['pooled_ms_per_request']:.1f} us: pooling can reach at most **{gb['bound']:.2f}x** the graphed "
            f"full model here (MACs-ideal {entry['macs_ideal_speedup']:.2f}x).",
            "",
        ]
    lines += [
        "Open loop (Poisson) at multiples of the stage engine's saturation (deepest: the deepest exit taken):",
        "",
        "| load | server | answered | shed | p50 ms | p99 ms | p50 exit 0 | p50 deepest | deep-stage batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for load, systems in entry["open_loop"].items():
        for system, s in systems.items():
            per_exit = s.get("per_exit") or {}
            deepest = max(per_exit, key=int, default="0")
            first = _get(per_exit, "0", "p50_ms")
            lst = _get(per_exit, deepest, "p50_ms")
            deep = s.get("mean_deep_batch")
            lines.append(
                f"| {load} | {system} | {s['answered']} | {s['shed']} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                + (f"{first:.1f}" if first else "-") + " | " + (f"{lst:.1f} (exit {deepest})" if lst else "-")
                + " | " + (f"{deep:.1f}" if deep else "-") + " |"
            )  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in result["models"] if "open_loop" in m]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, entry in zip(axes[0], models, strict=True):
        loads = list(entry["open_loop"])
        xs = [float(load[:-1]) for load in loads]
        for system in SYSTEMS:
            p50 = [entry["open_loop"][load][system]["p50_ms"] for load in loads]
            p99 = [entry["open_loop"][load][system]["p99_ms"] for load in loads]
            (line,) = ax.plot(xs, p50, marker="o", label=f"{system} p50")
            ax.plot(xs, p99, marker="x", linestyle="--", color=line.get_color(), label=f"{system} p99")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (x stage engine saturation)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(entry["model"])
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["msdnet", "resnet50"])
    parser.add_argument("--count", type=int, default=200, help="Requests per run (upper bound).")
    parser.add_argument("--max-seconds", type=float, default=5.0, help="Wall-clock bound per run.")
    parser.add_argument("--clients", type=int, default=128, help="Closed-loop clients (saturation runs).")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--baseline-caps", type=int, nargs="*", default=[],
                        help="Also run the full model and request-level early exit at these batch caps.")  # fmt: skip
    parser.add_argument("--max-inflight", type=int, default=128)
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--exit-rate", type=float, default=0.35, help="Share of running rows leaving at each exit.")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8, 2.0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: every server on CUDA graphs.")
    parser.add_argument("--emulate-graphs", action="store_true", help=argparse.SUPPRESS)  # CPU smoke test of cuda
    parser.add_argument("--resnet-input", type=int, default=64, help="ResNet-50's input side (224: ImageNet's).")
    parser.add_argument("--http", action="store_true", help="Also run over loopback HTTP (uvicorn).")
    parser.add_argument("--http-only", action="store_true", help="Only the HTTP runs (no in-process comparison).")
    parser.add_argument("--http-configs", nargs="+", default=list(HTTP_CONFIGS), choices=list(HTTP_CONFIGS))
    parser.add_argument("--http-loads", type=float, nargs="+", default=[0.5, 0.8, 2.0])
    parser.add_argument("--http-clients", type=int, default=16, help="HTTP closed-loop clients (keep <= inflight).")
    parser.add_argument("--serve-port", type=int, default=None, help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--serve-scheduler", type=str, default="fill", help=argparse.SUPPRESS)
    parser.add_argument("--serve-wait-ms", type=float, default=20.0, help=argparse.SUPPRESS)
    parser.add_argument("--serve-switch-ms", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=str, default=str(RESULTS / "serve_cpu"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch here")
    if args.resnet_input < 32 or args.max_batch < 1 or any(c < 1 for c in args.baseline_caps):
        parser.error(f"--resnet-input must be >= 32 and --max-batch and --baseline-caps >= 1, got "
                     f"{args.resnet_input}, {args.max_batch}, {args.baseline_caps}")  # fmt: skip
    if args.serve_port is not None:
        _serve_child(args)
        return
    torch.set_num_threads(args.threads)
    result = {
        "machine": f"{machine_info()['processor']} ({os.cpu_count()} cores), torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "threads": args.threads,
        "loadavg_before": [round(v, 2) for v in os.getloadavg()],
        "command": "python benchmarks/serve_load.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in FLAGS and not k.startswith("serve_"))
            + (" --http" if args.http else "") + (" --http-only" if args.http_only else "")
            + (" --emulate-graphs" if args.emulate_graphs else "") + f" --out {args.out}",
        "args": vars(args),
        "models": [],
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        entry = bench_model(name, args)
        entry["acceptance"] = acceptance(entry)
        print(f"  acceptance: {entry['acceptance']}", flush=True)
        result["models"].append(entry)
        result["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
        # after every model: a bounded run (a lent GPU's time) keeps what it measured
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(result, out.with_suffix(".md"))
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.json')}, .md and .png", flush=True)


if __name__ == "__main__":
    main()
