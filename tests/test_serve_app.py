"""The HTTP server: correct answers, 4xx for bad requests, 503 shedding, no admitted request lost, bounded memory."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("starlette", reason="adaptnn[serve] is not installed")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from adaptnn import ConfidencePolicy, create_model  # noqa: E402
from adaptnn.serve import TorchBackend  # noqa: E402
from adaptnn.serve.app import ServeConfig, create_app  # noqa: E402
from helpers import randomise_stats  # noqa: E402

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def model_and_policy():
    torch.manual_seed(5)
    model = randomise_stats(create_model("mecnn_digits")).eval()
    return model, ConfidencePolicy([0.158, 0.265, 0.213])


class GatedBackend(TorchBackend):
    """Stages wait for ``gate`` (so tests can hold requests in flight deterministically)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()

    def run_stage(self, k, state, pstate):
        assert self.gate.wait(30)
        return super().run_stage(k, state, pstate)


def _raw(x: torch.Tensor) -> dict:
    return {
        "content": x.numpy().tobytes(),
        "headers": {
            "content-type": "application/octet-stream",
            "x-dtype": "float32",
            "x-shape": ",".join(str(s) for s in x.shape),
        },
    }


def test_predictions_match_run_dynamic_json_and_raw(model_and_policy) -> None:
    model, policy = model_and_policy
    x = torch.randn(12, *SHAPE)
    ref = model.run_dynamic(x, policy)
    app = create_app(TorchBackend(model, policy), ServeConfig(max_batch=4, max_inflight=64, max_rows=8))
    with TestClient(app) as client:
        one = client.post("/v1/predict", json={"inputs": x[0].tolist()})  # one sample, no batch dim
        assert one.status_code == 200, one.text
        body = one.json()
        assert body["exits"] == [int(ref.exit_index[0])]
        assert body["predictions"] == [int(ref.logits[0].argmax())]
        assert body["macs"] == [float(ref.macs[0])] and body["latency_ms"] >= body["compute_ms"] >= 0
        batch = client.post("/v1/predict?logits=1", json={"inputs": x[1:6].tolist()}).json()
        assert batch["exits"] == ref.exit_index[1:6].tolist()
        torch.testing.assert_close(torch.tensor(batch["logits"]), ref.logits[1:6], atol=1e-5, rtol=1e-5)
        raw = client.post("/v1/predict", **_raw(x[6:12]))
        assert raw.status_code == 200, raw.text
        assert raw.json()["exits"] == ref.exit_index[6:12].tolist()
        assert raw.json()["predictions"] == ref.logits[6:12].argmax(-1).tolist()
        assert client.get("/health").status_code == 200
        assert client.get("/ready").json()["ready"] is True
        metrics = client.get("/metrics").text
        assert 'adaptnn_requests_total{outcome="ok"} 3.0' in metrics
        for k in range(model.num_exits):
            count = int((ref.exit_index == k).sum())
            assert f'adaptnn_answered_rows_total{{exit="{k}"}} {float(count)}' in metrics
        assert "adaptnn_stage_batch_size_bucket" in metrics and 'adaptnn_queue_depth{stage="0"} 0.0' in metrics
        assert "adaptnn_latency_seconds_bucket" in metrics and "adaptnn_request_macs_sum" in metrics


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
        ({"json": {"x": 1}}, 400, "inputs"),
        ({"json": {"inputs": [[1, 2], [3]]}}, 400, "rectangular"),
        ({"json": {"inputs": [["a"]]}}, 400, "numbers"),
        ({"json": {"inputs": torch.zeros(2, 3, 8, 8).tolist()}}, 422, "expected 1 channels"),
        ({"json": {"inputs": torch.zeros(8, 8).tolist()}}, 422, "dims"),
        ({"content": b'{"inputs": ' + json.dumps([[[float("nan")] * 8] * 8]).encode() + b"}"}, 422, "non-finite"),
        ({"json": {"inputs": torch.zeros(9, *SHAPE).tolist()}}, 413, "limit is 8"),
        ({"content": b"x" * 300_000, "headers": {"content-type": "application/json"}}, 413, "larger than"),
        ({"content": b"\x00" * 256, "headers": {"content-type": "text/plain"}}, 415, "Content-Type"),
        (
            {
                "content": b"\x00" * 10,
                "headers": {"content-type": "application/octet-stream", "x-dtype": "float32", "x-shape": "1,1,8,8"},
            },
            400,
            "needs 256 bytes",
        ),  # fmt: skip
        (
            {
                "content": b"\x00" * 512,
                "headers": {"content-type": "application/octet-stream", "x-dtype": "float64", "x-shape": "1,1,8,8"},
            },
            422,
            "expected dtype float32",
        ),  # fmt: skip
        (
            {
                "content": b"\x00" * 256,
                "headers": {"content-type": "application/octet-stream", "x-dtype": "pickle", "x-shape": "1,1,8,8"},
            },
            400,
            "X-Dtype",
        ),  # fmt: skip
        (
            {
                "content": b"\x00" * 256,
                "headers": {"content-type": "application/octet-stream", "x-dtype": "float32", "x-shape": "1,a"},
            },
            400,
            "X-Shape",
        ),  # fmt: skip
    ],
)
def test_bad_requests_get_4xx_and_one_line(model_and_policy, kwargs, status, message) -> None:
    model, policy = model_and_policy
    app = create_app(TorchBackend(model, policy), ServeConfig(max_rows=8, max_inflight=16))
    with TestClient(app) as client:
        answer = client.post("/v1/predict", **kwargs)
        assert answer.status_code == status, answer.text
        assert message in answer.json()["error"]
        good = client.post("/v1/predict", json={"inputs": torch.zeros(1, *SHAPE).tolist()})
        assert good.status_code == 200  # the server goes on


