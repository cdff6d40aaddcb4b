"""Deep Incubation: meta model interfaces, stage jobs train only their segment, assembly takes their weights as is."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from adaptnn import create_model
from adaptnn.errors import CheckpointError, ConfigError
from adaptnn.io import load_checkpoint, save_checkpoint
from adaptnn.training import TrainConfig
from adaptnn.training.incubation import (
    assemble,
    build_meta_model,
    hybrid_model,
    interface_shapes,
    stage_keys,
    stage_state,
    train_stage,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two on a loaded box


def _target(seed=0):
    torch.manual_seed(seed)
    return create_model("mecnn_cifar", num_classes=3, input_size=[8, 8], widths=[4, 8, 8], strides=[1, 2, 2], depth=2)


def _data(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0].mean(dim=(1, 2)) > 0).long() + (x[:, 1].mean(dim=(1, 2)) > 0))


def test_meta_model_has_the_targets_interfaces_and_is_shallow():
    target = _target()
    meta = build_meta_model(target, (3, 8, 8))
    assert interface_shapes(meta, (3, 8, 8)) == interface_shapes(target, (3, 8, 8)) == [
        (3, 8, 8), (4, 8, 8), (8, 4, 4), (8, 2, 2)
    ]  # fmt: skip
    assert meta.exit_after == target.exit_after
    count = lambda m: sum(p.numel() for p in m.segments.parameters())  # noqa: E731
    assert count(meta) < count(target)
    with pytest.raises(ConfigError, match="tensor or token states"):
        build_meta_model(create_model("msdnet_test_tiny").eval(), (3, 8, 8))  # multi-scale list states


def test_stage_job_trains_only_its_segment_and_assembly_takes_weights_unchanged(tmp_path):
    target = _target()
    meta = build_meta_model(target, (3, 8, 8))
    keys = [stage_keys(target, i) for i in range(3)]
    assert sorted(k for part in keys for k in part) == sorted(target.state_dict())  # a partition of the weights
    meta_before = {k: v.clone() for k, v in meta.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=16, device="cpu", progress=False, lr=0.1)
    paths = []
    for i in range(3):
        job_target = _target()  # every job builds the same target and trains one segment of it
        before = {k: v.clone() for k, v in job_target.state_dict().items()}
        paths.append(
            train_stage(meta, job_target, i, _data(), cfg, tmp_path / f"run{i}", tmp_path / f"s{i}.safetensors", 1)
        )
        after = job_target.state_dict()
        changed = {k for k in after if not torch.equal(after[k], before[k])}
        assert changed and changed <= set(keys[i]), (i, changed - set(keys[i]))
    for k, v in meta.state_dict().items():
        assert torch.equal(v, meta_before[k]), k  # the meta model is frozen inside the hybrids (BN stats too)
    assembled = assemble(_target(seed=5), paths)
    state = assembled.state_dict()
    for path in paths:
        for key, value in load_checkpoint(path).model_state.items():
            assert torch.equal(state[key], value), key
    # the assembled forward is the composition of the jobs' parts
    x = _data().tensors[0][:4]
    assembled.eval()
    parts = []
    for path in paths:
        part = _target(seed=9)
        part.load_state_dict(load_checkpoint(path).model_state, strict=False)
        parts.append(part.eval())
    h = x
    for i in range(3):
        h = parts[i].segments[i](h)
    torch.testing.assert_close(assembled(x), parts[2].heads[2](h), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="also in another"):
        assemble(_target(), paths + [paths[0]])
    save_checkpoint(tmp_path / "partial.safetensors", stage_state(target, 0), {})
    with pytest.raises(CheckpointError):
        assemble(_target(), [tmp_path / "partial.safetensors"])  # missing segments


def test_incubation_on_a_timm_vit(tmp_path):
    torch.manual_seed(0)
    timm_kwargs = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
    vit = create_model(
        "timm_staged", arch="vit_tiny_patch16_224", num_classes=3, exits=1, timm_kwargs=timm_kwargs,
        input_size=[3, 16, 16],
    )  # fmt: skip
    meta = build_meta_model(vit, (3, 16, 16))
    assert (
        interface_shapes(meta, (3, 16, 16)) == interface_shapes(vit, (3, 16, 16)) == [(3, 16, 16), (17, 32), (17, 32)]
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 16, 16, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, 0].mean(dim=(1, 2)) > 0).long())
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=16, device="cpu", progress=False, optimizer="adamw", lr=1e-3)
    path = train_stage(meta, vit, 1, data, cfg, tmp_path / "run", tmp_path / "s1.safetensors", 1)
    changed = {k for k, v in vit.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(stage_keys(vit, 1))
    assert set(load_checkpoint(path).model_state) == set(stage_keys(vit, 1))


def test_hybrid_freezes_the_meta_parts():
    target = _target()
    meta = build_meta_model(target, (3, 8, 8))
    hybrid = hybrid_model(meta, target, 1)
    hybrid.train()
    trainable = {n for n, p in hybrid.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("segments.1.", "heads.1.")) for n in trainable)
    assert not hybrid.segments[0].module.training  # frozen meta parts stay in eval mode
    assert hybrid.segments[1] is target.segments[1]
    with pytest.raises(ConfigError, match="stage index"):
        hybrid_model(meta, target, 3)


def _run_incubate(config: dict, tmp_path) -> None:
    """``adaptnn incubate`` on ``config`` in a child process (run directory ``tmp_path / "d"``); must succeed."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "adaptnn.cli", "incubate", "--config", str(tmp_path / "run.yaml")]
    proc = subprocess.run(
        [*cmd, "--run_dir", str(tmp_path / "d")], env=env, capture_output=True, text=True, timeout=380
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_incubate_command_runs_stage_jobs_as_separate_processes(tmp_path):
    config = {
        "model": {"name": "mecnn_digits", "kwargs": {"widths": [4, 8, 8, 8]}},
        "train": {"epochs": 1, "batch_size": 256, "progress": False, "device": "cpu"},
        "incubate": {"meta_epochs": 1, "stage_epochs": 1, "finetune_epochs": 0, "jobs": 2},
    }
    _run_incubate(config, tmp_path)
    work = tmp_path / "d" / "incubate"
    stages = [load_checkpoint(work / f"stage{i}.safetensors") for i in range(4)]
    pids = {s.meta["pid"] for s in stages}
    assert len(pids) == 4 and os.getpid() not in pids  # four jobs, four processes
    final = load_checkpoint(tmp_path / "d" / "model.safetensors").model_state  # no fine-tuning: the assembly
    for stage in stages:
        for key, value in stage.model_state.items():
            assert torch.equal(final[key], value), key
    assert sum(len(s.model_state) for s in stages) == len(final)


def _vit(seed=0):
    """The native ViT family (TokenState between segments), tiny: 8x8 input, 2x2 + 1 tokens, 3 segments."""
    torch.manual_seed(seed)
    return create_model(
        "vit_tiny_conv_fmnist", num_classes=3, input_size=(8, 8), embed_dim=16, depth=3, num_heads=2, exits=(0, 1)
    )


def _vit_data(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0, :4].mean(dim=(1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0))


def test_meta_model_of_the_native_vit_passes_token_states():
    from adaptnn.layers.tokens import TokenKnob, TokenState, set_token_knob

    target = _vit()
    meta = build_meta_model(target, (1, 8, 8))
    assert interface_shapes(meta, (1, 8, 8)) == interface_shapes(target, (1, 8, 8)) == [(1, 8, 8)] + [(5, 16)] * 3
    assert meta.exit_after == target.exit_after == (0, 1, 2)
    state = meta.segments[0](torch.zeros(2, 1, 8, 8))
    assert isinstance(state, TokenState) and state.prefix == 1 and state.size is None
    count = lambda m: sum(p.numel() for p in m.segments.parameters())  # noqa: E731
    assert count(meta) < count(target)
    assert meta.forward_all(torch.zeros(2, 1, 8, 8))[-1].shape == (2, 3)
    set_token_knob(target, TokenKnob("tome", 1))  # merged tokens carry sizes: not an interface a meta model has
    with pytest.raises(ConfigError, match="token reduction"):
        build_meta_model(target, (1, 8, 8))
    with pytest.raises(ConfigError, match="CascadeState"):
        build_meta_model(create_model("dvt_vit_tiny_conv_fmnist", depth=1, embed_dim=16), (1, 28, 28))


def test_native_vit_stage_jobs_train_their_segment_and_assemble_unchanged(tmp_path):
    target = _vit()
    meta = build_meta_model(target, (1, 8, 8), seed=1)
    keys = [stage_keys(target, i) for i in range(3)]
    assert sorted(k for part in keys for k in part) == sorted(target.state_dict())
    meta_before = {k: v.clone() for k, v in meta.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=16, device="cpu", progress=False, optimizer="adamw", lr=1e-3)
    paths = []
    for i in range(3):
        job_target = _vit()
        before = {k: v.clone() for k, v in job_target.state_dict().items()}
        paths.append(
            train_stage(meta, job_target, i, _vit_data(), cfg, tmp_path / f"r{i}", tmp_path / f"s{i}.safetensors", 1)
        )
        after = job_target.state_dict()
        changed = {k for k in after if not torch.equal(after[k], before[k])}
        assert changed and changed <= set(keys[i]), (i, changed - set(keys[i]))
        assert set(load_checkpoint(paths[-1]).model_state) == set(keys[i])
    for k, v in meta.state_dict().items():
        assert torch.equal(v, meta_before[k]), k
    assembled = assemble(_vit(seed=5), paths).eval()
    state = assembled.state_dict()
    for path in paths:
        for key, value in load_checkpoint(path).model_state.items():
            assert torch.equal(state[key], value), key
    parts = []
    for path in paths:
        part = _vit(seed=9)
        part.load_state_dict(load_checkpoint(path).model_state, strict=False)
        parts.append(part.eval())
    x = _vit_data().tensors[0][:4]
    h, logits = x, []
    with torch.no_grad():
        for i in range(3):
            h = parts[i].segments[i](h)
            logits.append(parts[i].heads[i](h))
        for got, want in zip(assembled.forward_all(x), logits, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_incubate_command_on_the_native_vit(tmp_path):
    kwargs = {"in_chans": 1, "input_size": [8, 8], "embed_dim": 16, "depth": 3, "num_heads": 2, "exits": [0, 1]}
    config = {
        "model": {"name": "vit_tiny_conv_fmnist", "kwargs": kwargs},
        "train": {"epochs": 1, "batch_size": 256, "progress": False, "device": "cpu", "optimizer": "adamw", "lr": 1e-3},
        "incubate": {"meta_epochs": 1, "stage_epochs": 1, "finetune_epochs": 1, "jobs": 2},
    }
    _run_incubate(config, tmp_path)
    work = tmp_path / "d" / "incubate"
    stages = [load_checkpoint(work / f"stage{i}.safetensors") for i in range(3)]
    assert len({s.meta["pid"] for s in stages} | {os.getpid()}) == 4  # three jobs, three other processes
    final = load_checkpoint(tmp_path / "d" / "model.safetensors").model_state
    assert sum(len(s.model_state) for s in stages) == len(final)
    assert any(not torch.equal(final[k], v) for s in stages for k, v in s.model_state.items())  # fine-tuned after
