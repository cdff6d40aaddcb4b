"""Checkpoints: atomic round trip, and clear errors for truncated, foreign and mismatched files."""

import pytest
import torch
from safetensors.torch import save_file

from adaptnn import CheckpointError, create_model
from adaptnn.io import load_checkpoint, load_weights, pack_tensors, save_checkpoint, unpack_tensors
from adaptnn.models import load_model


def test_round_trip_rebuilds_model(tmp_path):
    model = create_model("mecnn_digits", widths=[8, 8, 16, 16]).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"model_spec": model.model_spec, "note": "x"})
    assert (tmp_path / "m.json").exists()
    loaded = load_model(path).eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.model_spec == model.model_spec
    assert not list(tmp_path.glob("*.tmp"))  # no temp files left behind


def test_pack_unpack_optimizer_state():
    model = create_model("mecnn_digits", widths=[4, 4, 4, 4])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.forward_all(torch.randn(2, 1, 8, 8))[0].sum().backward()
    opt.step()
    tensors = {}
    packed = pack_tensors(opt.state_dict(), "optim", tensors)
    restored = unpack_tensors(packed, tensors)
    assert restored["param_groups"] == opt.state_dict()["param_groups"]
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(restored["state"][k]["momentum_buffer"], v["momentum_buffer"])


def test_truncated_checkpoint(tmp_path):
    model = create_model("mecnn_digits")
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"model_spec": model.model_spec})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_foreign_and_missing_checkpoint(tmp_path):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not an adaptnn checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_mismatched_weights_named(tmp_path):
    small = create_model("mecnn_digits", widths=[8, 8, 16, 16])
    big = create_model("mecnn_digits")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights(big, small.state_dict())
    state = dict(big.state_dict())
    state.pop(next(iter(state)))
    with pytest.raises(CheckpointError, match="missing 1 key"):
        load_weights(big, state)


def test_atomic_writes_get_a_normal_file_mode(tmp_path):
    """mkstemp makes 0600 files; an atomic write gives what open() would (umask) or keeps the replaced file's mode."""
    import os

    from adaptnn.io import atomic_write_text

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.json", "{}")
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "new.json", 0o640)
        atomic_write_text(tmp_path / "new.json", "[]")
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
