"""ONNX export, ``stages`` mode: one ONNX file per stage plus ``manifest.json``.

Stage ``k`` maps the state carried from exit ``k-1`` (the input for ``k = 0``) to the next carried state, the
prediction of exit ``k`` and the policy's score at that exit (``state -> state', logits, score``; the last stage
returns only logits and score). Score, prediction and policy state come from the policy's own ``step``, so
thresholds mean exactly what they mean in :meth:`~adaptnn.runtime.StagedModel.run_dynamic`. After stage 0 the
carried state is ``(model state, policy state)``: stateful rules (patience's counter, the ensembles' running
combination, the learned rule's features) travel as tensors and are compacted with the model's state; for the
stateless rules (confidence, entropy, margin) the policy state is ``None`` (no tensor).

Before anything is written the export is verified against ``run_dynamic`` with onnxruntime (see
:func:`verify_export`); files go to a temporary directory moved into place only once verified.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..policies import PatiencePolicy, ThresholdPolicy
from ..runtime.cost import exit_macs
from ..runtime.staged import StagedModel
from ..version import __version__
from .manifest import FORMAT, FORMAT_VERSION, flatten_state, rebuild_state, state_tree, write_manifest

__all__ = [
    "export_stages",
    "verify_export",
    "check_exportable_policy",
    "policy_label",
    "ExportMismatchError",
    "DEFAULT_OPSET",
]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
#: exits whose score lies this close to a threshold may round either way (fp32, another runtime)
SCORE_BAND = 1e-5
#: largest accepted difference between onnxruntime and PyTorch logits (fp32)
LOGITS_ATOL = 1e-4
#: relative part of the logits tolerance (fp32 sums over many terms drift with the size of the result)
LOGITS_RTOL = 1e-4


class ExportMismatchError(ConfigError):
    """The exported files do not reproduce ``run_dynamic``; nothing was written."""


def policy_label(policy: object) -> str:
    """``ClassName ('registry name')``: how errors name a policy."""
    return f"{type(policy).__name__} ({getattr(policy, 'name', '') or type(policy).__name__!r})"


def check_exportable_policy(policy: object) -> ThresholdPolicy:
    """Return ``policy`` if export can carry it; otherwise a :class:`ConfigError` naming it.

    Every threshold rule exports (its ``step`` is traced; its state, built from the exits, travels as tensors)
    as long as it starts without state (``init_state`` returns ``None``, as for every shipped rule).
    """
    if not isinstance(policy, ThresholdPolicy):
        raise ConfigError(
            f"export needs a threshold rule (ThresholdPolicy: confidence, entropy, margin, patience, average, "
            f"boosted, learned), got {type(policy).__name__}"
        )
    if policy.init_state(1, torch.device("cpu")) is not None:
        raise ConfigError(
            f"policy {policy_label(policy)} starts with a per-sample state (init_state is not None); export carries "
            "the state a rule builds from the exits, not an initial one"
        )
    return policy


def policy_modules(policy: ThresholdPolicy) -> nn.ModuleList:
    """The policy's own networks (e.g. the learned rule's MLP), to register on an exported module."""
    return nn.ModuleList(v for v in vars(policy).values() if isinstance(v, nn.Module))


def exact_scores(policy: ThresholdPolicy) -> bool:
    """Whether the rule's scores are exact counts (patience), so no sample may round across a threshold."""
    return isinstance(policy, PatiencePolicy)


class _Stage(nn.Module):
    """Stage ``k`` of a staged model as one module over flat tensors: ``(*state) -> (*state', logits, score)``."""

    def __init__(
        self, model: StagedModel, policy: ThresholdPolicy, k: int, tree_in: dict[str, Any], last: bool
    ) -> None:
        super().__init__()
        self.segments = nn.ModuleList([model.segments[j] for j in model.stages[k]])
        self.head = model.heads[k]
        self.policy = policy
        self.policy_modules = policy_modules(policy)
        self.k = k
        self.tree_in = tree_in
        self.last = last

    def carry(self, carried: Any) -> tuple[Any, Tensor, Tensor]:
        """``((state', policy state'), prediction, score)`` from the carried ``(state, policy state)``."""
        state, policy_state = (carried, None) if self.k == 0 else carried
        for segment in self.segments:
            state = segment(state)
        score, prediction, policy_state = self.policy.step(self.k, self.head(state), policy_state)
        return (state, policy_state), prediction, score

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        carried, prediction, score = self.carry(rebuild_state(self.tree_in, list(tensors)))
        rest = [] if self.last else flatten_state(carried)
        return (*rest, prediction, score.float())


