"""A checkpoint header is data, never a capability: hostile ``.safetensors`` files never run code or read elsewhere.

The header's ``model_spec`` names a registered factory and its kwargs. These tests craft headers that ask for
remote code, local folders, downloads, unknown or import-like factories and ill-typed values, and check that
:func:`adaptnn.models.load_model` (and the run-directory CLI on top of it) answers each with a one-line
:class:`~adaptnn.errors.CheckpointError` while a marker file that the hostile code would write never appears.
The last tests fuzz the header parser and the spec validation with Hypothesis.
"""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_save

import adaptnn  # noqa: F401  (registers the adapters' factories)
from adaptnn.errors import AdaptnnError, CheckpointError
from adaptnn.io import save_checkpoint
from adaptnn.io.checkpoint import FORMAT, MAX_META_DEPTH, load_checkpoint, parse_meta
from adaptnn.models import checkpoint_args, checkpoint_kwargs, create_model, list_models, load_model
from adaptnn.models._registry import NO_OVERRIDE
from test_models_contract import MODEL_KWARGS


def _save_spec(path: Path, spec: Any, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """A checkpoint whose header holds ``spec`` as its ``model_spec`` (weights: a dummy tensor by default)."""
    return save_checkpoint(path, weights or {"w": torch.zeros(1)}, {"model_spec": spec})


def _write_header(path: Path, meta_text: Any, version: str = "1", fmt: str = FORMAT) -> Path:
    """A safetensors file with a raw header (``meta_text`` is written as is, JSON or not)."""
    path.write_bytes(
        safetensors_save({"model.w": torch.zeros(1)}, metadata={"format": fmt, "version": version, "meta": meta_text})
    )
    return path


def _one_line_error(err: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    assert "Traceback" not in message
    return message


@pytest.fixture
def trap(tmp_path: Path) -> tuple[Path, Path]:
    """A folder that looks like a Hugging Face model with custom code, and the marker file that code writes.

    ``config.json`` maps the Auto classes to ``modeling_evil.py`` (``auto_map``), as a Hub repository with
    ``trust_remote_code`` code does; importing that module writes the marker.
    """
    folder, marker = tmp_path / "evil_model", tmp_path / "PWNED"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evilbert",
                "architectures": ["EvilModel"],
                "auto_map": {
                    "AutoConfig": "modeling_evil.EvilConfig",
                    "AutoModel": "modeling_evil.EvilModel",
                    "AutoModelForSequenceClassification": "modeling_evil.EvilModel",
                },
            }
        )
    )
    (folder / "modeling_evil.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('code from a checkpoint ran')\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evilbert'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n"
    )
    (folder / "__init__.py").write_text("from .modeling_evil import *\n")
    return folder, marker


def test_the_trap_is_live(trap: tuple[Path, Path]) -> None:
    """Sanity check of the fixture: executing the folder's code does write the marker."""
    folder, marker = trap
    runpy.run_path(str(folder / "modeling_evil.py"))
    assert marker.exists()


def test_reproduction_remote_code_header_is_refused(tmp_path: Path, trap: tuple[Path, Path]) -> None:
    """The reported attack: hf_staged + a local folder + hf_kwargs.trust_remote_code. No code runs."""
    folder, marker = trap
    spec = {"name": "hf_staged", "kwargs": {"path": str(folder), "hf_kwargs": {"trust_remote_code": True}}}
    path = _save_spec(tmp_path / "model.safetensors", spec)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert "trust_remote_code" in _one_line_error(err)
    assert not marker.exists()
    # without the remote-code switch the folder itself is refused: it is not a packaged model
    path = _save_spec(tmp_path / "m2.safetensors", {"name": "hf_staged", "kwargs": {"path": str(folder)}})
    with pytest.raises(CheckpointError, match="local model folder") as err:
        load_model(path)
    _one_line_error(err)
    assert not marker.exists()


