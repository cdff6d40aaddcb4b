"""Run a ``stages`` ONNX export with onnxruntime: real early exit with compaction between stages.

:class:`StagesRunner` is what a server (or a test) uses instead of PyTorch: after each stage the samples whose
score reaches the exit's threshold leave with that exit's logits, and only the others (their state tensors
indexed with numpy) run the next stage. Thresholds come from the manifest and can be replaced at run time, so
recalibrating never needs a new export.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError
from .manifest import read_manifest

__all__ = ["StagesRunner"]


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class StagesRunner:
    """onnxruntime CPU sessions over the stages of an export directory.

    The stages run one after the other, so each session runs its nodes sequentially (no inter-op pool) and its
    intra-op threads do not spin after their work: a spinning pool of the stage just finished would compete for
    the cores with the next stage's pool (each onnxruntime session owns one).

    Args:
        export_dir: a directory written by :func:`~adaptnn.export.export_stages`.
        thresholds: ``T_0 .. T_{K-2}`` replacing the manifest's (``None``/``inf`` disables an exit).
        intra_op_threads: onnxruntime's intra-op threads (0: its default).
        spinning: let idle intra-op threads spin (onnxruntime's default; off here, see above).
    """

    def __init__(
        self,
        export_dir: str | Path,
        thresholds: Sequence[float | None] | None = None,
        *,
        intra_op_threads: int = 0,
        spinning: bool = False,
    ) -> None:
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        self.manifest: dict[str, Any] = read_manifest(self.export_dir)
        self.num_exits: int = self.manifest["num_exits"]
        self.exit_macs = np.asarray(self.manifest["exit_macs"], dtype=np.float64)
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.log_severity_level = 3
        self._sessions = []
        for stage in self.manifest["stages"]:
            try:
                session = ort.InferenceSession(str(stage["path"]), options, providers=["CPUExecutionProvider"])
            except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for bad files
                reason = " ".join(str(err).split())[:200]
                raise ConfigError(f"cannot load {stage['path']} with onnxruntime ({reason})") from None
            names = [i.name for i in session.get_inputs()]
            if names != stage["inputs"]:
                raise ConfigError(f"{stage['path']} takes inputs {names}, the manifest says {stage['inputs']}")
            self._sessions.append(session)
        self._input_dtype = np.dtype(self.manifest["input"]["dtype"])
        self._input_shape = list(self.manifest["input"]["shape"])
        self.thresholds = self.manifest["thresholds"] if thresholds is None else thresholds

    @property
    def thresholds(self) -> list[float]:
        """The thresholds in use (``inf`` for disabled exits)."""
        return list(self._thresholds)

    @thresholds.setter
    def thresholds(self, values: Sequence[float | None]) -> None:
        self._thresholds = self._parse(values)

    def _parse(self, values: Sequence[float | None]) -> list[float]:
        try:
            parsed = [math.inf if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            raise ConfigError(f"thresholds must be numbers or None, got {values!r}") from None
        if len(parsed) == self.num_exits:  # a last entry has no effect, as in ThresholdPolicy
            parsed = parsed[:-1]
        if len(parsed) != self.num_exits - 1 or any(math.isnan(v) for v in parsed):
            raise ConfigError(
                f"give {self.num_exits - 1} thresholds (one per exit before the last, no NaN), got {list(values)}"
            )
        return parsed

    @property
    def input_shape(self) -> list[int | None]:
        """Per-sample input shape of the export (``None``: any length)."""
        return list(self._input_shape)

    @property
    def input_dtype(self) -> np.dtype:
        """The input dtype the stage-0 file takes."""
        return self._input_dtype

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """``x`` as a contiguous array of the export's input dtype; :class:`InputError` on a wrong shape, dtype or
        a non-finite value."""
        fits = x.ndim == len(self._input_shape) + 1 and all(
            want is None or want == got for want, got in zip(self._input_shape, x.shape[1:], strict=False)
        )
        if not fits:
            want = ", ".join("any" if n is None else str(n) for n in self._input_shape)
            raise InputError(f"expected a batch of shape [batch, {want}], got {list(x.shape)}")
        if self._input_dtype.kind == "f":
            if x.dtype.kind != "f":
                raise InputError(f"expected a floating-point input, got dtype {x.dtype}")
            if not np.isfinite(x).all():
                raise InputError("input holds non-finite values (NaN or inf)")
        elif x.dtype.kind not in "iu":
            raise InputError(f"expected integer token ids, got dtype {x.dtype}")
        return np.ascontiguousarray(x, dtype=self._input_dtype)

    def run(
        self, x: Any, *, thresholds: Sequence[float | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Real early exit on a batch ``x`` (numpy array or tensor).

        Returns:
            ``(logits [B, C] float32, exit_index [B] int64, macs [B] float64)``.
        """
        limits = self._thresholds if thresholds is None else self._parse(thresholds)
        batch = self.check_input(_to_numpy(x))
        n = batch.shape[0]
        exit_index = np.full(n, self.num_exits - 1, dtype=np.int64)
        out: np.ndarray | None = None
        active = np.arange(n)
        state: list[np.ndarray] = [batch]
        for k in range(self.num_exits):
            if active.size == 0:
                break
            state, logits, done = self.run_stage(k, state, limits)
            if out is None:
                out = np.empty((n, *logits.shape[1:]), dtype=logits.dtype)
            if k == self.num_exits - 1:
                out[active] = logits
                exit_index[active] = k
                break
            if done.any():
                leaving = np.flatnonzero(done)
                out[active[leaving]] = logits[leaving]
                exit_index[active[leaving]] = k
                keep = np.flatnonzero(~done)
                active = active[keep]
                state = [t.take(keep, axis=0) for t in state]
        assert out is not None or n == 0
        if out is None:
            out = np.empty((0, 0), dtype=np.float32)
        return out, exit_index, self.macs_for(batch.shape)[exit_index]

    def run_stage(
        self, k: int, state: Sequence[np.ndarray], thresholds: Sequence[float] | None = None
    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Stage ``k`` on the flat carried ``state`` (``[x]`` for stage 0): ``(next state, logits, done mask)``.

        The carried state holds the model state and the exit rule's state (as laid out in the manifest); ``done``
        is ``score >= threshold`` (all rows at the last exit). :meth:`run` and the serving engine both use it.
        """
        limits = self._thresholds if thresholds is None else thresholds
        stage = self.manifest["stages"][k]
        *next_state, logits, score = self._sessions[k].run(None, dict(zip(stage["inputs"], state, strict=True)))
        if k == self.num_exits - 1:
            return next_state, logits, np.ones(score.shape[0], dtype=bool)
        return next_state, logits, score >= np.float32(limits[k])

    def macs_for(self, shape: Sequence[int]) -> np.ndarray:
        """Cumulative MACs of each exit for a batch of ``shape`` (exact for the export's shape; a variable-length
        input uses the manifest's per-length polynomial, rounded to whole MACs)."""
        by_length = self.manifest.get("exit_macs_by_length")
        if not by_length:
            return self.exit_macs
        n = float(shape[by_length["dim"]])
        coeffs = np.asarray(by_length["coefficients"], dtype=np.float64)
        return np.round(coeffs[:, 0] + coeffs[:, 1] * n + coeffs[:, 2] * n * n)
