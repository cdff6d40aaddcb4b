"""A run directory has one writer at a time and changes atomically: old run or new run, never a mix.

Unit tier: the lock, the temp-file sweep, the directory swap and its crash recovery on synthetic directories.
Integration tier: tiny digits runs (4-channel CNN, 256-sample batches) interrupted in process, and the
``kill -9`` loop, which runs the real CLI in subprocesses and kills it at points found by polling the files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from adaptnn.cli import main
from adaptnn.errors import CheckpointError, ConfigError, DataError
from adaptnn.io import LOCK_NAME, RunLock, RunLockedError, load_checkpoint, lock_holder, sweep_temp_files
from adaptnn.runs import calibrate_run, evaluate_run, read_calibration, read_report, train_run
from adaptnn.runs import rundir as rundir_module
from adaptnn.runs.config import RunConfig, load_config, save_config
from adaptnn.runs.rundir import StagedOverwrite, recover_run_dir, staging_path
from adaptnn.training import TrainConfig, Trainer

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny(epochs: int = 2, lr: float = 0.05, data_seed: int = 0) -> RunConfig:
    """A run that trains in well under a second per epoch on one CPU thread."""
    return RunConfig.from_dict(
        {
            "data": {"name": "digits", "val_size": 100, "augment": False, "seed": data_seed},
            "model": {"name": "mecnn_digits", "kwargs": {"widths": [4, 4, 4, 4]}},
            "train": {"epochs": epochs, "batch_size": 256, "lr": lr, "device": "cpu", "progress": False},
            "calibration": {"tolerance": 0.5},
            "eval": {"device": "cpu", "batch_size": 512},
        }
    )


def files_of(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory (relative path -> bytes), without the lock and killed writers' temp files."""
    out = {}
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and path.name != LOCK_NAME and not (path.name.startswith(".") and path.suffix == ".tmp"):
            out[str(path.relative_to(run_dir))] = path.read_bytes()
    return out


def metrics_epochs(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.exists() else []


def _jsonable(value):
    return json.loads(json.dumps(value))


def assert_consistent_new_run(run_dir: Path, config: RunConfig) -> int:
    """``run_dir`` holds ``config``'s run and nothing of another; returns its committed epochs (0: none yet)."""
    assert load_config(run_dir / "config.yaml").to_dict() == config.to_dict()
    splits = json.loads((run_dir / "splits.json").read_text())
    assert splits["seed"] == config.data.seed and splits["sizes"]["val"] == config.data.val_size
    assert not (run_dir / "calibration.json").exists() and not (run_dir / "report.json").exists()
    checkpoint = run_dir / "checkpoints" / "last.safetensors"
    if not checkpoint.exists():
        assert metrics_epochs(run_dir) == [] and not (run_dir / "model.safetensors").exists()
        return 0
    meta = load_checkpoint(checkpoint).meta
    assert meta["train_config"] == _jsonable(asdict(config.train))
    assert meta["data"] == _jsonable(config.to_dict()["data"])
    committed = meta["epoch"] + 1
    # the metrics line is written after the commit: at most the newest committed epoch's line is missing
    assert metrics_epochs(run_dir) in (list(range(1, committed + 1)), list(range(1, committed)))
    readable = json.loads(checkpoint.with_suffix(".json").read_text())
    assert readable["epoch"] in (meta["epoch"], meta["epoch"] + 1)  # never behind the safetensors
    if (run_dir / "model.safetensors").exists():
        final = load_checkpoint(run_dir / "model.safetensors")
        assert final.meta["data"] == meta["data"] and committed == config.train.epochs
        assert metrics_epochs(run_dir) == list(range(1, committed + 1))
        for key, value in final.model_state.items():
            assert torch.equal(value, load_checkpoint(checkpoint).model_state[key]), key
    return committed


# ---- unit tier: lock, sweep, swap -------------------------------------------------------------------------------
def test_lock_is_reentrant_and_records_its_holder(tmp_path):
    run = tmp_path / "run"
    with RunLock(run, command="adaptnn train --run_dir run") as outer:
        with RunLock(run):  # evaluate_run -> calibrate_run: the same process takes it again
            pass
        assert outer.held
        holder = lock_holder(run)
        assert holder["pid"] == os.getpid() and holder["command"] == "adaptnn train --run_dir run"
        with open(run / LOCK_NAME) as other, pytest.raises(BlockingIOError):  # another open file: refused
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(run / LOCK_NAME) as other:  # released: free again, and the file stays
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_temp_files_of_killed_writes_are_swept(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    keep = [run / "config.yaml", run / "checkpoints" / "last.safetensors", run / ".hidden.tmp"]
    litter = [run / ".config.yaml.k2j_9x0a.tmp", run / "checkpoints" / ".last.safetensors.abcdefgh.tmp"]
    for path in keep + litter:
        path.write_text("x")
    stale = staging_path(run)
    stale.mkdir()
    (stale / "config.yaml").write_text("new run that never got its first checkpoint")
    with RunLock(run):
        removed = recover_run_dir(run)
    assert set(removed) == {*litter, stale}
    assert all(p.exists() for p in keep) and not any(p.exists() for p in litter) and not stale.exists()
    assert sweep_temp_files(run) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "moves"])
