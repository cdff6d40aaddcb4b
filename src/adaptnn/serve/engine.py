"""The stage-level serving engine: one queue per stage, rows of many requests pooled into each stage's batch.

Request-level early exit runs a batch of requests through the stages and lets the batch shrink: deep stages
run on the few survivors of that one batch. This engine instead keeps one FIFO queue of *rows* per stage. A
scheduler step picks a stage, gathers up to ``max_batch`` rows waiting there (survivors of many earlier batches,
or new arrivals for stage 0), concatenates their states (and their policies' per-row states), runs the stage
through a :class:`~adaptnn.serve.backends.StageBackend`, answers the requests whose last row finished and pushes
the others' rows to the next queue. Deep stages therefore run on full batches under load.

The core is synchronous and deterministic (:meth:`Engine.submit`, :meth:`Engine.step`, :meth:`Engine.drain`):
with the default ``"oldest"`` scheduler the order of work depends only on the order of submissions, so tests
replay it exactly. :mod:`adaptnn.serve.frontend` runs it in one worker thread behind an asyncio front.

Batch invariance: a row's decision depends on its own state only, but a stage's kernels may round differently
at another batch size (e.g. oneDNN/cuBLAS picking other algorithms). Logits then differ by float noise (measured
on CPU: below 1e-5 absolute for fp32 CNNs), which changes an exit only when a score lies that close to its
threshold. :data:`BATCH_INVARIANCE_ATOL` is the documented tolerance.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from ..measure.latency import LatencyModel
from ..runtime.execution import split_finished
from ..runtime.state import State, cat_states, index_state, map_state, slice_state
from .backends import StageBackend, check_row_state

__all__ = ["Engine", "Request", "Result", "BatchRecord", "SCHEDULERS", "BATCH_INVARIANCE_ATOL", "stage_ms_from"]

#: logits of a row may differ by this much (fp32, absolute) between batch compositions; decisions match
#: :meth:`~adaptnn.runtime.StagedModel.run_dynamic` unless a score lies within that noise of its threshold
BATCH_INVARIANCE_ATOL = 1e-5
SCHEDULERS = ("oldest", "fill", "deadline")


def stage_ms_from(latency_model: LatencyModel, batch_size: int = 1) -> list[float]:
    """Predicted ms of each stage at ``batch_size`` from a profiled latency model (the ``"deadline"`` scheduler's
    ``stage_ms``): differences of its cumulative exit latencies."""
    cumulative = latency_model.exit_latency_ms(batch_size)
    return [b - a for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)]


class Result:
    """The answer to one request of ``n`` rows.

    Attributes:
        logits: ``[n, C]`` prediction of each row at the exit it took.
        exits: the exit each row took (Python ints: what a one-row answer needs, without building tensors).
        exit_index: ``[n]`` long, the same as a tensor (built on first access).
        macs: ``[n]`` float64, cumulative MACs of each row's exit (built on first access).
        queue_ms: time the request's rows spent waiting (latency minus compute).
        compute_ms: time of the stage batches its rows were part of.
        latency_ms: submission to answer.

    ``exit_index`` and ``macs`` are built lazily: at thousands of one-row requests per second on a GPU, two
    small tensors per answer were a measurable part of the engine's per-request host time.
    """

    __slots__ = ("logits", "exits", "queue_ms", "compute_ms", "latency_ms", "_exit_macs", "_exit_index", "_macs")

    def __init__(
        self, logits: Tensor, exits: list[int], exit_macs: Tensor, queue_ms: float, compute_ms: float, latency_ms: float
    ) -> None:
        self.logits, self.exits, self._exit_macs = logits, exits, exit_macs
        self.queue_ms, self.compute_ms, self.latency_ms = queue_ms, compute_ms, latency_ms
        self._exit_index: Tensor | None = None
        self._macs: Tensor | None = None

    @property
    def exit_index(self) -> Tensor:
        if self._exit_index is None:
            self._exit_index = torch.tensor(self.exits, dtype=torch.long)
        return self._exit_index

    @property
    def macs(self) -> Tensor:
        if self._macs is None:
            self._macs = self._exit_macs[self.exit_index]
        return self._macs

    def __repr__(self) -> str:
        return (
            f"Result(n={len(self.exits)}, exits={self.exits}, queue_ms={self.queue_ms:.3f}, "
            f"compute_ms={self.compute_ms:.3f}, latency_ms={self.latency_ms:.3f})"
        )


class Request:
    """One submitted request: its rows' answers are collected as they finish, stage by stage."""

    __slots__ = ("id", "n", "seq", "t_submit", "t_started", "deadline", "callback", "parts", "remaining", "compute_s",
                 "result", "error")  # fmt: skip

    def __init__(self, rid: int, n: int, seq: int, t_submit: float, deadline: float, callback: Any) -> None:
        self.id, self.n, self.seq, self.t_submit, self.deadline = rid, n, seq, t_submit, deadline
        self.t_started = math.inf  # when its first row finished stage 0 (entered the deep stages)
        self.callback: Callable[[Request], None] | None = callback
        self.parts: list[tuple[list[int], int, Tensor]] = []  # (rows, exit, predictions of those rows)
        self.remaining = n
        self.compute_s = 0.0
        self.result: Result | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