def _onnx_dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _translations() -> dict[Any, Any]:
    """Extra ONNX translations for the dynamo exporter: ``aten.sort.stable`` (EViT's and DynamicViT's token
    ranking) as TopK over the whole axis, which breaks ties by the lower index (the ONNX spec), i.e. a stable sort."""
    try:
        from onnxscript.function_libs.torch_lib.ops.core import aten_sort
    except ImportError:  # another onnxscript layout: stable sorts then fall back to the TorchScript exporter
        return {}
    return {torch.ops.aten.sort.stable: aten_sort}


def _export_one(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    path: Path,
    in_names: list[str],
    out_names: list[str],
    opset: int,
    exporter: str,
    seq_in: list[list[int]],
    seq_out: list[list[int]],
) -> str:
    """Export ``module`` to ``path``; returns the exporter used (dynamo or torchscript).

    Dim 0 of every input and output is the batch; ``seq_in[i]`` / ``seq_out[i]`` list the dims of state tensor
    ``i`` that follow the input's one variable-size dim (e.g. the tokens), dynamic too.
    """
    errors: list[str] = []
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ConfigError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    try:
        if exporter == "torchscript":
            raise RuntimeError("not requested")
        batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim.DYNAMIC
        shapes = (tuple({0: batch, **dict.fromkeys(dims, seq)} for dims in seq_in),)  # one entry: *tensors
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                input_names=in_names,
                output_names=out_names,
                dynamic_shapes=shapes,
                opset_version=opset,
                optimize=True,
                verbose=False,
                report=False,
                custom_translation_table=_translations(),
            )
        program.save(str(path))
        return "dynamo"
    except Exception as err:  # noqa: BLE001 - any exporter failure falls back to the TorchScript exporter
        errors.append(f"dynamo: {' '.join(str(err).split())[:300]}")
        if exporter == "dynamo":
            raise ConfigError(f"ONNX export of {path.stem} failed ({errors[-1]})") from None
        if exporter == "auto":
            logger.info("dynamo export of %s failed, trying the TorchScript exporter: %s", path.name, errors[-1])
    try:
        dims = [*seq_in, *seq_out, [], []]  # logits and score: batch only
        axes = {
            name: {0: "batch", **dict.fromkeys(d, "seq")} for name, d in zip([*in_names, *out_names], dims, strict=True)
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                inputs,
                str(path),
                dynamo=False,
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=axes,
                opset_version=opset,
            )
        return "torchscript"
    except Exception as err:  # noqa: BLE001
        errors.append(f"torchscript: {' '.join(str(err).split())[:300]}")
    raise ConfigError(f"ONNX export of {path.stem} failed with both exporters ({'; '.join(errors)})")


def _variable_dim(model: StagedModel, example: Tensor) -> int | None:
    """The batch dim of the input's one variable-size dim (``None`` in the input spec), if exactly one."""
    spec = model.input_spec
    free = [] if spec is None else [i + 1 for i, n in enumerate(spec.shape) if n is None]
    return free[0] if len(free) == 1 and example.dim() == len(spec.shape) + 1 else None


def _longer(model: StagedModel, example: Tensor) -> Tensor | None:
    """The example one longer along its variable-size dim (last slice repeated), to find the state dims that follow."""
    dim = _variable_dim(model, example)
    if dim is None:
        return None
    return torch.cat([example, example.narrow(dim, example.shape[dim] - 1, 1)], dim=dim)