def test_trust_code_allows_the_folder_but_never_runs_its_code_unasked(tmp_path: Path, trap) -> None:
    """``trust_code=True`` lets a header name a local folder; remote code still needs its own switch in the header
    (transformers is told ``trust_remote_code=False`` explicitly, so it neither runs the code nor prompts)."""
    folder, marker = trap
    path = _save_spec(tmp_path / "model.safetensors", {"name": "hf_staged", "kwargs": {"path": str(folder)}})
    with pytest.raises(CheckpointError) as err:
        load_model(path, trust_code=True)
    _one_line_error(err)
    assert not marker.exists()


def test_reproduction_through_the_run_directory_cli(tmp_path: Path, trap, capsys) -> None:
    """``adaptnn evaluate RUN_DIR`` (and ``adaptnn.runs.load_run``) on a run whose weights carry the hostile header."""
    from adaptnn.cli import main
    from adaptnn.runs.config import RunConfig, save_config
    from adaptnn.runs.rundir import load_run

    folder, marker = trap
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(RunConfig(), run_dir / "config.yaml")
    spec = {"name": "hf_staged", "kwargs": {"path": str(folder), "hf_kwargs": {"trust_remote_code": True}}}
    _save_spec(run_dir / "model.safetensors", spec)
    with pytest.raises(CheckpointError) as err:
        load_run(run_dir)
    _one_line_error(err)
    assert main(["evaluate", str(run_dir)]) == 2
    stderr = capsys.readouterr().err.strip()
    assert "trust_remote_code" in stderr and len(stderr.splitlines()) == 1, stderr
    assert not marker.exists()