def test_staged_overwrite_swaps_in_one_step_and_the_lock_follows(tmp_path, monkeypatch, exchange):
    if not exchange:  # a platform that cannot exchange directories: entries are moved under a journal

        def unsupported(a, b):
            raise OSError(errno.ENOTSUP, "no exchange here")

        monkeypatch.setattr(rundir_module, "exchange_dirs", unsupported)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("old")
    (run / "model.safetensors").write_text("old weights")
    with RunLock(run) as lock:
        staged = StagedOverwrite(run, lock)
        (staged.path / "config.yaml").write_text("new")
        (staged.path / "checkpoints").mkdir()
        (staged.path / "checkpoints" / "last.safetensors").write_text("epoch 1")
        assert (run / "model.safetensors").exists()  # the old run is complete until the swap
        staged.swap()
        assert files_of(run) == {"config.yaml": b"new", "checkpoints/last.safetensors": b"epoch 1"}
        assert not staged.path.exists() and not list(tmp_path.glob(".run.*"))
        with open(run / LOCK_NAME) as other, pytest.raises(BlockingIOError):  # the file at the path is held
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(run / LOCK_NAME) as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("crash", ["before-moves", "moving-old-out", "moving-new-in"])
def test_an_interrupted_move_swap_is_rolled_forward(tmp_path, crash):
    """The journal of the move-based swap: wherever the crash hit, recovery ends with the new run, whole."""
    run, staging, replaced = tmp_path / "run", tmp_path / ".run.overwrite", tmp_path / ".run.replaced"
    for d in (run, staging, replaced):
        d.mkdir()
    new = {"config.yaml": "new", "metrics.jsonl": "{}"}
    if crash == "before-moves":
        (run / "config.yaml").write_text("old")
        (run / "model.safetensors").write_text("old weights")
        for name, text in new.items():
            (staging / name).write_text(text)
    elif crash == "moving-old-out":
        (replaced / "config.yaml").write_text("old")
        (run / "model.safetensors").write_text("old weights")
        for name, text in new.items():
            (staging / name).write_text(text)
    else:  # every old entry out (the mark says so), one new entry in
        (replaced / "config.yaml").write_text("old")
        (replaced / "model.safetensors").write_text("old weights")
        (replaced / rundir_module._MOVED_MARK).touch()
        (run / "config.yaml").write_text("new")
        (staging / "metrics.jsonl").write_text("{}")
    with RunLock(run):
        recover_run_dir(run)
    assert {k: v.decode() for k, v in files_of(run).items()} == new
    assert not staging.exists() and not replaced.exists()