def _varying(tensors: list[Tensor], probes: list[Tensor]) -> list[list[int]]:
    """Per tensor, the non-batch dims whose size differs in the longer probe."""
    return [[j for j in range(1, t.dim()) if t.shape[j] != p.shape[j]] for t, p in zip(tensors, probes, strict=True)]


def _macs_by_length(model: StagedModel, example: Tensor, dynamic: list[int]) -> dict[str, Any] | None:
    """With a variable-size input dim ``L``: per exit ``[c0, c1, c2]`` with ``MACs(L) = c0 + c1 L + c2 L^2``.

    Fitted exactly on three lengths (MACs of convolutions, linear layers and attention are polynomials of degree
    at most 2 in the sequence length); ``None`` without a variable dim.
    """
    if not dynamic:
        return None
    dim = dynamic[0]
    base = example.shape[dim]
    lengths = [base, base + 1, base + 2]
    rows = []
    for n in lengths:
        shape = list(example.shape[1:])
        shape[dim - 1] = n
        rows.append(torch.tensor(exit_macs(model, tuple(shape), dtype=example.dtype), dtype=torch.float64))
    vander = torch.tensor([[1.0, n, n * n] for n in lengths], dtype=torch.float64)
    coeffs = torch.linalg.solve(vander, torch.stack(rows))  # [3, K]
    return {"dim": dim, "coefficients": coeffs.T.tolist()}


def _example_batch(model: StagedModel, example: Tensor) -> Tensor:
    if not isinstance(example, Tensor) or example.dim() < 1 or example.shape[0] < 1:
        raise ConfigError("export needs an example batch: a tensor [B, ...] with B >= 1")
    model.check_input(example)
    if example.shape[0] < 2:  # a batch of 1 would let the exporter specialise the batch dim
        example = torch.cat([example, example])
    return example.detach().cpu()