@dataclass
class BatchRecord:
    """What one scheduler step did (for metrics and tests)."""

    stage: int
    size: int
    finished_rows: int
    compute_s: float


_SEQ, _STARTED = attrgetter("seq"), attrgetter("t_started")


class _Chunk:
    """Rows waiting in one stage queue: their state, policy state and owners (``owners[i]`` row ``rows[i]``)."""

    __slots__ = ("state", "pstate", "owners", "rows", "seq", "t_oldest")

    def __init__(self, state: State, pstate: State, owners: list[Request], rows: list[int]) -> None:
        self.state, self.pstate, self.owners, self.rows = state, pstate, owners, rows
        self._ages()

    def _ages(self) -> None:
        self.seq = min(map(_SEQ, self.owners))
        self.t_oldest = min(map(_STARTED, self.owners))  # inf in the stage-0 queue

    def __len__(self) -> int:
        return len(self.rows)

    def split(self, m: int) -> _Chunk:
        """Detach and return the first ``m`` rows; this chunk keeps the rest."""
        head = _Chunk(slice_state(self.state, m), slice_state(self.pstate, m), self.owners[:m], self.rows[:m])
        self.state = map_state(self.state, lambda t: t if t.dim() == 0 else t[m:])
        self.pstate = map_state(self.pstate, lambda t: t if t.dim() == 0 else t[m:])
        self.owners, self.rows = self.owners[m:], self.rows[m:]
        self._ages()
        return head


class _Launched(NamedTuple):
    """A stage batch run by the backend whose exit decisions were not read yet (``out`` or ``error``)."""

    stage: int
    batch: _Chunk
    start: float
    out: tuple[State, Tensor, Tensor, State] | None
    error: BaseException | None
    ready: Any  # a CUDA event after which ``out``'s done mask (copied to the host) can be read; None: ready


