"""CPU training keeps freed memory for reuse: no page faults re-fetching every step's activations (glibc)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from adaptnn.training import TrainConfig, Trainer, device

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings"
)

# blocks just under the 4 MiB mmap threshold glibc sets itself after freeing a 4 MiB block: they come from the top
# of the heap, and freeing them leaves more than the trim threshold (2 x 4 MiB) free there, which glibc trims
PROBE = """
import resource, sys, torch
from adaptnn.training.device import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else None)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(1 << 20); del x
counts = []
for _ in range(8):
    before = faults()
    blocks = [torch.ones(950_000) for _ in range(3)]
    del blocks
    counts.append(faults() - before)
print(sum(counts[2:]))
"""


def _faults(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in device.GLIBC_MALLOC_ENV}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=dict(clean, **env), timeout=120).stdout.split()  # fmt: skip
    return out[0], int(out[1])


def test_keep_freed_memory_stops_the_refaulting_of_freed_blocks():
    applied, kept = _faults("keep")
    _, default = _faults("default")
    assert applied == "True"
    assert default > 6 * 2000  # each of the last 6 rounds faults the three 3.6 MiB blocks in again (~2,750 pages)
    assert kept < 100


def test_a_user_malloc_setting_is_left_alone():
    applied, faults = _faults("keep", MALLOC_TRIM_THRESHOLD_="131072")  # glibc's default, set by the user
    assert applied == "False"
    assert faults > 6 * 2000


def test_cpu_training_asks_for_it(tmp_path, monkeypatch):
    import torch

    from adaptnn import create_model
    from adaptnn.data import DataConfig, build_datasets
    from adaptnn.training import trainer

    calls = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(True) or True)
    torch.manual_seed(0)
    splits = build_datasets(DataConfig(name="digits", val_size=200))
    model = create_model("mecnn_digits", widths=[8, 8, 16, 16])
    cfg = TrainConfig(epochs=1, batch_size=512, device="cpu", progress=False)
    Trainer(model, splits.train, cfg, tmp_path / "run").fit()
    assert calls == [True]
