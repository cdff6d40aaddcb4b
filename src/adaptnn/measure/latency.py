"""Latency model of a staged model on one device (in the spirit of LASNet/LAUDNet's latency predictor).

FLOPs do not predict time well: small batches underuse the hardware, every exit adds a head and a
compaction step, and kernels differ in efficiency. So we *measure* each piece on the target device at a
few batch sizes and predict a dynamic run from what it executes:

* ``segment_ms[j](b)``: segment j on a batch of b samples;
* ``head_ms[k](b)``: exit head k;
* ``exit_overhead_ms[k](b)``: the engine's work after head k for a batch of b when nobody leaves (policy
  decision, the one host sync);
* ``compaction_ms[k](m)``: the extra work when some (not all) samples leave at exit k (index computation,
  writing their outputs, compacting the state), as a function of the ``m`` samples *kept* (the state copy,
  the bulk of it, is of the survivors), measured with about half of each profiled batch leaving. Most exits of a
  small batch see nobody leave; charging every exit for a compaction over-predicts those. (Profiles written
  before ``compaction_by_kept`` read it as a function of the batch at the exit.)

Each is a :class:`PiecewiseLinear` function of the batch size through the measured medians (linear
extrapolation beyond the largest batch, zero at b = 0). A dynamic run in which ``n_j`` samples reach
segment j costs ``sum_j segment_ms[j](n_j) + sum_k (head_ms[k] + exit_overhead_ms[k])(n at head k)``
plus ``compaction_ms[k]`` at the exits where some but not all samples leave (no overhead after the last
head). :meth:`LatencyModel.predict` does this for exit counts of one batch;
:meth:`LatencyModel.exit_latency_ms` gives the cumulative latency to reach each exit, the input a
latency-budget calibrator needs.

On a GPU the host issues kernels asynchronously and waits only at the one sync per exit, so a stage (the
segments up to an exit, its head, the exit step) takes about ``max(host time, GPU time)``, not their sum:
small batches are launch-bound, large ones GPU-bound. A CUDA profile therefore also records each piece's
GPU execution time (``*_gpu_ms``: timed with events while a sleep kernel holds the queue, so every launch is
queued before the GPU starts the piece), and :meth:`LatencyModel.predict` sums ``max(host, GPU)`` per stage.
On a CPU there is only host time.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..io import write_json
from ..policies import ConfidencePolicy, simulate_exits
from ..runtime.execution import split_finished, stage_segments
from ..runtime.staged import StagedModel
from ..runtime.state import State, index_state
from .timing import Timer, interleaved_medians, machine_info, median_ms, pinned_threads, to_model, warm_up

__all__ = [
    "PiecewiseLinear",
    "LatencyModel",
    "profile_latency",
    "exit_policy",
    "profile_settings",
    "profile_variants",
    "validate_latency_model",
    "alive_per_segment",
]

log = logging.getLogger(__name__)


def _flag(value: Any, name: str) -> bool:
    """A profile's yes/no field, or a one-line error (a string such as "no" must not read as true)."""
    if not isinstance(value, bool):
        raise ConfigError(f"not a latency profile: {name} must be true or false, got {value!r}")
    return value


def _check_scale(factor: float) -> None:
    if not math.isfinite(factor) or factor <= 0:
        raise ConfigError(f"a latency scale must be a finite number > 0, got {factor!r}")