def _runs(owners: list[Request]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of consecutive rows with the same owner."""
    out, start = [], 0
    for i in range(1, len(owners) + 1):
        if i == len(owners) or owners[i] is not owners[start]:
            out.append((start, i))
            start = i
    return out


class Engine:
    """Stage-level early-exit serving engine (synchronous core; see the module docstring).

    Args:
        backend: runs a stage on pooled rows (:class:`~adaptnn.serve.backends.TorchBackend` or ``OnnxBackend``).
        max_batch: most rows in one stage batch.
        scheduler: ``"oldest"`` (default): run the stage whose head row belongs to the oldest request (ties: the
            deeper stage, which answers requests sooner). Latency-first: a batch's survivors run on before newer
            arrivals, so with single-row arrivals it is request-level early exit answering at each row's own exit.
            ``"fill"``: throughput-first pooling: run the deepest stage holding a full batch; else new arrivals
            (stage 0); with no arrivals waiting, the deepest stage with rows; but rows of requests that finished
            stage 0 over ``max_wait_ms`` ago go on first (oldest first), which bounds what waiting for a fuller
            batch adds to a request's latency. Deep stages then run on the survivors of many stage-0 batches.
            ``"deadline"``: least slack first, the slack of a row being its request's deadline minus now minus the
            predicted time of its remaining stages.
        stage_ms: predicted ms of each stage at batch 1 (``"deadline"`` only; e.g. :func:`stage_ms_from` a profiled
            :class:`~adaptnn.measure.LatencyModel`); default: equal stages.
        max_wait_ms: ``"fill"``: rows that left stage 0 this long ago run on first (no more waiting to pool).
        on_batch: called with a :class:`BatchRecord` after every step (metrics).
        clock: seconds, monotonic (tests may pass a fake one).
        pipeline: keep two stage batches in flight: a step launches the next batch before it waits for the
            previous one's exit decisions, so the host's bookkeeping (answers, queues, new arrivals) overlaps the
            device's compute. Pays on an asynchronous device (a GPU), where waiting for each batch leaves the
            device idle while the host works; rows of the batch in flight join the next queue one step later.
            ``None`` (default): on when the backend says it is asynchronous (``backend.asynchronous``).
    """

    def __init__(
        self,
        backend: StageBackend,
        *,
        max_batch: int = 32,
        scheduler: str = "oldest",
        stage_ms: Sequence[float] | None = None,
        max_wait_ms: float = 20.0,
        on_batch: Callable[[BatchRecord], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        pipeline: bool | None = None,
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        self.backend = backend
        self.num_exits = backend.num_exits
        self.max_batch = int(max_batch)
        self.scheduler = scheduler
        if stage_ms is not None and len(stage_ms) != self.num_exits:
            raise ConfigError(f"stage_ms has {len(stage_ms)} entries for {self.num_exits} stages")
        stage_ms = list(stage_ms) if stage_ms is not None else [1.0] * self.num_exits
        # predicted seconds from entering stage k to the answer
        self._remaining_s = [sum(stage_ms[k:]) / 1e3 for k in range(self.num_exits)]
        self.max_wait_s = float(max_wait_ms) / 1e3
        self.on_batch = on_batch
        self.clock = clock
        self.queues: list[deque[_Chunk]] = [deque() for _ in range(self.num_exits)]
        self._depth = [0] * self.num_exits
        self._ids = itertools.count()
        self._macs = backend.exit_macs()
        self._sample_shape: tuple[int, ...] | None = None
        self.pipeline = bool(getattr(backend, "asynchronous", False)) if pipeline is None else bool(pipeline)
        self._inflight: deque[_Launched] = deque()

    # -- state ---------------------------------------------------------------------------------------
    @property
    def queue_depths(self) -> list[int]:
        """Rows waiting at each stage."""
        return list(self._depth)

    @property
    def pending_rows(self) -> int:
        """Rows submitted and not yet answered (waiting or in a batch in flight)."""
        return sum(self._depth) + sum(len(b.batch) for b in self._inflight)

    @property
    def idle(self) -> bool:
        return not any(self._depth) and not self._inflight

    # -- submit / step / drain -----------------------------------------------------------------------
    def submit(
        self,
        x: Tensor,
        *,
        callback: Callable[[Request], None] | None = None,
        deadline_s: float | None = None,
        checked: bool = False,
    ) -> Request:
        """Queue the rows of ``x`` (``[n, ...]``, checked by the backend) at stage 0; returns the request.

        ``callback(request)`` runs in the stepping thread once every row is answered (``request.result``) or
        the request failed (``request.error``). ``deadline_s``: seconds from now (``"deadline"`` scheduler).
        ``checked``: ``x`` already went through ``backend.check`` (the async front checks in the caller's task).
        """
        if not checked:
            x = self.backend.check(x)
        n = int(x.shape[0])
        if n == 0:
            raise InputError("a request needs at least one row, got a batch of 0")
        shape = tuple(x.shape[1:])
        if self._sample_shape is None:
            self._sample_shape = shape
        elif shape != self._sample_shape:
            raise InputError(
                f"expected samples of shape {list(self._sample_shape)} (the engine pools rows of one shape), "
                f"got {list(shape)}"
            )
        now = self.clock()
        rid = next(self._ids)
        deadline = math.inf if deadline_s is None else now + float(deadline_s)
        request = Request(rid, n, rid, now, deadline, callback)
        pstate = self.backend.init_policy_state(n)
        self.queues[0].append(_Chunk(x, pstate, [request] * n, list(range(n))))
        self._depth[0] += n
        return request

    def _pick(self) -> int:
        """The stage to run next (only called with work waiting)."""
        if self.scheduler == "fill":
            return self._pick_fill()
        best, best_key = -1, None
        now = self.clock() if self.scheduler == "deadline" else 0.0
        for k in range(self.num_exits - 1, -1, -1):  # deeper first: ties go to the deeper stage
            queue = self.queues[k]
            if not queue:
                continue
            if self.scheduler == "deadline":
                slack = min(o.deadline for o in queue[0].owners) - now - self._remaining_s[k]
                key: tuple[float, ...] = (slack, queue[0].seq)
            else:
                key = (queue[0].seq,)
            if best_key is None or key < best_key:
                best, best_key = k, key
        return best

    def _pick_fill(self) -> int:
        limit = self.clock() - self.max_wait_s
        overdue = [k for k in range(1, self.num_exits) if self.queues[k] and self.queues[k][0].t_oldest < limit]
        if overdue:  # rows that started over max_wait ago go on first (oldest first): pooling's wait is bounded
            return min(overdue, key=lambda k: (self.queues[k][0].t_oldest, -k))
        for k in range(self.num_exits - 1, -1, -1):
            if self._depth[k] >= self.max_batch:
                return k
        if self._depth[0]:
            return 0
        return max(k for k in range(self.num_exits) if self._depth[k])

    def _gather(self, k: int) -> _Chunk:
        queue = self.queues[k]
        taken: list[_Chunk] = []
        room = self.max_batch
        while queue and room > 0:
            chunk = queue[0]
            if len(chunk) <= room:
                taken.append(queue.popleft())
                room -= len(chunk)
            else:
                taken.append(chunk.split(room))
                room = 0
        self._depth[k] -= self.max_batch - room
        if len(taken) == 1:
            return taken[0]
        owners = [o for c in taken for o in c.owners]
        rows = [r for c in taken for r in c.rows]
        pstate = cat_states([c.pstate for c in taken])
        return _Chunk(cat_states([c.state for c in taken]), pstate, owners, rows)

    def step(self) -> int:
        """Run one stage batch; returns the number of rows it ran (0: nothing was waiting).

        Pipelined (``pipeline``), a step launches the next batch if rows are waiting, then completes the oldest
        batch in flight once two are in flight or nothing else can be launched.
        """
        if not self.pipeline:
            if self.idle:
                return 0
            return self._complete(self._launch())
        launched = 0
        if any(self._depth):
            self._inflight.append(self._launch())
            launched = len(self._inflight[-1].batch)
        if self._inflight and (len(self._inflight) >= 2 or not any(self._depth)):
            return max(self._complete(self._inflight.popleft()), launched)
        return launched

    def _launch(self) -> _Launched:
        """Gather a batch for the picked stage and run it (asynchronously, where the backend's device is)."""
        k = self._pick()
        batch = self._gather(k)
        start = self.clock()
        try:
            out = self.backend.run_stage(k, batch.state, batch.pstate)
        except Exception as err:  # noqa: BLE001 - the batch's requests fail with the error, the engine goes on
            return _Launched(k, batch, start, None, err, None)
        ready = None
        if self.pipeline and out[2].is_cuda and k < self.num_exits - 1:
            # the decisions start for the host now and are waited for alone: reading them on the device later
            # would also wait for the batch launched after this one
            done = torch.empty(out[2].shape, dtype=out[2].dtype, pin_memory=True)
            done.copy_(out[2], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            out = (out[0], out[1], done, out[3])
        return _Launched(k, batch, start, out, None, ready)

    def _decisions(
        self, launched: _Launched, n: int, device: torch.device
    ) -> tuple[int, Tensor | None, Tensor | None, tuple[list[int], list[int]]]:
        """``(finished rows, their positions, the others' positions (on ``device``), both as host lists)``."""
        assert launched.out is not None
        if launched.stage == self.num_exits - 1:
            return n, None, None, ([], [])
        check_row_state(launched.out[3], n, "the exit policy")
        if launched.ready is not None:
            launched.ready.synchronize()
        n_done, done_idx, keep_idx = split_finished(launched.out[2])
        if done_idx is None or keep_idx is None:
            return n_done, None, None, ([], [])
        lists = done_idx.tolist(), keep_idx.tolist()  # read on the host: no second wait
        if done_idx.device != device:
            done_idx, keep_idx = done_idx.to(device, non_blocking=True), keep_idx.to(device, non_blocking=True)
        return n_done, done_idx, keep_idx, lists

    def _complete(self, launched: _Launched) -> int:
        """Wait for a launched batch's exit decisions; answer its finished rows, queue the others."""
        k, batch, start = launched.stage, launched.batch, launched.start
        n = len(batch)
        err = launched.error
        if err is None:
            assert launched.out is not None
            state, prediction, _, pstate = launched.out
            try:
                n_done, done_idx, keep_idx, lists = self._decisions(launched, n, prediction.device)
            except Exception as e:  # noqa: BLE001 - as above
                err = e
        if err is not None:
            elapsed = self.clock() - start
            for owner in {id(o): o for o in batch.owners}.values():
                self._fail(owner, err)
            self._record(k, n, 0, elapsed)
            return n
        end = self.clock()
        elapsed = end - start
        for a, _ in _runs(batch.owners):
            batch.owners[a].compute_s += elapsed
            if k == 0:
                batch.owners[a].t_started = min(batch.owners[a].t_started, end)
        if n_done == n:
            self._finish_rows(batch.owners, batch.rows, k, prediction)
        elif n_done > 0:
            assert done_idx is not None and keep_idx is not None
            done_list, keep_list = lists
            self._finish_rows(
                [batch.owners[i] for i in done_list],
                [batch.rows[i] for i in done_list],
                k,
                prediction.index_select(0, done_idx),
            )
            survivors = _Chunk(
                index_state(state, keep_idx),
                index_state(pstate, keep_idx),
                [batch.owners[i] for i in keep_list],
                [batch.rows[i] for i in keep_list],
            )
            self.queues[k + 1].append(survivors)
            self._depth[k + 1] += len(survivors)
        else:
            self.queues[k + 1].append(_Chunk(state, pstate, batch.owners, batch.rows))
            self._depth[k + 1] += n
        self._record(k, n, n_done, elapsed)
        return n

    def drain(self) -> None:
        """Step until every submitted row is answered."""
        while self.step():
            pass

    # -- answers -------------------------------------------------------------------------------------
    def _record(self, k: int, n: int, finished: int, elapsed: float) -> None:
        if self.on_batch is not None:
            self.on_batch(BatchRecord(stage=k, size=n, finished_rows=finished, compute_s=elapsed))

    def _finish_rows(self, owners: list[Request], rows: list[int], k: int, prediction: Tensor) -> None:
        for a, b in _runs(owners):
            owner = owners[a]
            if owner.done:  # failed earlier: its other rows are dropped
                continue
            owner.parts.append((rows[a:b], k, prediction[a:b]))
            owner.remaining -= b - a
            if owner.remaining == 0:
                self._resolve(owner)

    def _resolve(self, request: Request) -> None:
        parts = request.parts
        if len(parts) == 1:
            logits = parts[0][2]
            exits = [parts[0][1]] * request.n
        else:
            first = parts[0][2]
            logits = first.new_empty((request.n, *first.shape[1:]))
            exits = [0] * request.n
            for rows, k, pred in parts:
                index = torch.tensor(rows, dtype=torch.long)
                logits[index.to(logits.device)] = pred.to(logits.dtype)
                for r in rows:
                    exits[r] = k
        now = self.clock()
        latency = now - request.t_submit
        request.parts = []
        request.result = Result(
            logits=logits,
            exits=exits,
            exit_macs=self._macs,
            queue_ms=1e3 * max(latency - request.compute_s, 0.0),
            compute_ms=1e3 * request.compute_s,
            latency_ms=1e3 * latency,
        )
        if request.callback is not None:
            request.callback(request)

    def _fail(self, request: Request, err: BaseException) -> None:
        if request.done:
            return
        request.error = err
        request.parts = []
        if request.callback is not None:
            request.callback(request)