def _hostile_specs(folder: Path, marker: Path) -> dict[str, Any]:
    """Crafted ``model_spec`` values, by what they try."""
    hf = "hf_staged"
    return {
        # names: only registered factories, never an import path or a callable
        "os.system": {"name": "os.system", "kwargs": {"command": f"touch {marker}"}},
        "builtins.eval": {"name": "builtins.eval", "kwargs": {}},
        "dunder import": {"name": "__import__", "kwargs": {"name": "os"}},
        "dotted registry path": {"name": "adaptnn.models._registry.create_model", "kwargs": {}},
        "path as name": {"name": str(folder / "modeling_evil.py"), "kwargs": {}},
        "empty name": {"name": "", "kwargs": {}},
        "name not a string": {"name": ["mecnn_digits"], "kwargs": {}},
        # paths and hub names
        "hf local folder": {"name": hf, "kwargs": {"path": str(folder)}},
        "hf relative folder": {"name": hf, "kwargs": {"path": "../evil_model"}},
        "hf hub id": {"name": hf, "kwargs": {"path": "attacker/evil-bert"}},
        "hf cache_dir": {"name": hf, "kwargs": {"hf_kwargs": {"cache_dir": str(folder)}}},
        "hf online": {"name": hf, "kwargs": {"hf_kwargs": {"local_files_only": False}}},
        "hf revision": {"name": hf, "kwargs": {"hf_kwargs": {"revision": "main"}}},
        "hf hub kernel": {"name": hf, "kwargs": {"hf_kwargs": {"attn_implementation": "kernels-community/x"}}},
        "timm local-dir": {"name": "timm_staged", "kwargs": {"arch": f"local-dir:{folder}"}},
        "timm hf-hub": {"name": "timm_staged", "kwargs": {"arch": "hf-hub:attacker/evil"}},
        "timm path arch": {"name": "timm_staged", "kwargs": {"arch": str(folder)}},
        "timm checkpoint_path": {"name": "timm_staged", "kwargs": {"timm_kwargs": {"checkpoint_path": str(marker)}}},
        "timm cfg overlay": {
            "name": "timm_staged",
            "kwargs": {"timm_kwargs": {"pretrained_cfg_overlay": {"file": str(folder / "w.pth")}}},
        },
        "tv weights_backbone": {"name": "torchvision_staged", "kwargs": {"tv_kwargs": {"weights_backbone": "X"}}},
        "tv arch path": {"name": "torchvision_staged", "kwargs": {"arch": "../../os"}},
        "undeclared path-like kwarg": {"name": "mecnn_digits", "kwargs": {"checkpoint_path": str(marker)}},
        # remote code, nested and respelt
        "trust_remote_code": {"name": hf, "kwargs": {"hf_kwargs": {"trust_remote_code": True}}},
        "trustRemoteCode": {"name": hf, "kwargs": {"hf_kwargs": {"trustRemoteCode": True}}},
        "trust-remote-code nested": {"name": hf, "kwargs": {"hf_kwargs": {"config": {"trust-remote-code": 1}}}},
        "remote code in a list": {"name": "mecnn_digits", "kwargs": {"widths": [{"TRUST_REMOTE_CODE": "yes"}]}},
        "remote code at top level": {"name": "mecnn_digits", "kwargs": {"trust_remote_code": True}},
        # values of the wrong type (everything JSON can carry)
        "string for ints": {"name": "mecnn_digits", "kwargs": {"widths": "__import__('os')"}},
        "float for int": {"name": "mecnn_digits", "kwargs": {"num_classes": 1.5}},
        "bool for int": {"name": "mecnn_digits", "kwargs": {"num_classes": True}},
        "NaN": {"name": "mecnn_digits", "kwargs": {"head_dropout": math.nan}},
        "infinity": {"name": "mecnn_digits", "kwargs": {"head_dropout": math.inf}},
        "object for list": {"name": "mecnn_digits", "kwargs": {"widths": {"__class__": "os.system"}}},
        "huge int": {"name": "mecnn_digits", "kwargs": {"depth": 10**400}},
        "long list": {"name": "mecnn_digits", "kwargs": {"widths": [4] * 5000}},
        "head option not allowed": {"name": "efficientnet_lite0", "kwargs": {"head_kwargs": {"eval": "1"}}},
        "string is just data": {"name": "msdnet_test_tiny", "kwargs": {"stem": "os.system"}},
        # structure
        "spec is a list": ["hf_staged", {"path": str(folder)}],
        "spec is a string": "os.system",
        "kwargs is a list": {"name": "mecnn_digits", "kwargs": [1, 2]},
        "extra spec key": {"name": "mecnn_digits", "kwargs": {}, "module": "os"},
        # architecture bombs: refused on the meta device before any memory is allocated
        "huge widths": {"name": "mecnn_digits", "kwargs": {"widths": [2**20] * 4, "strides": [1, 1, 2, 2]}},
        "huge msdnet": {"name": "msdnet_test_tiny", "kwargs": {"n_channels": 2**22}},
        "deep bomb": {"name": "mecnn_digits", "kwargs": {"depth": 2**30}},
        "msdnet layout bomb": {"name": "msdnet_test_tiny", "kwargs": {"n_blocks": 2**24, "step": 2**24}},
        "timm depth bomb": {"name": "timm_staged", "kwargs": {"arch": "test_vit", "timm_kwargs": {"depth": 2**30}}},
        "timm input bomb": {"name": "timm_staged", "kwargs": {"arch": "test_resnet", "input_size": [3, 10**5, 10**5]}},
        "hf sequence bomb": {"name": "hf_staged", "kwargs": {"seq_len": 2**30}},
        "hf classifier bomb": {"name": "hf_staged", "kwargs": {"num_classes": 2**28}},
    }