@dataclass
class PiecewiseLinear:
    """A function of the batch size through measured points ``(knots[i], values[i])``.

    Linear interpolation between knots, the last segment's slope beyond the largest knot, the line from
    the origin below the smallest knot, and 0 for a batch of 0 samples (that piece does not run).
    """

    knots: list[float]
    values: list[float]

    def __post_init__(self) -> None:
        if len(self.knots) != len(self.values) or not self.knots:
            raise ConfigError("PiecewiseLinear needs as many values as knots, at least one")
        if any(b <= a for a, b in zip(self.knots, self.knots[1:], strict=False)) or self.knots[0] <= 0:
            raise ConfigError(f"knots must be positive and strictly increasing, got {self.knots}")

    def __call__(self, batch: float) -> float:
        if batch <= 0:
            return 0.0
        xs, ys = self.knots, self.values
        if batch < xs[0] or len(xs) == 1:
            return ys[0] * batch / xs[0]
        i = min(bisect.bisect_right(xs, batch), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (batch - x0) / (x1 - x0)

    @classmethod
    def fit(cls, batches: Sequence[float], times: Sequence[float]) -> PiecewiseLinear:
        """Through the points (repeated batch sizes averaged), made non-decreasing in the batch size.

        A larger batch never takes less time; a measured dip is noise, and extrapolating it would predict
        negative times, so each value is raised to the running maximum.
        """
        by_batch: dict[float, list[float]] = {}
        for b, t in zip(batches, times, strict=True):
            by_batch.setdefault(float(b), []).append(float(t))
        knots = sorted(by_batch)
        values = [max(0.0, sum(by_batch[k]) / len(by_batch[k])) for k in knots]
        for i in range(1, len(values)):
            values[i] = max(values[i], values[i - 1])
        return cls(knots, values)


def alive_per_segment(model_exit_after: Sequence[int], num_segments: int, exit_counts: Sequence[int]) -> list[int]:
    """Samples that run each segment, given how many samples took each exit in one batch."""
    batch = sum(exit_counts)
    alive, left = [], 0
    exit_iter = iter(zip(model_exit_after, exit_counts, strict=True))
    next_exit = next(exit_iter, None)
    for j in range(num_segments):
        alive.append(batch - left)
        while next_exit is not None and next_exit[0] == j:
            left += next_exit[1]
            next_exit = next(exit_iter, None)
    return alive


@dataclass
class LatencyModel:
    """Per-piece latency functions of one model on one device (see the module docstring)."""

    exit_after: list[int]
    segment_ms: list[PiecewiseLinear]
    head_ms: list[PiecewiseLinear]
    exit_overhead_ms: list[PiecewiseLinear]
    info: dict[str, Any] = field(default_factory=dict)
    segment_gpu_ms: list[PiecewiseLinear] | None = None
    head_gpu_ms: list[PiecewiseLinear] | None = None
    exit_gpu_ms: list[PiecewiseLinear] | None = None
    compaction_ms: list[PiecewiseLinear] | None = None  # None (older profiles): exit_overhead_ms includes it
    compaction_gpu_ms: list[PiecewiseLinear] | None = None
    compaction_by_kept: bool = False  # the compaction curves' argument: samples kept (else: at the exit)

    @property
    def num_exits(self) -> int:
        return len(self.head_ms)

    def predict(self, exit_counts: Sequence[float]) -> float:
        """Predicted ms of one ``run_dynamic`` call in which ``exit_counts[k]`` samples take exit k."""
        if len(exit_counts) != self.num_exits:
            raise ConfigError(f"got {len(exit_counts)} exit counts for a model with {self.num_exits} exits")
        alive = alive_per_segment(self.exit_after, len(self.segment_ms), exit_counts)
        compacts = [0 < c < alive[seg] for c, seg in zip(exit_counts, self.exit_after, strict=True)]
        return sum(self._stage_ms(alive, compacts))

    def _stage_ms(self, alive: list[int] | list[float], compacts: list[bool]) -> list[float]:
        """ms of each stage on the device: host time, or on a GPU profile ``max(host, GPU)`` per stage."""
        host = self._per_stage(
            alive, compacts, self.segment_ms, self.head_ms, self.exit_overhead_ms, self.compaction_ms
        )
        if self.segment_gpu_ms is None or self.head_gpu_ms is None or self.exit_gpu_ms is None:
            return host
        gpu = self._per_stage(
            alive, compacts, self.segment_gpu_ms, self.head_gpu_ms, self.exit_gpu_ms, self.compaction_gpu_ms
        )
        return [max(h, g) for h, g in zip(host, gpu, strict=True)]

    def _per_stage(
        self,
        alive: list[int] | list[float],
        compacts: list[bool],
        segments: list[PiecewiseLinear],
        heads: list[PiecewiseLinear],
        exits: list[PiecewiseLinear],
        compactions: list[PiecewiseLinear] | None,
    ) -> list[float]:
        """ms of each stage (its segments, its head, its exit step) given the samples alive at each segment."""
        out = []
        for k, segs in enumerate(stage_segments(self.exit_after)):
            n = alive[segs[-1]]
            total = sum(segments[j](alive[j]) for j in segs) + heads[k](n)
            if k < self.num_exits - 1:
                total += exits[k](n)
                if compactions is not None and compacts[k]:
                    total += compactions[k](alive[segs[-1] + 1] if self.compaction_by_kept else n)
            out.append(total)
        return out

    def compactions(self, exit_counts: Sequence[float] | torch.Tensor) -> int:
        """How many exits of one batch with these exit counts compact (some, not all, of those there leave)."""
        counts = [float(c) for c in exit_counts]
        alive = alive_per_segment(self.exit_after, len(self.segment_ms), counts)
        return sum(0 < c < alive[seg] for c, seg in zip(counts[:-1], self.exit_after[:-1], strict=True))

    def shifted_compaction(self, ms: float) -> LatencyModel:
        """A copy whose compaction curves (host and GPU) cost ``ms`` more per compaction (never below 0)."""
        if not math.isfinite(ms):
            raise ConfigError(f"a compaction shift must be finite, got {ms!r}")

        def shift(curves: list[PiecewiseLinear] | None) -> list[PiecewiseLinear] | None:
            if curves is None:
                return None
            return [PiecewiseLinear(list(c.knots), [max(0.0, v + ms) for v in c.values]) for c in curves]

        return dataclasses.replace(
            self,
            compaction_ms=shift(self.compaction_ms),
            compaction_gpu_ms=shift(self.compaction_gpu_ms),
            info={**self.info, "compaction_shift_ms": float(self.info.get("compaction_shift_ms", 0.0)) + ms},
        )

    def predict_fractions(self, batch_size: int, exit_fractions: Sequence[float]) -> float:
        """Predicted ms of a batch of ``batch_size`` whose samples exit with the given fractions."""
        return self.predict([batch_size * f for f in exit_fractions])

    def _checked_exits(self, exit_index: Sequence[int] | torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
        """``exit_index`` as a 1-D CPU long tensor and the batch size, or a one-line error naming what is wrong."""
        b = int(batch_size)
        exits = torch.as_tensor(exit_index).reshape(-1).long().cpu()
        if exits.numel() == 0 or b < 1:
            raise ConfigError(
                f"need exits of >= 1 sample and a batch size >= 1, got {exits.numel()} and {batch_size!r}"
            )
        if int(exits.min()) < 0 or int(exits.max()) >= self.num_exits:
            raise ConfigError(
                f"exit indices must be in [0, {self.num_exits}), got {int(exits.min())}..{int(exits.max())}"
            )
        return exits, b

    def predict_batches(self, exit_index: Sequence[int] | torch.Tensor, batch_size: int) -> float:
        """Mean predicted ms per batch of samples exiting at ``exit_index`` (in order) run in batches of ``batch_size``.

        Each batch is predicted from its own exit counts: the later stages of a batch with mixed exits run on fewer
        rows (less efficient per row) and pay a compaction, which a per-sample average of the exits' latencies
        misses. Fewer samples than one batch: one batch with the same exit fractions.
        """
        exits, b = self._checked_exits(exit_index, batch_size)
        k = self.num_exits
        if exits.numel() < b:
            return self.predict_fractions(b, (torch.bincount(exits, minlength=k) / exits.numel()).tolist())
        batches = exits[: (exits.numel() // b) * b].view(-1, b)
        return statistics.fmean(self.predict(torch.bincount(row, minlength=k).tolist()) for row in batches)

    def predict_pooled(self, exit_index: Sequence[int] | torch.Tensor, batch_size: int) -> float:
        """Predicted ms per ``batch_size`` samples when every stage runs full batches of ``batch_size`` rows.

        This is what a stage-level engine that pools the survivors of many batches costs at saturation: each stage
        pays its ``batch_size``-row cost once per ``batch_size`` rows that reach it, so a deep stage is as efficient
        per row as the first. Its ratio to :meth:`predict_batches` is the most pooling can raise throughput over
        request-level early exit on this device (engine bookkeeping not counted).
        """
        exits, b = self._checked_exits(exit_index, batch_size)
        counts = torch.bincount(exits, minlength=self.num_exits)
        reaching = counts.flip(0).cumsum(0).flip(0)  # samples reaching stage k
        compacts = [0 < int(c) < int(r) for c, r in zip(counts, reaching, strict=True)]
        full = [b] * len(self.segment_ms)  # every segment of a stage runs a full batch
        per_stage = self._stage_ms(full, compacts)
        return sum(int(r) / exits.numel() * ms for r, ms in zip(reaching, per_stage, strict=True))

    def predict_full(self, batch_size: int) -> float:
        """Predicted ms of the plain full model (every segment, only the last head, no exit overhead)."""
        host = sum(f(batch_size) for f in self.segment_ms) + self.head_ms[-1](batch_size)
        if self.segment_gpu_ms is None or self.head_gpu_ms is None:
            return host
        return max(host, sum(f(batch_size) for f in self.segment_gpu_ms) + self.head_gpu_ms[-1](batch_size))

    def exit_latency_ms(self, batch_size: int = 1) -> list[float]:
        """Cumulative ms to reach each exit for a batch that stays together (input of latency budgets)."""
        out = []
        for k in range(self.num_exits):
            counts = [0.0] * self.num_exits
            counts[k] = batch_size
            out.append(self.predict(counts))
        return out

    def scaled(self, factor: float) -> LatencyModel:
        """A copy with every piece's time multiplied by ``factor`` (recorded as ``info["anchor_scale"]``)."""
        _check_scale(factor)
        scale = factor * float(self.info.get("anchor_scale", 1.0))
        return self._rescaled(lambda _knot: factor, {"anchor_scale": scale})

    def scaled_by_batch(self, factors: Mapping[int, float]) -> LatencyModel:
        """A copy whose times at each batch size are multiplied by the factor measured there.

        ``factors`` maps batch sizes to (whole run measured) / (predicted); between them the factor is interpolated
        linearly, beyond them it is the nearest one's. Anchoring the pieces at several batch sizes corrects what one
        anchor cannot: pieces timed apart can read low at small batches and right at large ones, and a stage that
        runs on a batch's survivors runs at a small batch. Recorded as ``info["anchor_scales"]``.
        """
        if not factors:
            raise ConfigError("scaled_by_batch needs at least one (batch size, factor)")
        sizes = sorted(float(n) for n in factors)
        values = [float(factors[n]) for n in sorted(factors)]
        for f in values:
            _check_scale(f)
        curve = PiecewiseLinear(sizes, values)

        def at(knot: float) -> float:  # clamped to the anchored sizes: the nearest factor beyond them
            return curve(min(max(knot, sizes[0]), sizes[-1]))

        return self._rescaled(at, {"anchor_scales": {str(int(n)): f for n, f in zip(sizes, values, strict=True)}})

    def _rescaled(self, factor_at: Callable[[float], float], info: dict[str, Any]) -> LatencyModel:
        """A copy with each curve's value at each knot multiplied by ``factor_at(knot)``.

        Not made non-decreasing again: the anchored sizes must predict exactly what was measured there, and a piece
        whose scaled times dip between two sizes is as noisy as the dip (the sum over pieces is what is anchored).
        """

        def times(curves: list[PiecewiseLinear] | None) -> list[PiecewiseLinear] | None:
            if curves is None:
                return None
            return [
                PiecewiseLinear(list(c.knots), [factor_at(k) * v for k, v in zip(c.knots, c.values, strict=True)])
                for c in curves
            ]

        return LatencyModel(
            exit_after=list(self.exit_after),
            segment_ms=times(self.segment_ms) or [],
            head_ms=times(self.head_ms) or [],
            exit_overhead_ms=times(self.exit_overhead_ms) or [],
            info={**self.info, **info},
            segment_gpu_ms=times(self.segment_gpu_ms),
            head_gpu_ms=times(self.head_gpu_ms),
            exit_gpu_ms=times(self.exit_gpu_ms),
            compaction_ms=times(self.compaction_ms),
            compaction_gpu_ms=times(self.compaction_gpu_ms),
            compaction_by_kept=self.compaction_by_kept,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyModel:
        def curves(key: str) -> list[PiecewiseLinear] | None:
            return None if data.get(key) is None else [PiecewiseLinear(**d) for d in data[key]]

        try:
            return cls(
                exit_after=list(data["exit_after"]),
                segment_ms=[PiecewiseLinear(**d) for d in data["segment_ms"]],
                head_ms=[PiecewiseLinear(**d) for d in data["head_ms"]],
                exit_overhead_ms=[PiecewiseLinear(**d) for d in data["exit_overhead_ms"]],
                info=dict(data.get("info", {})),
                segment_gpu_ms=curves("segment_gpu_ms"),
                head_gpu_ms=curves("head_gpu_ms"),
                exit_gpu_ms=curves("exit_gpu_ms"),
                compaction_ms=curves("compaction_ms"),
                compaction_gpu_ms=curves("compaction_gpu_ms"),
                compaction_by_kept=_flag(data.get("compaction_by_kept", False), "compaction_by_kept"),
            )
        except (KeyError, TypeError) as err:
            raise ConfigError(f"not a latency profile: {err}") from None

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"no latency profile at {path}; create one with `adaptnn profile`")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None


@torch.inference_mode()
def profile_latency(
    model: StagedModel,
    sample: torch.Tensor,
    *,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    repeats: int = 20,
    warmup_s: float = 0.5,
    device: torch.device | str = "cpu",
    num_threads: int | None = None,
) -> LatencyModel:
    """Measure every segment, head and exit step of ``model`` at each batch size and fit the latency model.

    Args:
        model: the staged model (eval mode is set).
        sample: a pool of inputs ``[N, ...]``; batches are taken (cycled) from it.
        batch_sizes: where to measure; predictions interpolate between them.
        repeats: timed passes per batch size, each on a different batch (median per piece kept).
        warmup_s: warm-up time per batch size before timing.
        device: where to run.
        num_threads: CPU threads to pin (default: leave as is).
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"batch_sizes must be positive, got {list(batch_sizes)}")
    model = model.eval().to(device)
    timer = Timer(device)
    sizes = sorted(set(int(b) for b in batch_sizes))
    cuda = timer.cuda
    host_t: dict[tuple[str, int], list[float]] = {}
    gpu_t: dict[tuple[str, int], list[float]] = {}
    n_pool = sample.shape[0]
    kept_rows: dict[int, list[float]] = {}  # exit k -> samples kept by the half-leave step, per size > 1
    # each piece is timed on its own, a real run times them once together: remove the timer's own cost
    # (on CPU; on CUDA the host time is measured without synchronising)
    timer_overhead = 0.0 if cuda else median_ms(timer, lambda: None, 200)
    with pinned_threads(num_threads):
        for b in sizes:
            # a different batch each repeat, timed in context (each piece on the fresh output of the one
            # before, as in a real run), so caches are not kept warm by re-running one piece on one input
            batches = [to_model(model, sample[(torch.arange(b) + r * b) % n_pool]) for r in range(repeats)]
            warm_up(lambda x=batches[0]: model.forward_all(x), warmup_s, timer)
            pieces: dict[tuple[str, int], list[tuple[float, float]]] = {}
            kept: dict[int, list[int]] = {}
            segment, head = _timed_pieces(model, timer, pieces, leave=b > 1, kept=kept)
            for x in batches:
                model.walk(x, segment=segment, head=head)
            for k, counts in kept.items():
                kept_rows.setdefault(k, []).append(float(statistics.median(counts)))
            for key, values in pieces.items():
                host_t.setdefault(key, []).append(max(0.0, statistics.median(v[0] for v in values) - timer_overhead))
                gpu_t.setdefault(key, []).append(statistics.median(v[1] for v in values))

    def curves(times: dict[tuple[str, int], list[float]], kind: str, count: int) -> list[PiecewiseLinear]:
        return [
            PiecewiseLinear.fit(sizes, times[(kind, i)]) if (kind, i) in times else PiecewiseLinear([1.0], [0.0])
            for i in range(count)
        ]

    num_segments, num_exits = len(model.segments), model.num_exits
    # compaction = (half leaves) - (nobody leaves), a function of the samples kept (a batch of 1 never compacts)
    compaction: dict[str, list[PiecewiseLinear]] = {"host": [], "gpu": []}
    larger = [b for b in sizes if b > 1]
    for name, times in (("host", host_t), ("gpu", gpu_t)):
        for k in range(num_exits):
            points = []
            if times.get(("leave", k)):
                stay = dict(zip(sizes, times[("exit", k)], strict=True))
                points = [
                    (m, max(0.0, t - stay[b]))
                    for b, t, m in zip(larger, times[("leave", k)], kept_rows[k], strict=True)
                    if m > 0
                ]
            compaction[name].append(
                PiecewiseLinear.fit([m for m, _ in points], [t for _, t in points])
                if points
                else PiecewiseLinear([1.0], [0.0])
            )
    return LatencyModel(
        exit_after=list(model.exit_after),
        segment_ms=curves(host_t, "seg", num_segments),
        head_ms=curves(host_t, "head", num_exits),
        exit_overhead_ms=curves(host_t, "exit", num_exits),
        info={
            **machine_info(device),
            "batch_sizes": sizes,
            "repeats": repeats,
            "input_shape": list(sample.shape[1:]),
            "timer_overhead_ms": timer_overhead,
        },
        segment_gpu_ms=curves(gpu_t, "seg", num_segments) if cuda else None,
        head_gpu_ms=curves(gpu_t, "head", num_exits) if cuda else None,
        exit_gpu_ms=curves(gpu_t, "exit", num_exits) if cuda else None,
        compaction_ms=compaction["host"],
        compaction_gpu_ms=compaction["gpu"] if cuda else None,
        compaction_by_kept=True,
    )


def _timed_pieces(
    model: StagedModel,
    timer: Timer,
    pieces: dict[tuple[str, int], list[tuple[float, float]]],
    *,
    leave: bool,
    kept: dict[int, list[int]] | None = None,
) -> tuple[Callable[[int, nn.Module, State], State], Callable[[int, nn.Module, State], torch.Tensor]]:
    """``segment`` and ``head`` callbacks for :meth:`StagedModel.walk` that time every piece into ``pieces``.

    The segment callback times the segment (key ``("seg", j)``). The head callback times the head
    (``("head", k)``), then, except after the last head, the exit step when nobody leaves (``("exit", k)``:
    the decision alone) and, with ``leave``, when about half the batch leaves (``("leave", k)``: decision and
    compaction; ``kept[k]`` gets how many samples it kept). The exit steps' results are dropped: the walk goes on
    with the whole batch.
    """
    last = model.num_exits - 1
    stay = ConfidencePolicy([math.inf] * last) if last else None

    def timed(key: tuple[str, int], fn: Callable[[], Any]) -> Any:
        host_ms, gpu_ms, out = _time_piece(fn, timer)
        pieces.setdefault(key, []).append((host_ms, gpu_ms))
        return out

    def segment(j: int, module: nn.Module, state: State) -> State:
        return timed(("seg", j), lambda: module(state))

    def head(k: int, module: nn.Module, state: State) -> torch.Tensor:
        logits = timed(("head", k), lambda: module(state))
        if stay is not None and k < last:
            timed(("exit", k), lambda: _exit_step(stay, k, logits, state))
            if leave:
                conf = logits.float().softmax(-1).amax(-1)
                half = ConfidencePolicy([float(conf.median())] * last)
                timed(("leave", k), lambda: _exit_step(half, k, logits, state))
                if kept is not None:
                    done = half.decide(k, logits, None)[0]
                    kept.setdefault(k, []).append(int(done.numel() - int(done.sum())))
        return logits

    return segment, head


def _time_piece(fn: Any, timer: Timer) -> tuple[float, float, Any]:
    """``(host ms, GPU ms, result)`` of one piece.

    Host ms: from the call until it returns (on CUDA: the launches, not waiting for the GPU). GPU ms (CUDA
    only, else 0): a second call timed with events behind a sleep kernel that holds the queue until every
    launch of the piece is queued, so launch gaps do not count.
    """
    if not timer.cuda:
        ms, out = timer.run(fn)
        return ms, 0.0, out
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    host_ms = (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(host_ms * 4e6) + 20_000)  # ~2 GHz clock: about twice the launch time
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return host_ms, begin.elapsed_time(end), out


def _exit_step(policy: ConfidencePolicy, k: int, logits: torch.Tensor, state: State) -> None:
    """The engine's work after head k: the policy decision, then the same split and compaction as run_dynamic."""
    done, prediction, _ = policy.decide(k, logits, None)
    n_done, done_idx, keep_idx = split_finished(done)
    if done_idx is not None and keep_idx is not None:
        out = prediction.new_empty(prediction.shape)
        out[done_idx] = prediction.index_select(0, done_idx)
        index_state(state, keep_idx)


@torch.inference_mode()
def validate_latency_model(
    model: StagedModel,
    latency_model: LatencyModel,
    inputs: torch.Tensor,
    policy: ConfidencePolicy,
    *,
    batch_sizes: Sequence[int] = (3, 12, 48),
    rounds: int = 5,
    warmup_s: float = 0.5,
    device: torch.device | str = "cpu",
    num_threads: int | None = None,
) -> list[dict[str, Any]]:
    """Measure ``run_dynamic`` at (held-out) batch sizes and compare with the latency model's prediction.

    Each batch's prediction uses that batch's own exit counts; the error of a setting is that of the summed
    times over its batches.

    Returns:
        One ``{batch_size, measured_ms, predicted_ms, error}`` per batch size (``error`` relative, signed).
    """
    model = model.eval().to(device)
    timer = Timer(device)
    rows = []
    with pinned_threads(num_threads):
        for b in batch_sizes:
            n = (inputs.shape[0] // b) * b
            if n == 0:
                raise ConfigError(f"batch size {b} is larger than the {inputs.shape[0]} inputs")
            batches = [to_model(model, inputs[i : i + b]) for i in range(0, n, b)]
            warm_up(
                lambda bs=batches: [model.run_dynamic(x, policy, check_finite=False) for x in bs[:4]], warmup_s, timer
            )
            measured = predicted = 0.0
            for x in batches:
                out = model.run_dynamic(x, policy, check_finite=False)
                counts = torch.bincount(out.exit_index.cpu(), minlength=model.num_exits).tolist()
                measured += median_ms(timer, lambda x=x: model.run_dynamic(x, policy, check_finite=False), rounds)
                predicted += latency_model.predict(counts)
            rows.append(
                {
                    "batch_size": b,
                    "num_batches": len(batches),
                    "measured_ms": measured / len(batches),
                    "predicted_ms": predicted / len(batches),
                    "error": predicted / measured - 1.0,
                }
            )
    return rows


def exit_policy(num_exits: int, k: int) -> ConfidencePolicy:
    """A confidence rule that sends every sample out at exit ``k`` (thresholds 0 there, ``inf`` before)."""
    return ConfidencePolicy([0.0 if i == k else math.inf for i in range(num_exits - 1)])


def profile_settings(
    models: dict[str, StagedModel],
    sample: torch.Tensor,
    *,
    anchor_batch: int | None = None,
    anchor_rounds: int = 5,
    **options: Any,
) -> dict[str, LatencyModel]:
    """A :class:`LatencyModel` per deployment setting of one model (the setting as one more axis of the model).

    A setting is anything that changes what runs: a token knob (ToMe ``r``, EViT keep rate), an elastic member
    (materialised), ... ``models`` maps its label to the staged model as deployed; each is profiled with
    :func:`profile_latency` (``options`` go there). Settings are profiled one after the other, and the pieces are
    timed apart from the engine's per-call work, so load drift between settings and the engine's overhead would
    skew a choice between them. With ``anchor_batch`` the cumulative time to each exit is also *measured* at that
    batch size: ``run_dynamic`` with every sample leaving at exit k (:func:`exit_policy`), for every setting and
    exit, on the same batches (:func:`~adaptnn.measure.timing.interleaved_medians`: one block per setting, its
    exits interleaved call by call, the settings' blocks rotating round by round, so each setting is timed with
    its own weights in the caches, as deployed, and drift still spreads over all); it is kept as
    ``info["anchor"]["exit_ms"]`` (ms per batch). The profiled batch sizes below ``anchor_batch`` are anchored
    too, each by a whole last-exit run at that size in the same blocks (``info["anchor"]["last_exit_ms_by_batch"]``),
    and each profile is scaled by batch size so its last-exit prediction equals the measured one at every anchored
    size (:meth:`LatencyModel.scaled_by_batch`, ``info["anchor_scales"]``): a batch's survivors run its later stages
    at a smaller batch, where pieces timed apart read low. A model with exits is also timed on one mixed-exit run
    per setting at ``anchor_batch`` (part of the batch leaving at every exit), as a check times a choice: next to
    the last exit, the two interleaved call by call in a block of their own. What the profile misses on it, as a
    ratio to the last exit, is charged to its compactions (:meth:`LatencyModel.shifted_compaction`,
    ``info["anchor"]["mixed"]``): without it the profile predicted mixed batches about 4% low at batch 64 on a CPU.
    """
    if not models:
        raise ConfigError("profile_settings needs at least one model (label -> staged model)")
    profiles = {label: profile_latency(model, sample, **options) for label, model in models.items()}
    if anchor_batch is None:
        return profiles
    b = int(anchor_batch)
    if b < 1:
        raise ConfigError(f"anchor_batch must be >= 1, got {anchor_batch!r}")
    device = options.get("device", "cpu")
    n_pool = sample.shape[0]
    count = max(1, min(8, n_pool // b))
    # the profiled batch sizes below b are anchored too, each by a whole last-exit run at that size
    smaller = sorted({int(n) for p in profiles.values() for n in p.info["batch_sizes"] if int(n) < b})
    batches = {n: [sample[(torch.arange(n) + i * n) % n_pool].to(device) for i in range(count)] for n in [b, *smaller]}

    def run(model: StagedModel, policy: ConfidencePolicy, n: int) -> Callable[[int], Any]:
        def call(i: int) -> Any:
            with torch.inference_mode():
                return model.run_dynamic(to_model(model, batches[n][i]), policy, check_finite=False)

        return call

    def leave_at(model: StagedModel, k: int, n: int) -> Callable[[int], Any]:
        return run(model, exit_policy(model.num_exits, k), n)

    # a mixed-exit run needs a batch to compact: at batch 1 every sample leaves or stays together
    anchor_inputs = {label: [to_model(m, x) for x in batches[b]] for label, m in models.items()} if b > 1 else {}
    mixed = {label: _mixed_policy(models[label], inputs) for label, inputs in anchor_inputs.items()}

    calls: dict[str, Callable[[int], Any]] = {}
    blocks = []
    for label, m in models.items():
        block = {f"{label}|{k}": leave_at(m, k, b) for k in range(m.num_exits)}
        block.update({f"{label}|last@{n}": leave_at(m, m.num_exits - 1, n) for n in smaller})
        calls.update(block)
        blocks.append(list(block))
        if mixed.get(label) is not None:  # timed as a check times a choice: next to the last exit, in a block of two
            pair = {
                f"{label}|mixed": run(m, mixed[label][0], b),
                f"{label}|mixed_last": leave_at(m, m.num_exits - 1, b),
            }
            calls.update(pair)
            blocks.append(list(pair))
    with pinned_threads(options.get("num_threads")):
        medians = interleaved_medians(
            calls,
            list(range(count)),
            rounds=anchor_rounds,
            warmup_s=float(options.get("warmup_s", 0.5)),
            timer=Timer(device),
            blocks=blocks,
        )
    out = {}
    for label, profile in profiles.items():
        exit_ms = [statistics.fmean(medians[f"{label}|{k}"]) for k in range(models[label].num_exits)]
        last_ms = {n: statistics.fmean(medians[f"{label}|last@{n}"]) for n in smaller}
        factors = {
            n: measured / predicted
            for n, measured in [(b, exit_ms[-1]), *last_ms.items()]
            if (predicted := profile.exit_latency_ms(n)[-1]) > 0 and measured > 0
        }
        out[label] = profile.scaled_by_batch(factors) if factors else profile
        anchor: dict[str, Any] = {
            "batch_size": b,
            "exit_ms": exit_ms,
            "last_exit_ms_by_batch": {str(n): ms for n, ms in last_ms.items()},
        }
        if mixed.get(label) is not None:
            out[label], anchor["mixed"] = _anchor_mixed(
                out[label], mixed[label][1],
                statistics.fmean(medians[f"{label}|mixed"]) / statistics.fmean(medians[f"{label}|mixed_last"]),
            )  # fmt: skip
        out[label].info["anchor"] = anchor
    return out


def _mixed_policy(
    model: StagedModel, batches: list[torch.Tensor]
) -> tuple[ConfidencePolicy, list[torch.Tensor]] | None:
    """A policy under which part of ``batches`` leaves at every exit, and each batch's exit indices under it (None:
    a model with one exit).

    Each threshold is its exit's 2/3 confidence quantile over the batches: about a third of the samples are
    confident enough at each exit, so every exit but the last sees some leave and some stay (it compacts). The exit
    indices are replayed on the same logits (:func:`~adaptnn.policies.simulate_exits`; ``run_dynamic`` makes the
    same decisions), so the model runs once here.
    """
    if model.num_exits < 2:
        return None
    scorer = ConfidencePolicy([0.0] * (model.num_exits - 1))
    with torch.inference_mode():
        logits = [model.forward_all(x) for x in batches]
    confidence = torch.cat([scorer.scores(out)[0] for out in logits], dim=1)
    policy = ConfidencePolicy([float(torch.quantile(c, 2 / 3)) for c in confidence[:-1]])
    return policy, [simulate_exits(policy, out)[0].cpu() for out in logits]


def _anchor_mixed(
    profile: LatencyModel, exits: list[torch.Tensor], ratio: float
) -> tuple[LatencyModel, dict[str, Any]]:
    """``profile`` with a cost per compaction added so it predicts the measured mixed-exit run, and the record.

    The profile is anchored on whole runs in which every sample leaves at one exit; a batch whose samples leave at
    several exits also pays what its compactions cost in a real run beyond the pieces timed apart (allocations of
    new shapes, the scatter of the leavers' outputs). ``exits`` are the run's exit indices, one tensor per batch;
    ``ratio`` is its time over the last exit's, the two interleaved call by call as a check times a choice
    (:func:`adaptnn.runs.knobs.measure_choice`); a ratio of two runs timed side by side is free of the machine's
    drift and of the protocol's own bias (the same run reads a few % apart in a block of one setting's exits). The
    profile's last exit times it gives the mixed run's target; the difference, spread over the run's compactions,
    is added to every compaction curve (host and GPU: a stage costs ``max(host, GPU)``, so a shift of both shifts
    it).
    """
    b = exits[0].shape[0]
    measured = ratio * profile.exit_latency_ms(b)[-1]
    predicted = statistics.fmean(profile.predict_batches(e, b) for e in exits)
    per_batch = statistics.fmean(profile.compactions(torch.bincount(e, minlength=profile.num_exits)) for e in exits)
    record = {"ratio_to_last": ratio, "ms": measured, "predicted_ms": predicted, "compactions": per_batch}
    if per_batch == 0 or profile.compaction_ms is None:  # nothing to charge it to (older profile or no compaction)
        return profile, record
    shift = (measured - predicted) / per_batch
    return profile.shifted_compaction(shift), {**record, "compaction_shift_ms": shift}


def profile_variants(model: Any, sample: torch.Tensor, **options: Any) -> dict[str, LatencyModel]:
    """A :class:`LatencyModel` per member of an elastic model (variants as an axis of the latency model).

    Each member is profiled as it is deployed: materialised into a plain, smaller staged model
    (:meth:`adaptnn.layers.elastic.ElasticStagedModel.materialise`). ``options`` go to :func:`profile_settings`.
    Returns variant name -> latency model.
    """
    variants = getattr(model, "variants", None)
    if variants is None or not hasattr(model, "materialise"):
        raise ConfigError(f"profile_variants needs an elastic model (with variants), got {type(model).__name__}")
    return profile_settings({v.name: model.materialise(v) for v in variants}, sample, **options)