# ---- integration tier: tiny runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> tuple[Path, RunConfig]:
    """A finished, calibrated run (1 epoch) to overwrite, copy and break."""
    run = tmp_path_factory.mktemp("base") / "old"
    config = tiny(epochs=1)
    train_run(config, run)
    calibrate_run(run, progress=False)
    return run, config


def copy_run(old_run: tuple[Path, RunConfig], target: Path) -> Path:
    shutil.copytree(old_run[0], target)
    return target


@pytest.mark.integration
def test_two_writers_second_is_refused_naming_the_first(old_run, tmp_path, capsys):
    """Defect 3: a second writer mixed configs, weights and metrics. Now it gets one line naming PID and fix."""
    run = copy_run(old_run, tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom adaptnn.io import RunLock\n"
         "with RunLock(sys.argv[1], command='adaptnn train (test holder)'):\n print('locked', flush=True)\n"
         " time.sleep(120)\n", str(run)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = files_of(run)
        new = tmp_path / "new.yaml"
        save_config(tiny(epochs=1, lr=0.01), new)
        for argv in (
            ["train", "--config", str(new), "--run_dir", str(run), "--overwrite"],
            ["calibrate", str(run)],
            ["evaluate", str(run), "--policies", "[]"],
        ):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"is being written by PID {holder.pid}" in err and "adaptnn train (test holder)" in err
            assert f"delete {run / LOCK_NAME}" in err and len(err.strip().splitlines()) == 1
        assert files_of(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(run):  # the OS dropped the killed holder's lock: nothing stale to delete
        pass


def _interrupt_on(monkeypatch, cls, name: str, when: Callable[[int], bool], before: bool = True) -> None:
    """Make ``cls.name`` raise KeyboardInterrupt on the calls ``when(n)`` selects (before or after running)."""
    original = getattr(cls, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if before and when(calls["n"]):
            raise KeyboardInterrupt
        result = original(*args, **kwargs)
        if not before and when(calls["n"]):
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(cls, name, wrapped)


@pytest.mark.integration
def test_interrupted_overwrite_keeps_the_old_run_then_swaps_at_the_first_commit(old_run, tmp_path, monkeypatch):
    """Defect 2: an interrupted --overwrite left the new config and splits beside the old weights."""
    run = copy_run(old_run, tmp_path / "run")
    before = files_of(run)
    new = tiny(epochs=2, lr=0.01, data_seed=1)
    with monkeypatch.context() as m:  # interrupted before the new run's first checkpoint
        _interrupt_on(m, Trainer, "_save", lambda n: n == 1)
        with pytest.raises(KeyboardInterrupt):
            train_run(new, run, overwrite=True)
    assert files_of(run) == before and not staging_path(run).exists()
    report = evaluate_run(run, progress=False, policies=None)  # the old run is complete and evaluable
    assert report["dataset"]["seed"] == old_run[1].data.seed

    run = copy_run(old_run, tmp_path / "run2")
    with monkeypatch.context() as m:  # interrupted right after the swap: the new run, resumable
        _interrupt_on(m, StagedOverwrite, "swap", lambda n: True, before=False)
        with pytest.raises(KeyboardInterrupt):
            train_run(new, run, overwrite=True)
    assert assert_consistent_new_run(run, new) == 1 and metrics_epochs(run) == [1]
    with pytest.raises(ConfigError, match="has no model.safetensors: its training was interrupted"):
        evaluate_run(run, progress=False, policies=None)
    train_run(new, run)  # the plain command resumes the new run
    assert assert_consistent_new_run(run, new) == 2 and metrics_epochs(run) == [1, 2]


@pytest.mark.integration
def test_resume_checks_the_whole_train_and_data_config(old_run, tmp_path):
    """Resume compared only the model spec: a checkpoint of another config was continued silently."""
    run = copy_run(old_run, tmp_path / "run")
    (run / "model.safetensors").unlink()  # an unfinished run ...
    mixed = tiny(epochs=1, lr=0.01, data_seed=1)
    save_config(mixed, run / "config.yaml")  # ... whose config.yaml is not the checkpoint's (the old mixed state)
    with pytest.raises(ConfigError, match=r"another config \(train\.lr: 0\.05 -> 0\.01.*data\.seed: 0 -> 1"):
        train_run(mixed, run)

    config = TrainConfig(epochs=1, batch_size=256, device="cpu", progress=False)
    from adaptnn import create_model
    from adaptnn.data import DataConfig, build_datasets

    splits = build_datasets(DataConfig(name="digits", val_size=100, augment=False))
    Trainer(create_model("mecnn_digits", widths=[4, 4, 4, 4]), splits.train, config, tmp_path / "t").fit()
    other = TrainConfig(**{**config.__dict__, "weight_decay": 0.0, "progress": True})  # progress: cosmetic
    trainer = Trainer(create_model("mecnn_digits", widths=[4, 4, 4, 4]), splits.train, other, tmp_path / "t")
    with pytest.raises(ConfigError, match=r"train\.weight_decay: 0\.0005 -> 0\.0\)"):
        trainer.fit(resume=True)
    with pytest.raises(CheckpointError, match="was saved for model"):
        Trainer(create_model("mecnn_digits", widths=[4, 4, 4, 8]), splits.train, config, tmp_path / "t").fit()


@pytest.mark.integration
def test_metrics_hold_one_line_per_committed_epoch_after_crashes(tmp_path, monkeypatch):
    """Defect 7: the metrics line was written before the checkpoint, so a crash between them duplicated it."""
    from adaptnn import create_model
    from adaptnn.data import DataConfig, build_datasets

    splits = build_datasets(DataConfig(name="digits", val_size=100, augment=False))
    config = TrainConfig(epochs=3, batch_size=256, device="cpu", progress=False)

    def trainer() -> Trainer:
        return Trainer(create_model("mecnn_digits", widths=[4, 4, 4, 4]), splits.train, config, tmp_path)

    with monkeypatch.context() as m:  # killed between epoch 2's commit and its line
        _interrupt_on(m, Trainer, "_log_record", lambda n: n == 2)
        with pytest.raises(KeyboardInterrupt):
            trainer().fit()
    assert metrics_epochs(tmp_path) == [1]
    assert [h["epoch"] for h in trainer().fit()] == [3]
    assert metrics_epochs(tmp_path) == [1, 2, 3]

    # a log written by the old order (line, then killed before the commit) with a repeated line and a torn one
    with monkeypatch.context() as m:
        _interrupt_on(m, Trainer, "_save", lambda n: n == 3)  # epochs 1-2 committed
        with pytest.raises(KeyboardInterrupt):
            trainer().fit(resume=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    uncommitted = json.dumps({"epoch": 3, "train_loss": -1.0})
    (tmp_path / "metrics.jsonl").write_text("\n".join([*lines, lines[1], uncommitted, '{"epoch": 4, "tra']) + "\n")
    assert [h["epoch"] for h in trainer().fit()] == [3]
    assert metrics_epochs(tmp_path) == [1, 2, 3]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[2])["train_loss"] > 0


@pytest.mark.integration
def test_last_json_is_never_behind_its_checkpoint(tmp_path, monkeypatch):
    """Defect 7: last.json was written after the .safetensors and could describe the previous checkpoint."""
    from adaptnn import create_model
    from adaptnn.data import DataConfig, build_datasets
    from adaptnn.training import trainer as trainer_module

    splits = build_datasets(DataConfig(name="digits", val_size=100, augment=False))
    config = TrainConfig(epochs=2, batch_size=256, device="cpu", progress=False)
    original = trainer_module.save_checkpoint
    calls = {"n": 0}

    def killed_in_the_second_commit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # after the readable copy, before the weights' rename
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", killed_in_the_second_commit)
    with pytest.raises(KeyboardInterrupt):
        Trainer(create_model("mecnn_digits", widths=[4, 4, 4, 4]), splits.train, config, tmp_path).fit()
    ckpt = tmp_path / "checkpoints" / "last.safetensors"
    assert load_checkpoint(ckpt).meta["epoch"] == 0
    assert json.loads(ckpt.with_suffix(".json").read_text())["epoch"] == 1  # ahead, never behind
    monkeypatch.setattr(trainer_module, "save_checkpoint", original)
    model = create_model("mecnn_digits", widths=[4, 4, 4, 4])
    trainer = Trainer(model, splits.train, TrainConfig(**{**config.__dict__, "epochs": 2}), tmp_path)
    trainer.fit()
    assert json.loads(ckpt.with_suffix(".json").read_text()) == load_checkpoint(ckpt).meta


@pytest.mark.integration
def test_writers_sweep_what_killed_writers_left(old_run, tmp_path):
    run = copy_run(old_run, tmp_path / "run")
    litter = [run / ".calibration.json.x1y2z3w4.tmp", run / "checkpoints" / ".last.json.abcdefgh.tmp"]
    for path in litter:
        path.write_text("half a file")
    staging_path(run).mkdir()
    calibrate_run(run, progress=False)
    assert not any(p.exists() for p in litter) and not staging_path(run).exists()


@pytest.mark.integration
@pytest.mark.parametrize(
    "name, content",
    [("calibration.json", '{"exit_macs": [1, 2'), ("calibration.json", "[]"), ("splits.json", "\x00\x01")],
)
def test_corrupt_files_are_one_line_errors(old_run, tmp_path, capsys, name, content):
    run = copy_run(old_run, tmp_path / "run")
    (run / name).write_text(content)
    assert main(["evaluate", str(run), "--policies", "[]"]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    if name == "calibration.json":
        with pytest.raises(ConfigError, match="adaptnn calibrate"):
            read_calibration(run / name)


def test_corrupt_report_is_a_one_line_error(tmp_path):
    for content in ('{"anytime": [', '{"anytime": "x"}', "null"):
        (tmp_path / "report.json").write_text(content)
        with pytest.raises(ConfigError, match="report.json is not a readable report.*adaptnn evaluate"):
            read_report(tmp_path / "report.json")
    with pytest.raises(ConfigError, match="no report at"):
        read_report(tmp_path / "missing" / "report.json")
    assert issubclass(RunLockedError, RuntimeError) and issubclass(DataError, ValueError)


@pytest.mark.integration
def test_interrupt_hint_prints_the_command_that_continues(old_run, tmp_path, monkeypatch, capsys):
    """The Ctrl-C hint said "resume with the same command", which restarts an --overwrite run from epoch 1."""
    run = copy_run(old_run, tmp_path / "run")
    new = tmp_path / "new.yaml"
    save_config(tiny(epochs=2, lr=0.01), new)
    argv = ["train", "--config", str(new), "--run_dir", str(run), "--overwrite"]
    with monkeypatch.context() as m:
        _interrupt_on(m, Trainer, "_save", lambda n: n == 1)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "still holds the previous run, unchanged" in err and "--overwrite" in err
    with monkeypatch.context() as m:
        _interrupt_on(m, StagedOverwrite, "swap", lambda n: True, before=False)
        assert main(argv) == 130
    err = capsys.readouterr().err
    resume = err.split("resume with: ")[1].strip()
    assert resume == f"adaptnn train --config {new} --run_dir {run}"
    assert main(resume.split()[1:]) == 0  # it continues the new run from epoch 2
    assert metrics_epochs(run) == [1, 2]


# ---- the kill -9 loop -----------------------------------------------------------------------------------------
def _launch(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "adaptnn.cli", "--log_level", "WARNING", *argv],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every 2 ms); False if it had exited before."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.002)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


def _changed_file(name: str, old: bytes) -> Callable[[Path], bool]:
    """``ready(run)``: ``run/name`` exists with other bytes than ``old``."""

    def ready(run: Path) -> bool:
        try:
            return (run / name).read_bytes() != old
        except OSError:
            return False

    return ready


@pytest.mark.integration
def test_kill_9_leaves_the_old_run_or_the_new_run_never_a_mix(old_run, tmp_path):
    """`train --overwrite`, `train` and `calibrate` killed with SIGKILL at several points (found by polling files)."""
    old_dir, old_config = old_run
    old_files = files_of(old_dir)
    new = tiny(epochs=3, lr=0.01, data_seed=1)
    new_yaml = tmp_path / "new.yaml"
    save_config(new, new_yaml)
    seen: list[str] = []

    def check(run: Path) -> str:
        if (run / "config.yaml").exists() and load_config(run / "config.yaml").to_dict() == old_config.to_dict():
            assert files_of(run) == old_files  # nothing of the new run leaked into the old one
            return "old"
        return f"new@{assert_consistent_new_run(run, new)}" if (run / "config.yaml").exists() else "empty"

    # train --overwrite over a finished, calibrated run
    overwrite_points = [
        ("staging", lambda run: staging_path(run).exists()),  # building the new run beside the old one
        ("staged-commit", lambda run: (staging_path(run) / "checkpoints" / "last.json").exists()),  # around the swap
        ("swapped", _changed_file("config.yaml", old_files["config.yaml"])),  # the new run in place, epoch 1
        ("final", _changed_file("model.json", old_files["model.json"])),  # between model.json and its weights
    ]
    for i, (label, ready) in enumerate(overwrite_points):
        run = copy_run(old_run, tmp_path / f"overwrite{i}")
        proc = _launch("train", "--config", str(new_yaml), "--run_dir", str(run), "--overwrite")
        _kill_when(proc, lambda run=run, ready=ready: _safe(ready, run))
        state = check(run)
        seen.append(f"overwrite/{label}:{state}")
        if state == "old":  # the next writer removes the abandoned staging directory; the old run still works
            calibrate_run(run, progress=False)
            assert not staging_path(run).exists()
        else:  # the plain command finishes the new run: one metrics line per epoch
            train_run(new, run)
            assert assert_consistent_new_run(run, new) == 3 and metrics_epochs(run) == [1, 2, 3]
        assert not list(run.rglob(".*.tmp"))

    # a fresh train, killed mid-training, then resumed
    run = tmp_path / "fresh"
    proc = _launch("train", "--config", str(new_yaml), "--run_dir", str(run))
    _kill_when(proc, lambda: _safe(lambda r: len(metrics_epochs(r)) >= 1, run))
    seen.append(f"train:{check(run)}")
    train_run(new, run)
    assert assert_consistent_new_run(run, new) == 3 and metrics_epochs(run) == [1, 2, 3]

    # calibrate, killed around its atomic write: the old calibration or the new one, whole
    run = copy_run(old_run, tmp_path / "calibrate")
    proc = _launch("calibrate", str(run), "--tolerance", "0.3")
    written = _changed_file("calibration.json", old_files["calibration.json"])
    _kill_when(proc, lambda: bool(list(run.glob(".calibration.json.*"))) or written(run))
    now = files_of(run)
    assert {k: v for k, v in now.items() if k != "calibration.json"} == {
        k: v for k, v in old_files.items() if k != "calibration.json"
    }
    if now["calibration.json"] == old_files["calibration.json"]:
        seen.append("calibrate:old")
    else:
        assert read_calibration(run / "calibration.json")["tolerance"] == 0.3
        seen.append("calibrate:new")
    calibrate_run(run, progress=False)  # sweeps what the killed writer left
    assert not list(run.rglob(".*.tmp"))
    print("kill points hit:", seen)
    assert any(s.endswith(":old") for s in seen) and any(":new@" in s for s in seen)


def _safe(ready: Callable[[Path], bool], run: Path) -> bool:
    try:
        return ready(run)
    except (OSError, ValueError):  # a file read while it was being replaced
        return False