def test_overload_sheds_503_and_loses_no_admitted_request(model_and_policy) -> None:
    model, policy = model_and_policy
    backend = GatedBackend(model, policy)
    max_inflight = 12
    app = create_app(backend, ServeConfig(max_batch=4, max_inflight=max_inflight, max_rows=4))
    front = app.state.front
    x = torch.randn(max_inflight, *SHAPE)
    ref = model.run_dynamic(x, policy)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            backend.gate.clear()  # hold every stage: admitted requests stay in flight
            admitted = [
                asyncio.create_task(client.post("/v1/predict", **_raw(x[i : i + 2]))) for i in range(0, max_inflight, 2)
            ]
            for _ in range(500):
                if front.inflight == max_inflight:
                    break
                await asyncio.sleep(0.01)
            assert front.inflight == max_inflight
            extra = await asyncio.gather(*(client.post("/v1/predict", **_raw(x[:1])) for _ in range(5)))
            backend.gate.set()
            answers = await asyncio.gather(*admitted)
            metrics = (await client.get("/metrics")).text
        return extra, answers, metrics

    front.start()  # ASGITransport runs no lifespan
    try:
        extra, answers, metrics = asyncio.run(main())
    finally:
        front.stop()
    assert [r.status_code for r in extra] == [503] * 5
    assert all(r.headers["retry-after"] == "1" for r in extra)
    assert [r.status_code for r in answers] == [200] * (max_inflight // 2)  # no admitted request lost
    exits = [e for r in answers for e in r.json()["exits"]]
    assert exits == ref.exit_index.tolist()
    assert front.peak_inflight <= max_inflight and front.inflight == 0  # memory bounded by max_inflight rows
    assert "adaptnn_shed_total 5.0" in metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_uvicorn_on_loopback_finishes_admitted_requests_on_shutdown(model_and_policy) -> None:
    model, policy = model_and_policy
    backend = GatedBackend(model, policy)
    app = create_app(backend, ServeConfig(max_batch=8, max_inflight=32, max_rows=8))
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=20)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started
        x = torch.randn(4, *SHAPE)
        ref = model.run_dynamic(x, policy)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/v1/predict", json={"inputs": x.tolist()}).json()["exits"] == ref.exit_index.tolist()
            backend.gate.clear()
            results: list = []
            pending = threading.Thread(
                target=lambda: results.append(httpx.post(f"{url}/v1/predict", **_raw(x), timeout=30))
            )
            pending.start()
            for _ in range(200):
                if app.state.front.inflight == 4:
                    break
                time.sleep(0.02)
            assert app.state.front.inflight == 4
        server.should_exit = True  # graceful shutdown while the request is held in the engine
        time.sleep(0.3)
        backend.gate.set()
        pending.join(30)
        assert results and results[0].status_code == 200
        assert results[0].json()["exits"] == ref.exit_index.tolist()
    finally:
        backend.gate.set()
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive() and app.state.front.inflight == 0


def test_switch_interval_applies_while_serving_and_is_restored(model_and_policy) -> None:
    import sys

    model, policy = model_and_policy
    before = sys.getswitchinterval()
    app = create_app(TorchBackend(model, policy), ServeConfig(max_rows=8, max_inflight=16, switch_interval_ms=0.5))
    with TestClient(app) as client:
        assert abs(sys.getswitchinterval() - 0.0005) < 1e-9
        assert client.get("/health").status_code == 200
    assert sys.getswitchinterval() == before
