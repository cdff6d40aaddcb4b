"""The Ray Serve deployment answers through 2 replicas on loopback, each pooling with its own engine."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'adaptnn[ray]'")
pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'adaptnn[ray]'")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_answer_like_run_dynamic(tmp_path) -> None:
    from ray import serve

    from adaptnn.cli import main
    from adaptnn.policies import policy_from_dict
    from adaptnn.runs import read_calibration
    from adaptnn.runs.rundir import load_run
    from adaptnn.serve.app import ServeConfig
    from adaptnn.serve.ray import build_deployment, run_deployment

    run_dir = tmp_path / "quick"
    assert main(["quickstart", "--run_dir", str(run_dir), "--epochs", "1", "--tolerance", "0.9"]) == 0
    loaded = load_run(run_dir)
    policy = policy_from_dict(read_calibration(run_dir / "calibration.json")["policy_spec"])
    test = loaded.splits.test
    x = torch.stack([torch.as_tensor(test[i][0]) for i in range(32)])
    ref = loaded.model.eval().run_dynamic(x, policy)

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        app = build_deployment(
            str(run_dir), num_replicas=2, num_cpus=0.5, config=ServeConfig(max_batch=8, max_inflight=16, max_rows=4)
        )
        run_deployment(app, port=port)

        def ask(i: int) -> httpx.Response:
            return httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": x[i].tolist()}, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(32)))
        assert [a.status_code for a in answers] == [200] * 32
        assert [a.json()["exits"][0] for a in answers] == ref.exit_index.tolist()
        assert len({a.headers["x-adaptnn-replica"] for a in answers}) == 2  # both replicas answered
        assert httpx.get(f"http://127.0.0.1:{port}/ready", timeout=30).json()["ready"] is True
    finally:
        serve.shutdown()
        ray.shutdown()