def export_stages(
    model: StagedModel,
    policy: ThresholdPolicy,
    example: Tensor,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Export ``model`` stage by stage to ONNX in ``out_dir`` with ``manifest.json``; returns ``out_dir``.

    Args:
        model: the staged model; exported in eval mode on the CPU in float32 (a copy when it is not already).
        policy: a threshold rule (:func:`check_exportable_policy`); its thresholds and temperatures go into the
            manifest, its score and prediction into every stage, its state (if any) into the carried state.
        example: an input batch ``[B, ...]`` (e.g. test samples); also the verification batch.
        out_dir: directory to create; an existing non-empty one is refused unless ``overwrite``.
        opset: ONNX opset.
        exporter: ``"auto"`` (``torch.onnx.export(dynamo=True)``, the TorchScript exporter if that fails),
            ``"dynamo"`` or ``"torchscript"``.
        overwrite: replace a non-empty ``out_dir`` (only once the new export is verified).

    Raises:
        ConfigError: unsupported policy, model or state; :class:`ExportMismatchError` when onnxruntime does not
            reproduce ``run_dynamic`` (nothing is written then).
    """
    import onnx

    check_exportable_policy(policy)
    policy.check_num_exits(model.num_exits)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConfigError(f"{out_dir} exists and is not empty; choose another --out or remove it")
    if model.training or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).eval().cpu().float()  # the caller's model stays as it is
    example = _example_batch(model, example)
    num_exits = model.num_exits
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        stages: list[dict[str, Any]] = []
        exporters: set[str] = set()
        state: Any = example
        longer = _longer(model, example)
        probe: Any = example if longer is None else longer
        with torch.no_grad():
            for k in range(num_exits):
                last = k == num_exits - 1
                tree_in, tensors_in = state_tree(state)
                stage = _Stage(model, policy, k, tree_in, last).eval()
                nxt = stage.carry(state)[0]
                probe_nxt = nxt if longer is None else stage.carry(probe)[0]
                tree_out, tensors_out = (None, []) if last else state_tree(nxt)
                seq_in = _varying(tensors_in, flatten_state(probe))
                seq_out = [] if last else _varying(tensors_out, flatten_state(probe_nxt))
                in_names = ["input"] if k == 0 else [f"state_in_{i}" for i in range(len(tensors_in))]
                out_names = [f"state_out_{i}" for i in range(len(tensors_out))] + ["logits", "score"]
                file = f"stage_{k}.onnx"
                try:
                    used = _export_one(
                        stage, tuple(tensors_in), tmp / file, in_names, out_names, opset, exporter, seq_in, seq_out
                    )
                except ConfigError as err:
                    raise ConfigError(f"{err} (policy {policy_label(policy)})") from None
                exporters.add(used)
                onnx.checker.check_model(str(tmp / file))
                stages.append(
                    {
                        "file": file,
                        "exit": k,
                        "segments": list(model.stages[k]),
                        "inputs": in_names,
                        "outputs": out_names,
                        "num_state_in": len(tensors_in),
                        "num_state_out": len(tensors_out),
                        "state_in": tree_in,
                        "state_out": tree_out,
                        "state_in_dtypes": [_onnx_dtype_name(t) for t in tensors_in],
                        "state_in_dynamic_dims": [[0, *d] for d in seq_in],
                    }
                )
                state, probe = nxt, probe_nxt
        manifest = _manifest(model, policy, example, stages, sorted(exporters), opset)
        write_manifest(tmp, manifest)
        verify_export(tmp, model, policy, example, longer)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _manifest(
    model: StagedModel,
    policy: ThresholdPolicy,
    example: Tensor,
    stages: list[dict[str, Any]],
    exporters: list[str],
    opset: int,
) -> dict[str, Any]:
    import onnx
    import onnxruntime

    num_exits = model.num_exits
    thresholds = [policy.threshold_at(k) for k in range(num_exits - 1)]
    spec = model.input_spec
    dynamic = [] if _variable_dim(model, example) is None else [_variable_dim(model, example)]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mode": "stages",
        "num_exits": num_exits,
        "num_classes": model.num_classes,
        "exit_macs": [float(m) for m in model.exit_costs(example)],
        "exit_macs_by_length": _macs_by_length(model, example, dynamic),
        "policy": policy.to_dict(),
        "score_name": policy.score_name,
        "thresholds": [t if math.isfinite(t) else None for t in thresholds],
        "temperatures": policy.temperatures,
        "input": {
            "name": "input",
            "dtype": "int64" if not example.is_floating_point() else "float32",
            "shape": [None if i + 1 in dynamic else n for i, n in enumerate(example.shape[1:])],
            "example_shape": list(example.shape[1:]),
            "spec_shape": None if spec is None else list(spec.shape),
            "dynamic_dims": [0, *dynamic],
        },
        "stages": stages,
        "opset": opset,
        "exporter": exporters,
        "versions": {
            "adaptnn": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


def _reference(model: StagedModel, policy: ThresholdPolicy, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``run_dynamic``'s predictions and exits, every exit's scores, and which samples a stateful rule may route
    differently in fp32 elsewhere: a top-2 near-tie of the logits at an exit before the last (its state follows
    the argmax, e.g. patience's counter)."""
    out = model.run_dynamic(x, policy)
    with torch.no_grad():
        outs = model.forward_all(x)
        scores, _ = policy.scores(outs)
        tied = torch.zeros(x.shape[0], dtype=torch.bool)
        if model.num_exits > 1 and policy.step(0, outs[0], None)[2] is not None:
            for logits in outs[:-1]:
                top = logits.float().topk(min(2, logits.shape[-1]), dim=-1).values
                gap = top[:, 0] - top[:, -1]
                tied |= (gap <= LOGITS_ATOL + LOGITS_RTOL * top[:, 0].abs()).cpu() & (top.shape[-1] > 1)
    return out.logits.float(), out.exit_index, scores, tied


def verify_export(
    export_dir: str | Path,
    model: StagedModel,
    policy: ThresholdPolicy,
    example: Tensor,
    longer: Tensor | None = None,
) -> dict[str, Any]:
    """Check the exported stages (run by :class:`StagesRunner`) against ``model.run_dynamic``; see
    :func:`verify_against_dynamic`."""
    from .runner import StagesRunner

    runner = StagesRunner(export_dir)
    return verify_against_dynamic(
        lambda x, thresholds: runner.run(x, thresholds=thresholds), model, policy, example, longer=longer
    )


def verify_against_dynamic(
    run: Callable[[Tensor, Sequence[float]], tuple[np.ndarray, np.ndarray, np.ndarray]],
    model: StagedModel,
    policy: ThresholdPolicy,
    example: Tensor,
    *,
    longer: Tensor | None = None,
    batch_one: bool = False,
) -> dict[str, Any]:
    """Check an exported model, ``run(x, thresholds) -> (logits, exit_index, macs)``, against ``run_dynamic``.

    Cases: the example batch at the policy's thresholds, its first sample alone, everyone leaving at the first
    exit and nobody leaving before the last (``batch_one``: the first samples one by one instead of the batch).
    A sample whose score lies within :data:`SCORE_BAND` of a threshold it faced may exit elsewhere (not for rules
    with exact scores: patience counts), and so may one whose logits nearly tie for the top class under a stateful
    rule (its state follows the argmax); every other sample must take the same exit, with logits within
    ``LOGITS_ATOL + LOGITS_RTOL * |logit|`` (fp32 rounding grows with the logits' size) when the exits agree, and
    the same MACs.

    Raises:
        ExportMismatchError: one line naming the case and the first difference.
    """
    num_exits = model.num_exits
    base = [policy.threshold_at(k) for k in range(num_exits - 1)]
    first = example[:1]
    if batch_one:
        cases: list[tuple[str, Tensor, Sequence[float]]] = [
            (f"sample {i}", example[i : i + 1], base) for i in range(min(8, example.shape[0]))
        ]
    else:
        cases = [("example batch", example, base), ("batch of 1", first, base)]
    cases += [
        ("everyone exits first", first if batch_one else example, [-math.inf] * (num_exits - 1)),
        ("nobody exits early", first if batch_one else example, [math.inf] * (num_exits - 1)),
    ]
    if longer is not None:  # another size along the variable dim (e.g. more tokens)
        cases.append(("longer input", longer, base))
    checked = 0
    for label, x, thresholds in cases:
        ref_policy = policy.with_thresholds(thresholds)
        ref_logits, ref_exit, scores, near = _reference(model, ref_policy, x)
        logits, exit_index, macs = run(x, thresholds)
        logits_t, exit_t = torch.from_numpy(np.asarray(logits)).float(), torch.from_numpy(np.asarray(exit_index))
        if num_exits > 1 and not exact_scores(policy):
            t = torch.tensor([float(v) for v in thresholds], dtype=torch.float64)
            near |= ((scores[:-1].double() - t[:, None]).abs() <= SCORE_BAND).any(dim=0)
        wrong = (exit_t != ref_exit) & ~near
        if wrong.any():
            i = int(wrong.nonzero()[0])
            raise ExportMismatchError(
                f"export verification failed ({label}): sample {i} exits at {int(exit_t[i])} in onnxruntime but "
                f"at {int(ref_exit[i])} in run_dynamic ({int(wrong.sum())} samples differ); nothing was written"
            )
        same = exit_t == ref_exit
        if same.any():
            diff = (logits_t[same] - ref_logits[same]).abs()
            allowed = LOGITS_ATOL + LOGITS_RTOL * ref_logits[same].abs()
            if not bool((diff <= allowed).all()):
                raise ExportMismatchError(
                    f"export verification failed ({label}): logits differ by up to {float(diff.max()):.3g} (allowed "
                    f"{LOGITS_ATOL} + {LOGITS_RTOL} x |logit|) between onnxruntime and run_dynamic; nothing was written"
                )
        expected_macs = model.exit_costs(x).double()[exit_t.long()]
        if not torch.allclose(torch.from_numpy(np.asarray(macs)).double(), expected_macs):
            raise ExportMismatchError(f"export verification failed ({label}): MACs differ from run_dynamic")
        checked += int(same.sum())
    return {"cases": [c[0] for c in cases], "samples_matched": checked}