CASES = sorted(_hostile_specs(Path("/x"), Path("/y")))
#: why the size bombs are refused: before any real allocation (bounds, or the meta-device build vs the file)
BOMB_REASONS = {
    "huge widths": "does not match",
    "huge msdnet": "does not match",
    "deep bomb": "far larger than",
    "msdnet layout bomb": "expected numbers in",
    "timm depth bomb": "expected numbers in",
    "timm input bomb": "expected numbers in",
    "hf sequence bomb": "expected numbers in",
    "hf classifier bomb": "expected numbers in",
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_headers_never_run_code(tmp_path: Path, trap: tuple[Path, Path], case: str) -> None:
    folder, marker = trap
    spec = _hostile_specs(folder, marker)[case]
    weights = dict(create_model("mecnn_digits").state_dict()) if spec_name(spec) == "mecnn_digits" else None
    path = _save_spec(tmp_path / "model.safetensors", spec, weights)
    with pytest.raises(AdaptnnError) as err:
        load_model(path)
    assert isinstance(err.value, CheckpointError)
    assert BOMB_REASONS.get(case, "") in _one_line_error(err)
    assert not marker.exists()


def spec_name(spec: Any) -> Any:
    return spec.get("name") if isinstance(spec, dict) else None


def test_download_switches_are_forced_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pretrained``/``weights`` in a header never download or read anything: the weights come from the file."""
    from adaptnn.models import efficientnet_lite

    touched: list[str] = []

    def forbidden(*args: object, **kwargs: object) -> str:
        touched.append("pretrained weights read")
        raise AssertionError("pretrained weights must not be read when loading a checkpoint")

    monkeypatch.setattr(efficientnet_lite, "pretrained_lite0_path", forbidden)
    model = create_model("efficientnet_lite0", pretrained=False, num_classes=3).eval()
    spec = {"name": "efficientnet_lite0", "kwargs": {"pretrained": True, "num_classes": 3}}
    path = save_checkpoint(tmp_path / "lite.safetensors", model, {"model_spec": spec})
    loaded = load_model(path).eval()
    assert loaded.model_spec == spec  # the header's spec, as saved: re-saving round-trips
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not touched

    import torchvision.models._api as tv_api

    monkeypatch.setattr(tv_api.WeightsEnum, "get_state_dict", forbidden)
    tv = create_model("torchvision_staged", arch="resnet18", num_classes=1000, input_size=[3, 32, 32]).eval()
    spec = {"name": "torchvision_staged", "kwargs": {**tv.model_spec["kwargs"], "weights": "IMAGENET1K_V1"}}
    path = save_checkpoint(tmp_path / "tv.safetensors", tv, {"model_spec": spec})
    assert load_model(path).model_spec == spec
    assert not touched
    assert checkpoint_kwargs("timm_staged", {"arch": "resnet18", "pretrained": True})["pretrained"] is False


def test_trust_code_is_the_only_switch_for_capabilities() -> None:
    """What is refused by default passes with ``trust_code=True`` (the user vouches for the file), except forced
    download switches, which stay off."""
    cases = {
        "timm_staged": {"arch": "hf-hub:timm/resnet18.a1_in1k", "timm_kwargs": {"act_layer": "gelu"}},
        "hf_staged": {"path": "/models/bert", "hf_kwargs": {"trust_remote_code": True, "revision": "v1"}},
        "mecnn_digits": {"depth": 3},
        "msdnet_test_tiny": {"n_blocks": 1000},
    }
    for name, kwargs in cases.items():
        if name != "mecnn_digits":
            with pytest.raises(CheckpointError, match="trust_code|expected numbers in"):
                checkpoint_kwargs(name, kwargs)
        built = checkpoint_kwargs(name, kwargs, trust_code=True)
        assert {k: built[k] for k in kwargs} == kwargs
    trusted = checkpoint_kwargs("timm_staged", {"pretrained": True}, trust_code=True)
    assert trusted["pretrained"] is False


def test_every_registered_models_spec_round_trips() -> None:
    """What users build (the registry contract's arguments) passes the checkpoint checks unchanged."""
    for name in list_models():
        variants = MODEL_KWARGS.get(name, {})
        for kwargs in variants if isinstance(variants, list) else [variants]:
            saved = json.loads(json.dumps(kwargs))
            built = checkpoint_kwargs(name, saved)
            overrides = {k for k, a in checkpoint_args(name).items() if a.on_load is not NO_OVERRIDE}
            assert {k: v for k, v in built.items() if k not in overrides} == {
                k: v for k, v in saved.items() if k not in overrides
            }


def test_malformed_headers_are_one_line_errors(tmp_path: Path) -> None:
    cases = {
        "not json": "{not json",
        "a list": "[1, 2]",
        "a number": "3",
        "spec a string": json.dumps({"model_spec": "os.system"}),
        "spec kwargs a list": json.dumps({"model_spec": {"name": "mecnn_digits", "kwargs": [1]}}),
        "deep": "[" * (MAX_META_DEPTH + 5) + "]" * (MAX_META_DEPTH + 5),
        "very deep": "[" * 100_000 + "]" * 100_000,
        "huge int": '{"a": ' + "9" * 10_000 + "}",
    }
    for case, text in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(_write_header(tmp_path / f"{len(case)}.safetensors", text))
        _one_line_error(err)
    for version in ("one", "1e9", "-1", "99"):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(_write_header(tmp_path / "v.safetensors", "{}", version=version))
        _one_line_error(err)
    path = tmp_path / "no_meta.safetensors"
    path.write_bytes(safetensors_save({"model.w": torch.zeros(1)}, metadata={"format": FORMAT, "version": "1"}))
    with pytest.raises(CheckpointError, match="no JSON metadata"):
        load_checkpoint(path)


# --- property-based fuzzing of the header parser and the spec validation -------------------------------------------

_KEYS = st.one_of(
    st.sampled_from(
        sorted({k for name in list_models() for k in checkpoint_args(name)})
        + ["trust_remote_code", "TrustRemoteCode", "path", "cache_dir", "hf_kwargs", "__class__", "os", ""]
    ),
    st.text(max_size=12),
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["all-MiniLM-L6-v2", "resnet18", "stages", "/etc", "local-dir:/tmp", "eager", "float32"]),
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=12,
)
_SPECS = st.one_of(
    _JSON,
    st.fixed_dictionaries(
        {
            "name": st.one_of(st.sampled_from(list_models()), st.text(max_size=20)),
            "kwargs": st.dictionaries(_KEYS, _JSON),
        }
    ),
)
_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(
    text=st.one_of(st.text(max_size=200), _JSON.map(json.dumps), _SPECS.map(lambda s: json.dumps({"model_spec": s})))
)
def test_fuzz_header_parser(text: str) -> None:
    """Arbitrary metadata text: a dict back, or a CheckpointError; never another exception."""
    try:
        meta = parse_meta(text, source="fuzz")
    except CheckpointError as err:
        assert "\n" not in str(err)
        return
    assert isinstance(meta, dict)
    spec = meta.get("model_spec")
    assert spec is None or (isinstance(spec, dict) and isinstance(spec["name"], str))


@_FUZZ
@given(name=st.one_of(st.sampled_from(list_models()), _JSON), kwargs=st.one_of(st.dictionaries(_KEYS, _JSON), _JSON))
def test_fuzz_spec_validation(name: Any, kwargs: Any) -> None:
    """Arbitrary (name, kwargs): checked kwargs back, or an AdaptnnError; an accepted spec holds no capability."""
    try:
        built = checkpoint_kwargs(name, kwargs)
    except AdaptnnError as err:
        assert "\n" not in str(err)
        return
    allowed = checkpoint_args(name)
    assert set(built) <= set(allowed)
    assert "remotecode" not in json.dumps(built).lower().replace("_", "").replace("-", "")
    for key, value in built.items():
        assert not allowed[key].is_capability(value) or allowed[key].keys is not None, (key, value)
        if allowed[key].keys is not None and isinstance(value, dict):
            assert set(value) <= set(allowed[key].keys)


@_FUZZ
@given(meta=st.one_of(st.text(max_size=100), _SPECS.map(lambda s: json.dumps({"model_spec": s}))))
def test_fuzz_checkpoint_files(tmp_path_factory: pytest.TempPathFactory, meta: str) -> None:
    """Whole files with arbitrary headers through load_checkpoint and the spec check of load_model."""
    path = _write_header(tmp_path_factory.mktemp("fuzz") / "m.safetensors", meta)
    try:
        ckpt = load_checkpoint(path)
        spec = ckpt.meta.get("model_spec")
        if isinstance(spec, dict):
            checkpoint_kwargs(spec["name"], spec.get("kwargs", {}))
    except AdaptnnError as err:
        assert "\n" not in str(err)
