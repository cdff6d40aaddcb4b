"""Hostile or malformed input gets one line (what was received, what was expected): never a traceback or a hang.

Covers the safe YAML reader (:mod:`adaptnn.io.yamlfile`) everywhere a config is read (``--config``, a run
directory's ``config.yaml``), :meth:`RunConfig.validate` before anything is written, the input checks of
``StagedModel`` and the ``cost`` / ``bench`` / ``profile`` options; plus a bounded Hypothesis fuzz of the
config parser (clear error or success, never another exception).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adaptnn
from adaptnn.cli import build_parser, main
from adaptnn.cli._shared import SAFE_YAML_MODE, check_config_value
from adaptnn.errors import AdaptnnError, ConfigError, InputError
from adaptnn.io.yamlfile import MAX_BYTES, MAX_DEPTH, MAX_NODES, load_yaml_text, read_yaml, require_mapping
from adaptnn.runs.config import CONFIG_EXPECTED, RunConfig, load_config, quickstart_config

#: a "billion laughs" config: 9 anchors nested 9 deep expand to 9**9 (387M) strings; about 500 bytes
BOMB = "model:\n  name: mecnn_digits\n  kwargs:\n    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"    {n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)
SECTIONS = "a mapping of config sections (data, model, train, calibration, eval)"


@pytest.fixture(scope="module", autouse=True)
def _warm_parser() -> None:
    build_parser()  # the first build imports every command (seconds); the timings below are of the checks


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and stderr of ``adaptnn ARGV`` in-process (parse errors exit through SystemExit)."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


def _one_line_error(status: int, err: str, *needles: str) -> None:
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error:" in lines[0] and all(n in lines[0] for n in needles), err


# ---- (5) the alias bomb, everywhere a config is read -----------------------------------------------------------


def test_bomb_is_small_and_refused_by_the_reader(tmp_path):
    assert len(BOMB) < 600
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"anchor/alias \(&a at line 4\)"):
        read_yaml(path)
    with pytest.raises(ConfigError, match="anchor/alias"):
        load_config(path)
    assert time.perf_counter() - start < 0.5


def test_bomb_given_to_train_config_is_refused_before_jsonargparse(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    start = time.perf_counter()
    status, err = _cli(["train", "--config", str(path), "--run_dir", str(tmp_path / "run")], capsys)
    assert time.perf_counter() - start < 1.0
    _one_line_error(status, err, "adaptnn train: error:", str(path), "anchor/alias")
    assert not (tmp_path / "run").exists()


def test_bomb_as_a_config_string_is_refused(tmp_path, capsys):
    status, err = _cli(["train", "--config", "{train: {epochs: &e 3}, eval: {batch_size: *e}}"], capsys)
    _one_line_error(status, err, "--config value", "anchor/alias")


@pytest.mark.parametrize("command", ["evaluate", "calibrate", "bench"])
def test_bomb_in_a_run_directory_config(command, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(BOMB)
    (run / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    start = time.perf_counter()
    status, err = _cli([command, str(run)], capsys)
    assert time.perf_counter() - start < 1.0
    _one_line_error(status, err, "anchor/alias")


def test_jsonargparse_reads_yaml_through_the_guarded_mode(tmp_path, capsys):
    """Group files (``--model FILE``) and dict flags are YAML that jsonargparse parses: the mode guards them."""
    parser = build_parser()
    assert parser.parser_mode == SAFE_YAML_MODE  # cli.build_parser passes parser_mode=SAFE_YAML_MODE
    path = tmp_path / "model.yaml"
    path.write_text("name: mecnn_digits\nkwargs: {a: &a [1, 2], b: *a}\n")
    start = time.perf_counter()
    status, err = _cli(["train", "--model", str(path), "--run_dir", str(tmp_path / "run")], capsys)
    assert status == 2 and "anchor/alias" in err and "Traceback" not in err
    status, err = _cli(["cost", "mecnn_digits", "--kwargs", "{a: &a [1], b: *a}"], capsys)
    assert status == 2 and "Traceback" not in err
    assert time.perf_counter() - start < 2.0
    assert not (tmp_path / "run").exists()


# ---- the reader's other limits ----------------------------------------------------------------------------------


def test_empty_config_file_names_what_is_expected(tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match=re.escape(f"is empty; expected {SECTIONS}")):
        load_config(path)
    status, err = _cli(["train", "--config", str(path)], capsys)
    _one_line_error(status, err, f"{path} is empty; expected {SECTIONS}")


@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n- b\n", "holds a list"),
        ("train: {epochs: 3\n", "is not valid YAML"),
        ("train: !!python/object/apply:os.system [echo]\n", "could not determine a constructor"),
        ("model: {kwargs: {b: !!binary aGk=}}\n", "model.kwargs.b holds a bytes"),
        ("model: {kwargs: {1: 2}}\n", "keys must be text"),
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nested more than"),
        ("x: [" + "1, " * MAX_NODES + "1]\n", f"more than {MAX_NODES} values"),
        ("x: " + "9" * 5000 + "\n", "cannot be read as YAML"),
    ],
)
def test_malformed_yaml_is_one_clear_line(text, message, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        check_config_value(str(path))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_missing_config_path_is_named(tmp_path, capsys):
    status, err = _cli(["train", "--config", str(tmp_path / "typo.yaml")], capsys)
    _one_line_error(status, err, f"no config file at {tmp_path / 'typo.yaml'}")


def test_size_limit_and_non_regular_files(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_BYTES + "\n")
    with pytest.raises(ConfigError, match="limit is 1024 KiB"):
        read_yaml(big)
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        load_yaml_text("#" * (MAX_BYTES + 1))
    with pytest.raises(ConfigError, match="not a regular file"):
        read_yaml(tmp_path)
    with pytest.raises(ConfigError, match="not UTF-8"):
        (tmp_path / "latin.yaml").write_bytes(b"name: caf\xe9\n")
        read_yaml(tmp_path / "latin.yaml")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX-only")
def test_a_fifo_config_does_not_block(tmp_path):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)


def test_no_code_runs_from_yaml_tags(tmp_path):
    sentinel = tmp_path / "pwned"
    payload = f"train: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{sentinel}']]\n"
    with pytest.raises(ConfigError):
        load_yaml_text(payload)
    assert not sentinel.exists()


def test_plain_configs_still_read_as_before():
    assert load_yaml_text("lr: 1e-3\nd: 2020-01-01\nx: .inf\nn: 0x10\n") == {
        "lr": 0.001,
        "d": "2020-01-01",
        "x": float("inf"),
        "n": 16,
    }
    text = (Path(adaptnn.__file__).parent / "configs" / "quickstart.yaml").read_text()
    assert "&" not in text and "*" not in text  # the shipped config uses no anchors/aliases
    assert quickstart_config().train.epochs == 40


# ---- (7) the whole config is validated before anything is written or trained ------------------------------------


@pytest.mark.parametrize(
    "section, message",
    [
        ({"train": {"momentum": -1}}, "train.momentum must be in [0, 1), got -1"),
        ({"train": {"epochs": "ten"}}, "train.epochs must be an integer, got 'ten' (str)"),
        ({"train": {"lr": float("nan")}}, "train.lr must be finite"),
        ({"train": {"progress": "yes"}}, "train.progress must be true or false"),
        ({"train": {"exit_weights": [1, -1]}}, "train.exit_weights[1] must be >= 0"),
        ({"train": {"device": "gpu:x"}}, "train.device must be 'auto', 'cpu' or 'cuda[:i]'"),
        ({"train": {"strategy": "boost", "strategy_options": {"r": "half"}}}, "strategy 'boost'"),
        ({"calibration": {"tolerance": 1.5}}, "calibration.tolerance must be in [0, 1), got 1.5"),
        ({"calibration": {"p_values": [0.5, -1]}}, "calibration.p_values[1] must be > 0"),
        ({"calibration": {"p_values": "all"}}, "calibration.p_values must be null or a non-empty list"),
        ({"eval": {"batch_size": 0}}, "eval.batch_size must be >= 1, got 0"),
        ({"model": {"name": "mecnn_digitz"}}, "did you mean mecnn_digits"),
        ({"model": {"name": "efficientnet_lite0", "kwargs": {"colour": 1}}}, "does not take argument(s) ['colour']"),
        ({"data": {"augment": "no"}}, "data.augment must be true or false"),
    ],
)
def test_run_config_validate_names_field_value_and_expectation(section, message):
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_dict(section).validate()
    assert message in str(exc.value)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("train: {momentum: -1}\n", "train.momentum must be in [0, 1)"),
        ("calibration: {tolerance: 2}\n", "calibration.tolerance must be in [0, 1)"),
        ("calibration: {p_values: [0]}\n", "calibration.p_values[0] must be > 0"),
    ],
)
def test_invalid_config_fails_before_the_run_directory_is_written(yaml_text, message, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text)
    run = tmp_path / "run"
    status, err = _cli(["train", "--config", str(cfg), "--run_dir", str(run)], capsys)
    _one_line_error(status, err, message)
    assert not run.exists()


def test_train_run_validates_before_writing(tmp_path):
    from adaptnn.runs import train_run

    config = quickstart_config()
    config.train.epochs = 1  # keeps this test short should validation ever come after training again
    config.calibration.tolerance = 5.0  # an override after loading, as `adaptnn quickstart --tolerance` does
    with pytest.raises(ConfigError, match="calibration.tolerance"):
        train_run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_run_directory_config_with_bad_values_names_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train: {batch_size: -3}\n")
    with pytest.raises(ConfigError, match=rf"{path}: train.batch_size must be >= 1, got -3"):
        load_config(path)


def test_tolerance_beside_budget_macs_is_refused(tmp_path, capsys):
    status, err = _cli(["calibrate", str(tmp_path / "run"), "--tolerance", "0.1", "--budget_macs", "1e5"], capsys)
    _one_line_error(status, err, "tolerance", "budget_macs")


# ---- (7) tensors and policies given to a StagedModel --------------------------------------------------------------


def test_float_dtype_mismatch_is_one_input_error():
    model = adaptnn.create_model("mecnn_digits").eval()
    x = torch.randn(3, 1, 8, 8)
    policy = adaptnn.ConfidencePolicy([0.9, 0.9, 0.9])
    for call in (lambda t: model(t), lambda t: model.forward_all(t), lambda t: model.run_dynamic(t, policy)):
        with pytest.raises(InputError, match=r"input dtype torch.float64 does not match the model's parameters "):
            call(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside: a float32 batch is fine
        assert model(x).shape == (3, 10)
    model.double()  # the check follows the model's own conversions
    assert model.run_dynamic(x.double(), policy).logits.dtype == torch.float64
    with pytest.raises(InputError, match="torch.float32 does not match the model's parameters \\(torch.float64\\)"):
        model(x)


def test_run_dynamic_refuses_a_non_policy():
    model = adaptnn.create_model("mecnn_digits").eval()
    with pytest.raises(ConfigError, match="policy must be an ExitPolicy .* got str;"):
        model.run_dynamic(torch.randn(2, 1, 8, 8), "confidence")  # type: ignore[arg-type]


# ---- (7) cost / bench / profile options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["cost", "timm:test_vit", "--input_size", "[3, 4, 4]"], "cannot run on one sample of shape [3, 4, 4]"),
        (["cost", "mecnn_digits", "--input_size", "[2, 8, 8]"], "(it expects [1, 8, 8])"),
        (["cost", "mecnn_digits", "--input_size", "[1, 0, 8]"], "--input_size must hold positive sizes"),
        (["cost", "mecnn_digits", "--kwargs", "{{head_dropout: 2}}"], "could not be built with arguments"),
        (["bench", "mecnn_digits", "--batch_sizes", "[0]"], "batch_sizes must hold batch sizes >= 1, got [0]"),
        (["bench", "mecnn_digits", "--batch_sizes", "[8, -1]"], "got [8, -1]"),
        (["bench", "mecnn_digits", "--num_samples", "0"], "num_samples must be a positive integer"),
        (["bench", "mecnn_digits", "--budgets", "[0]"], "--budgets must be MACs fractions"),
        (["profile", "mecnn_digits", "--batch_sizes", "[0]"], "batch_sizes must hold batch sizes >= 1"),
        (["bench", "{tmp}/runs/quick_typo"], "no run directory at {tmp}/runs/quick_typo (no such directory)"),
        (["bench", "./quick_typo"], "no run directory at ./quick_typo"),
        (["bench", "{tmp}"], "is not a run directory (no config.yaml or model.safetensors)"),
    ],
)
def test_measurement_options_fail_in_one_line(argv, message, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    status, err = _cli(argv, capsys)
    _one_line_error(status, err, message.format(tmp=tmp_path))


# ---- fuzz: clear error or success, never another exception -----------------------------------------------------

_PIECES = [
    "data", "model", "train", "calibration", "eval", "name", "kwargs", "epochs", "momentum", "tolerance",
    "p_values", "batch_size", "strategy", "strategy_options", ":", ": ", " ", "\n", "\n  ", "  ", "- ", "[", "]",
    "{", "}", ", ", "&x ", "*x", "<<: ", "? ", "!!python/object/apply:os.system ", "!!binary ", "!!set ",
    "!!str ", "1e-3", "-1", "0", "2", ".nan", ".inf", "null", "true", "'", '"', "# c", "|", ">", "---", "...",
    "\t", "0x1F", "9" * 40, "mecnn_digits", "boost", "auto", "\x00", "\u2028", "é",
]  # fmt: skip
_yaml_text = st.lists(st.sampled_from(_PIECES) | st.text(max_size=4), max_size=40).map("".join)


def _check_error(err: AdaptnnError) -> None:
    text = str(err)
    assert text and "\n" not in text, repr(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_yaml_text)
def test_fuzz_yaml_text_through_the_config_parser(text):
    try:
        data = require_mapping(load_yaml_text(text, "fuzz.yaml"), "fuzz.yaml", CONFIG_EXPECTED)
        RunConfig.from_dict(data).validate()
    except AdaptnnError as err:
        _check_error(err)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


def _section(name: str) -> st.SearchStrategy[dict]:
    default = getattr(RunConfig(), name)
    fields = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
    keys = st.sampled_from([*fields, "bogus"])
    return st.dictionaries(keys, _values | st.sampled_from(list(fields.values())), max_size=4)


_configs = st.fixed_dictionaries(
    {}, optional={name: _section(name) | _values for name in ("data", "model", "train", "calibration", "eval")}
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_configs)
def test_fuzz_nested_dicts_through_from_dict_and_validate(data):
    try:
        RunConfig.from_dict(data).validate()
    except AdaptnnError as err:
        _check_error(err)
