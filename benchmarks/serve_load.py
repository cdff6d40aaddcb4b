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
p50/p99 latency per exit. ``--http`` adds runs over loopback HTTP against ``adaptnn.serve.app`` (uvicorn), which
measure the shed answer's latency and the admitted p99 at 2x capacity.

Models (random weights, thresholds set on random inputs so that about ``--exit-rate`` of the rows still running
stop at each early exit): ``msdnet_cifar10`` (3x32x32) and a timm ResNet-50 staged at its stages (3x64x64 input
to fit a small CPU). Bounded: ``--count`` requests and ``--max-seconds`` per run.

Usage::

    python benchmarks/serve_load.py                         # both models, writes benchmarks/results/serve_cpu.*
    python benchmarks/serve_load.py --models msdnet --count 100 --loads 0.5 2   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from adaptnn import ConfidencePolicy, create_model
from adaptnn.serve import Engine, TorchBackend

RESULTS = Path(__file__).parent / "results"
SYSTEMS = ("full", "req_ee_batch_end", "req_ee_own_exit", "stage_engine")


def build(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if name == "msdnet":
        return create_model("msdnet_cifar10").eval(), (3, 32, 32)
    if name == "mecnn":  # a small 4-exit CNN: per-call overhead dominates, as in the prototype
        return create_model("mecnn_cifar").eval(), (3, 32, 32)
    from adaptnn.adapters import from_timm

    return from_timm("resnet50", num_classes=10, input_size=(3, 64, 64)).eval(), (3, 64, 64)


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
    """Request batching over whole requests: ``full`` or ``req_ee_batch_end``."""

    def __init__(self, model, policy, max_batch: int, dynamic: bool) -> None:
        self.model, self.policy, self.max_batch, self.dynamic = model, policy, max_batch, dynamic
        self.waiting: deque = deque()
        self.last = model.num_exits - 1

    @property
    def inflight(self) -> int:
        return len(self.waiting)

    def submit(self, rid: int, x: torch.Tensor, done: Callable[[int, int], None]) -> None:
        self.waiting.append((rid, x, done))

    def step(self) -> bool:
        if not self.waiting:
            return False
        batch = [self.waiting.popleft() for _ in range(min(self.max_batch, len(self.waiting)))]
        x = torch.cat([b[1] for b in batch])
        with torch.inference_mode():
            exits = self.model.run_dynamic(x, self.policy).exit_index.tolist() if self.dynamic else None
            if not self.dynamic:
                self.model(x)
        for i, (rid, _, done) in enumerate(batch):
            done(rid, self.last if exits is None else exits[i])
        return True


class EngineServer:
    """The engine (``oldest``: request-level early exit answering at own exit; ``fill``: stage-level pooling)."""

    def __init__(self, model, policy, max_batch: int, scheduler: str, max_wait_ms: float) -> None:
        self.engine = Engine(
            TorchBackend(model, policy), max_batch=max_batch, scheduler=scheduler, max_wait_ms=max_wait_ms
        )
        self.batches: list[tuple[int, int]] = []
        self.engine.on_batch = lambda b: self.batches.append((b.stage, b.size))

    @property
    def inflight(self) -> int:
        return self.engine.pending_rows

    def submit(self, rid: int, x: torch.Tensor, done: Callable[[int, int], None]) -> None:
        self.engine.submit(x, callback=lambda r: done(rid, int(r.result.exit_index[0])), checked=True)

    def step(self) -> bool:
        return self.engine.step() > 0


def make_server(system: str, model, policy, args):
    if system == "full":
        return BatchServer(model, policy, args.max_batch, dynamic=False)
    if system == "req_ee_batch_end":
        return BatchServer(model, policy, args.max_batch, dynamic=True)
    scheduler = "oldest" if system == "req_ee_own_exit" else "fill"
    return EngineServer(model, policy, args.max_batch, scheduler, args.max_wait_ms)


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


def http_runs(model, policy, inputs, args, capacity: float) -> dict:
    """Loopback HTTP (uvicorn) against the stage engine: its closed-loop capacity over HTTP, then admitted latency
    at 0.8x and 2x that capacity and the shed answers' latency."""
    import httpx
    import uvicorn

    from adaptnn.serve.app import ServeConfig, create_app

    sys.setswitchinterval(args.switch_interval_ms / 1e3)  # see --switch-interval-ms
    app = create_app(
        TorchBackend(model, policy),
        ServeConfig(
            max_batch=args.max_batch, max_inflight=args.max_inflight, max_rows=1, scheduler="fill", max_wait_ms=20.0
        ),
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    bodies = [x.unsqueeze(0).numpy().tobytes() for x in inputs]
    headers = {"content-type": "application/octet-stream", "x-dtype": "float32",
               "x-shape": ",".join(str(s) for s in (1, *inputs.shape[1:]))}  # fmt: skip

    async def run(rate: float, seed: int) -> dict:
        rng = random.Random(seed)
        count = max(20, min(args.count, int(rate * args.max_seconds)))
        ok: list[tuple[float, int]] = []
        shed_ms: list[float] = []
        failed = 0
        limits = httpx.Limits(max_connections=args.max_inflight * 2)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits) as client:

            async def one(i: int) -> None:
                nonlocal failed
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", content=bodies[i % len(bodies)], headers=headers)
                except httpx.HTTPError:  # connection refused/reset under overload: counted, not fatal
                    failed += 1
                    return
                ms = 1e3 * (time.perf_counter() - t)
                if r.status_code == 200:
                    ok.append((ms, r.json()["exits"][0]))
                elif r.status_code == 503:
                    shed_ms.append(ms)

            tasks, t0, t = [], time.perf_counter(), 0.0
            for i in range(count):
                t += rng.expovariate(rate)
                delay = t - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - t0
        out = summarise({"lat": ok, "shed": len(shed_ms), "elapsed_s": elapsed, "unfinished": 0}, model.num_exits)
        shed_ms.sort()
        out["transport_errors"] = failed
        out["shed_p50_ms"] = shed_ms[len(shed_ms) // 2] if shed_ms else None
        out["shed_p99_ms"] = shed_ms[min(len(shed_ms) - 1, int(0.99 * len(shed_ms)))] if shed_ms else None
        return out

    async def closed(clients: int, count: int) -> float:
        """Closed-loop requests/s over HTTP (the HTTP capacity: client, server and engine share this machine)."""
        done = 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

            async def worker() -> None:
                nonlocal done
                while done < count:
                    done += 1
                    await client.post("/v1/predict", content=bodies[done % len(bodies)], headers=headers)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            return count / (time.perf_counter() - t0)

    try:
        asyncio.run(closed(8, 40))  # warm-up
        http_capacity = asyncio.run(closed(args.clients // 4, min(args.count, 300)))
        print(f"  http closed loop ({args.clients // 4} clients): {http_capacity:.1f} req/s", flush=True)
        out: dict = {"capacity_rps": http_capacity, "in_process_capacity_rps": capacity}
        for load in (0.8, 2.0):
            out[f"{load}x"] = {"rate_rps": load * http_capacity, **asyncio.run(run(load * http_capacity, 7))}
        return out
    finally:
        server.should_exit = True
        thread.join(30)


def bench_model(name: str, args) -> dict:
    torch.manual_seed(0)
    model, shape = build(name)
    calib = torch.randn(128, *shape)
    policy = calibrate(model, calib, args.exit_rate)
    inputs = torch.randn(64, *shape)
    exits = model.run_dynamic(inputs, policy).exit_index
    mix = torch.bincount(exits, minlength=model.num_exits).tolist()
    costs = model.exit_costs(inputs).tolist()
    ideal = costs[-1] / (sum(c * m for c, m in zip(costs, mix, strict=True)) / len(inputs))
    print(f"{name}: exits {model.num_exits}, mix on 64 inputs {mix}, MACs-ideal speedup {ideal:.2f}x", flush=True)
    if args.http_only:
        http = http_runs(model, policy, inputs, args, None)
        return {"model": name, "input_shape": list(shape), "exit_macs": costs, "thresholds": policy.thresholds,
                "exit_mix_64": mix, "macs_ideal_speedup": ideal, "http": http}  # fmt: skip
    for system in SYSTEMS:  # warm-up: every server on a short closed loop
        drive(make_server(system, model, policy, args), inputs, argparse.Namespace(**{**vars(args), "count": 40,
              "max_seconds": 3.0}), rate=None, seed=0)  # fmt: skip
    saturation: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    closed: dict[str, dict] = {}
    for rep in range(args.repeats):
        for system in SYSTEMS[rep % 2 :] + SYSTEMS[: rep % 2]:  # who goes first rotates
            run = drive(make_server(system, model, policy, args), inputs, args, rate=None, seed=rep)
            summary = summarise(run, model.num_exits)
            saturation[system].append(summary["throughput_rps"])
            closed[system] = summary
            print(f"  closed loop {system:<18} {summary['throughput_rps']:7.1f} req/s", flush=True)
    sat = {s: statistics.median(v) for s, v in saturation.items()}
    capacity = sat["stage_engine"]
    open_loop: dict[str, dict] = {}
    for load in args.loads:
        open_loop[f"{load}x"] = {}
        for system in SYSTEMS:
            server = make_server(system, model, policy, args)
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
        "input_shape": list(shape),
        "exit_macs": costs,
        "thresholds": policy.thresholds,
        "exit_mix_64": mix,
        "macs_ideal_speedup": ideal,
        "saturation_rps": sat,
        "saturation_runs_rps": saturation,
        "closed_loop": closed,
        "open_loop": open_loop,
    }
    if args.http:
        out["http"] = http_runs(model, policy, inputs, args, capacity)
        for load, summary in out["http"].items():
            if not isinstance(summary, dict):
                continue
            print(f"  http {load}: p50 {summary['p50_ms']} p99 {summary['p99_ms']} shed {summary['shed']} "
                  f"shed p50 {summary['shed_p50_ms']} ms", flush=True)  # fmt: skip
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
        http = entry["http"]
        out["http_shed_p50_ms_at_2x"] = http["2.0x"]["shed_p50_ms"]
        out["http_shed_p99_ms_at_2x"] = http["2.0x"]["shed_p99_ms"]
        h80, h2 = http["0.8x"]["p99_ms"], http["2.0x"]["p99_ms"]
        out["http_p99_2x_vs_p99_0.8x"] = h2 / h80 if h2 and h80 else None
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
    out = {
        "stage_vs_request_ee_throughput": sat["stage_engine"] / max(sat["req_ee_own_exit"], sat["req_ee_batch_end"]),
        "first_vs_deepest_exit_p50_at_half_load": first_p50 / last_p50 if first_p50 and last_p50 else None,
        "deepest_exit_taken_at_half_load": deepest,
        "p99_2x_vs_p99_0.8x": p99_2x / p99_80 if p99_2x and p99_80 else None,
    }
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
            http = entry["http"]
            cap = http["capacity_rps"]
            lines.append(f"Loopback HTTP (uvicorn, client in the same process): closed-loop capacity {cap:.1f} req/s")
            for load, s in http.items():
                if not isinstance(s, dict):
                    continue
                lines.append(
                    f"- HTTP {load} ({s['rate_rps']:.1f} req/s): answered {s['answered']}, shed {s['shed']}, "
                    f"transport errors {s['transport_errors']}, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, "
                    f"shed answer p50/p99 {s['shed_p50_ms']}/{s['shed_p99_ms']} ms"
                )
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


def _in_process_markdown(entry: dict, lines: list[str]) -> None:
    lines += [
        "Saturation (closed loop, median of repeats), req/s:",
        "",
        "| " + " | ".join(SYSTEMS) + " |",
        "|" + "---|" * len(SYSTEMS),
        "| " + " | ".join(f"{entry['saturation_rps'][s]:.1f}" for s in SYSTEMS) + " |",
        "",
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
    parser.add_argument("--max-inflight", type=int, default=128)
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--exit-rate", type=float, default=0.35, help="Share of running rows leaving at each exit.")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8, 2.0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--http", action="store_true", help="Also run over loopback HTTP (uvicorn).")
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=5.0,
        help="HTTP runs: Python's GIL switch interval (client, uvicorn loop and engine thread share one GIL).",
    )
    parser.add_argument("--http-only", action="store_true", help="Only the HTTP runs (no in-process comparison).")
    parser.add_argument("--out", type=str, default=str(RESULTS / "serve_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}",
        "threads": args.threads,
        "loadavg_before": [round(v, 2) for v in os.getloadavg()],
        "command": "python benchmarks/serve_load.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("http", "http_only", "out"))
            + (" --http" if args.http else "") + (" --http-only" if args.http_only else "") + f" --out {args.out}",
        "args": vars(args),
        "models": [],
    }  # fmt: skip
    for name in args.models:
        entry = bench_model(name, args)
        entry["acceptance"] = acceptance(entry)
        print(f"  acceptance: {entry['acceptance']}", flush=True)
        result["models"].append(entry)
    result["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}, .md and .png")


if __name__ == "__main__":
    main()
