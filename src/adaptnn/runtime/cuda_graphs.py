"""CUDA graphs for staged models: a stage's many small kernel launches paid as one.

On a GPU, early exit at small and medium batch sizes is *launch-bound*: an eager MSDNet or ResNet stage is
dozens of kernels of a few microseconds each, issued one by one from Python, so skipping the compute of
the samples that left saves almost no time. :class:`GraphedModel` captures each stage (the segments up to
an exit head, then the head) as one CUDA graph per *bucket* of batch sizes (:func:`default_buckets`), and
the full model as one graph per bucket for a fair baseline.

A batch of ``n`` running samples replays the graph of the smallest bucket ``>= n``; its first ``n`` rows hold
the samples and the rows beyond are stale padding. Padding never changes a real row: in eval mode every
layer computes each sample independently (``StagedModel.run_dynamic`` refuses train mode for the same
reason). The stages of one bucket are captured chained (stage k+1 reads the buffer stage k writes), so
when nobody leaves nothing is copied; after a compaction the survivors are gathered into the next stage's
input buffer of their (possibly smaller) bucket.

``run_dynamic`` also captures the *exit decisions* (one small graph per stage and bucket for each policy,
captured on first use): the policy's rule, the writing of finished samples' predictions and exit indices,
and the count of samples still running all happen on the device, so an exit costs the host two graph
launches and reading one integer. Samples are compacted only when they fit a smaller bucket; until then
finished rows ride along (masked) in their bucket. A policy whose rule cannot be captured (it synchronises
or changes shapes) falls back to the per-exit loop of :func:`adaptnn.runtime.execution.dynamic_loop`.

All graphs share one memory pool. That is safe because every buffer is read right after the graph (or the
compaction copy) that produced it, before any other graph replays: a later replay may reuse an earlier
graph's scratch memory, never a buffer still waiting to be read.

On a CPU, or with ``use_graphs=False``, the same buffers and buckets are used and a "replay" calls the
modules and copies their outputs into the buffers: the bookkeeping can be tested without a GPU.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from .execution import EagerStages, dynamic_loop
from .policy import ExitPolicy
from .staged import DynamicOutput, StagedModel, check_policy
from .state import State, copy_rows, index_state, map_state, slice_state, state_tensors

log = logging.getLogger(__name__)

__all__ = ["GraphedModel", "GraphedStages", "PooledGraphStages", "default_buckets"]

# (bucket, index of the last stage run (-1: none yet), running samples)
Handle = tuple[int, int, int]


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of a quarter of the size (multiples of 8) up to ``max_batch``: padding <= ~25%.

    A bucket pads the running samples up to its size, so coarse buckets (powers of two) can cost up to
    twice the survivors' compute at large batches, where compute is what early exit saves.
    """
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b = b * 2 if b < 8 else b + max(8, b // 4 // 8 * 8)
    return [*buckets, max_batch]


class GraphedModel:
    """A :class:`StagedModel` run through CUDA graphs captured at bucketed batch sizes (see the module docstring).

    Args:
        model: the staged model, on the device the graphs are for (eval mode is set).
        example: a few real input samples ``[m, ...]`` on that device, in the dtype and memory format the model
            will get; they fill the buffers at capture (padding rows then hold realistic values).
        buckets: batch sizes to capture (default: :func:`default_buckets` of ``max_batch``).
        max_batch: largest bucket when ``buckets`` is not given; larger batches are run in chunks.
        use_graphs: capture CUDA graphs (default: when ``example`` is on a CUDA device).
        warmup_calls: eager calls per graph before its capture (cuDNN/cuBLAS pick their kernels then).
        speculate: queue the next stage before reading how many samples are still running (see
            :meth:`speculate`); ``None`` (default) decides per stage and bucket from the replay times
            measured after capture.
        speculate_ratio: with ``speculate=None``, speculate where a stage at the bucket costs at most this
            many times the same stage at batch 1 (launch-bound: shrinking the batch would save little).
    """

    def __init__(
        self,
        model: StagedModel,
        example: Tensor,
        *,
        buckets: Sequence[int] | None = None,
        max_batch: int = 256,
        use_graphs: bool | None = None,
        warmup_calls: int = 3,
        speculate: bool | None = None,
        speculate_ratio: float = 3.0,
    ) -> None:
        self.model = model.eval()
        self.use_graphs = example.is_cuda if use_graphs is None else bool(use_graphs)
        if self.use_graphs and not example.is_cuda:
            raise ConfigError("CUDA graphs need the model and the example inputs on a CUDA device")
        self.buckets = sorted(set(int(b) for b in buckets)) if buckets else default_buckets(max_batch)
        if self.buckets[0] < 1:
            raise ConfigError(f"bucket sizes must be >= 1, got {self.buckets}")
        if example.dim() < 1 or example.shape[0] < 1:
            raise InputError("example must hold at least one sample [m, ...]")
        self.sample_shape = tuple(example.shape[1:])
        self.dtype, self.device = example.dtype, example.device
        self.stages = model.stages
        self._channels_last = example.dim() == 4 and example.is_contiguous(memory_format=torch.channels_last)
        self._warmup_calls = warmup_calls
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._graphs: list[Any] = []  # keeps every captured graph alive
        self._x: dict[int, Tensor] = {}
        self._stage_out: dict[tuple[int, int], tuple[State, Tensor]] = {}
        self._stage_replay: dict[tuple[int, int], Callable[[], None]] = {}
        self._full_out: dict[int, Tensor] = {}
        self._full_replay: dict[int, Callable[[], None]] = {}
        self._decisions: dict[str, _Decisions | None] = {}  # per policy (its JSON form); None: not capturable
        with torch.inference_mode():
            for b in self.buckets:
                self._capture_bucket(b, example)
        self._speculate, self._speculate_ratio = speculate, speculate_ratio
        self.stage_ms: dict[tuple[int, int], float] = self._time_stages() if self.use_graphs else {}

    def _time_stages(self, repeats: int = 5) -> dict[tuple[int, int], float]:
        """Median GPU ms of each stage graph's replay, per bucket (inputs as left by the capture)."""
        times: dict[tuple[int, int], float] = {}
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for (b, k), replay in self._stage_replay.items():
            samples = []
            for _ in range(repeats):
                begin.record()
                replay()
                end.record()
                end.synchronize()
                samples.append(begin.elapsed_time(end))
            times[(b, k)] = sorted(samples)[len(samples) // 2]
        return times

    def speculate(self, bucket: int, stage: int) -> bool:
        """Queue ``stage`` on ``bucket`` before reading the count after the stage before it?

        Speculating hides the host's read at each exit (the GPU would otherwise idle for it) but compacts one
        stage later. It pays where a stage costs about the same at any batch size (launch-bound), never at
        batch 1, where nothing can be compacted and a finished sample would run one stage for nothing.
        """
        if bucket == 1:
            return False
        if self._speculate is not None:
            return self._speculate
        here, alone = self.stage_ms.get((bucket, stage)), self.stage_ms.get((self.buckets[0], stage))
        if here is None or alone is None:
            return False
        return here <= self._speculate_ratio * alone

    # -- capture -----------------------------------------------------------------------------------

    def _capture_bucket(self, b: int, example: Tensor) -> None:
        x = example[torch.arange(b, device=example.device) % example.shape[0]].clone()
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self._x[b] = x
        state: State = x
        for k, segs in enumerate(self.stages):

            def stage(k: int = k, segs: range = segs, inp: State = state) -> tuple[State, Tensor]:
                out = inp
                for j in segs:
                    out = self.model.segments[j](out)
                return out, self.model.heads[k](out)

            self._stage_replay[(b, k)], self._stage_out[(b, k)] = self._capture(stage)
            state = self._stage_out[(b, k)][0]
        self._full_replay[b], self._full_out[b] = self._capture(lambda: self.model(x))
        # every buffer now holds finite activations of real samples: stale padding rows stay harmless
        for k in range(len(self.stages)):
            self._stage_replay[(b, k)]()
        self._full_replay[b]()

    def _capture(self, fn: Callable[[], Any], pool: Any = None) -> tuple[Callable[[], None], Any]:
        """``(replay, static outputs)`` of ``fn``: a CUDA graph, or on CPU a call that refills the outputs.

        ``pool``: the memory pool of the graph (default: the one shared by the stage graphs).
        """
        if not self.use_graphs:
            outputs = fn()

            def rerun() -> None:
                copy_rows(outputs, fn())

            return rerun, outputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self._warmup_calls):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool if pool is None else pool):
            outputs = fn()
        self._graphs.append(graph)
        return graph.replay, outputs

    # -- running -----------------------------------------------------------------------------------

    def bucket_for(self, n: int) -> int:
        """The smallest captured bucket holding ``n`` samples."""
        i = bisect.bisect_left(self.buckets, n)
        if i == len(self.buckets):
            raise InputError(f"{n} samples exceed the largest captured bucket ({self.buckets[-1]})")
        return self.buckets[i]

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor batch, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.sample_shape or x.dtype != self.dtype or x.device != self.device:
            raise InputError(
                f"the graphs were captured for batches [n, {', '.join(map(str, self.sample_shape))}] of {self.dtype} "
                f"on {self.device}; got {list(x.shape)} of {x.dtype} on {x.device}"
            )

    def _chunks(self, x: Tensor) -> list[Tensor]:
        top = self.buckets[-1]
        return [x[i : i + top] for i in range(0, x.shape[0], top)]

    def executor(self) -> GraphedStages:
        """The stage executor for :func:`adaptnn.runtime.execution.dynamic_loop` / ``oracle_loop``."""
        return GraphedStages(self)

    def pooled_executor(self) -> PooledGraphStages:
        """The stage executor for rows pooled from many batches (the serving engine's ``TorchBackend``)."""
        return PooledGraphStages(self)

    def __call__(self, x: Tensor) -> Tensor:
        """The full model (one graph per bucket): ``[B, C]`` logits."""
        return self.forward(x)

    def forward(self, x: Tensor) -> Tensor:
        """The full model (one graph per bucket): ``[B, C]`` logits."""
        self._check(x)
        outs = []
        with torch.inference_mode():
            for chunk in self._chunks(x):
                n = chunk.shape[0]
                b = self.bucket_for(n)
                self._x[b][:n].copy_(chunk)
                self._full_replay[b]()
                outs.append(self._full_out[b][:n].clone())
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def run_dynamic(
        self, x: Tensor, policy: ExitPolicy, *, check_finite: bool = True, fused: bool = True
    ) -> DynamicOutput:
        """Real early exit through the graphs; same results as :meth:`StagedModel.run_dynamic`.

        ``fused``: decisions captured as graphs too (see the module docstring); ``False`` runs the generic
        per-exit loop over the stage graphs. A single sample always takes the loop: nothing can be
        compacted, and on an H100 the loop's few eager ops per exit were faster than a second graph launch
        plus an event wait (``benchmarks/results/speed_cuda_h100_graphs_*``).
        """
        self._check(x)
        self.model.check_input(x, check_finite=check_finite)
        check_policy(policy)
        policy.check_num_exits(self.model.num_exits)
        costs = self.model.exit_costs(x)
        decisions = self._decisions_for(policy) if fused and x.shape[0] > 1 else None  # see above: 1 -> loop
        logits, exits = [], []
        with torch.inference_mode():
            for chunk in self._chunks(x):
                if decisions is not None and chunk.shape[0] > 1:
                    out, exit_index = decisions.run(chunk)
                else:
                    out, exit_index = dynamic_loop(self.executor(), chunk, policy, self.model.num_exits)
                logits.append(out)
                exits.append(exit_index)
        exit_index = exits[0] if len(exits) == 1 else torch.cat(exits)
        return DynamicOutput(
            logits=logits[0] if len(logits) == 1 else torch.cat(logits), exit_index=exit_index, macs=costs[exit_index]
        )

    def _decisions_for(self, policy: ExitPolicy) -> _Decisions | None:
        try:  # policies that serialise themselves are keyed by content (edited thresholds -> a new capture)
            key = json.dumps(policy.to_dict(), sort_keys=True, default=str)  # type: ignore[attr-defined]
        except Exception:  # a policy without a JSON form: one capture per object
            key = f"id:{id(policy)}"
        if key not in self._decisions:
            try:
                with torch.inference_mode():
                    self._decisions[key] = _Decisions(self, policy)
            except Exception as err:  # noqa: BLE001 - any capture failure means "use the generic loop"
                log.warning("exit decisions of %s could not be captured (%s); using the per-exit loop", policy, err)
                if self.use_graphs:
                    torch.cuda.synchronize()
                self._decisions[key] = None
        return self._decisions[key]


class _Decisions:
    """Per-bucket device buffers and captured decision steps of one policy (see the module docstring).

    Buffers per bucket b: ``live[b]`` (row still running), ``out[b]``/``exit[b]`` (prediction and exit of
    each row, written when it finishes), ``n_live[b]`` (running rows), the policy state before stage 0 and
    after each stage. The decision step of stage k reads stage k's logits buffer.
    """

    def __init__(self, graphed: GraphedModel, policy: ExitPolicy) -> None:
        self.g, self.policy = graphed, policy
        num_exits = graphed.model.num_exits
        # a pool of their own: the policy state one decision step leaves for the next must survive the stage
        # graph replayed in between, whose scratch memory a shared pool could hand to it
        self._pool = torch.cuda.graph_pool_handle() if graphed.use_graphs else None
        self._counts = torch.zeros(num_exits, dtype=torch.long, pin_memory=graphed.use_graphs)
        self._events = [torch.cuda.Event() for _ in range(num_exits)] if graphed.use_graphs else []
        self.live: dict[int, Tensor] = {}
        self.out: dict[int, Tensor] = {}
        self.exit: dict[int, Tensor] = {}
        self.n_live: dict[int, Tensor] = {}
        self.state0: dict[int, State] = {}
        self.state_out: dict[tuple[int, int], State] = {}
        self.replay: dict[tuple[int, int], Callable[[], None]] = {}
        self.row_ids: dict[int, Tensor] = {}
        for b in graphed.buckets:
            device = graphed.device
            self.row_ids[b] = torch.arange(b, device=device)
            self.live[b] = torch.zeros(b, dtype=torch.bool, device=device)
            self.exit[b] = torch.zeros(b, dtype=torch.long, device=device)
            self.n_live[b] = torch.zeros((), dtype=torch.long, device=device)
            self.state0[b] = policy.init_state(b, device)
            _, prediction, _ = policy.decide(0, graphed._stage_out[(b, 0)][1], policy.init_state(b, device))
            self.out[b] = torch.zeros_like(prediction)
            state = self.state0[b]
            for k in range(num_exits):

                def step(k: int = k, b: int = b, state: State = state) -> State:
                    logits = self.g._stage_out[(b, k)][1]
                    done, prediction, new_state = self.policy.decide(k, logits, state)
                    live = self.live[b]
                    newly = live if k == num_exits - 1 else done & live
                    self.out[b].copy_(torch.where(newly[:, None], prediction.to(self.out[b].dtype), self.out[b]))
                    self.exit[b].masked_fill_(newly, k)
                    live.logical_and_(~newly)
                    self.n_live[b].copy_(live.sum())
                    return new_state

                self.replay[(b, k)], self.state_out[(b, k)] = graphed._capture(step, pool=self._pool)
                state = self.state_out[(b, k)]

    def _enqueue(self, b: int, k: int) -> None:
        """Stage k and its decision on bucket b, then an asynchronous copy of the running count to the host."""
        self.g._stage_replay[(b, k)]()
        self.replay[(b, k)]()
        if self.g.use_graphs:
            self._counts[k].copy_(self.n_live[b], non_blocking=True)
            self._events[k].record()
        else:
            self._counts[k] = self.n_live[b]

    def _count(self, k: int) -> int:
        """Samples still running after stage k (waits for that stage only, not for later queued work)."""
        if self.g.use_graphs:
            self._events[k].synchronize()
        return int(self._counts[k])

    def run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [n, C], exit_index [n])`` of one chunk (at most the largest bucket).

        Where :meth:`GraphedModel.speculate` says so, stage k+1 is queued before the count after stage k
        is read (rows that finished are masked, so an extra stage changes no result): the GPU then does
        not idle at the exit, at the price of compacting one stage later.
        """
        g, num_exits = self.g, self.g.model.num_exits
        n = x.shape[0]
        b = g.bucket_for(n)
        g._x[b][:n].copy_(x)
        torch.lt(self.row_ids[b], n, out=self.live[b])
        copy_rows(self.state0[b], self.policy.init_state(b, g.device))
        rows = None  # original position of each row of the current bucket; None: row i is sample i
        out = self.out[b].new_empty((n, *self.out[b].shape[1:]))
        exit_index = torch.empty(n, dtype=torch.long, device=g.device)
        self._enqueue(b, 0)
        last = k = 0  # last stage queued; stage whose count is read next
        while last < num_exits - 1:
            if last == k and g.speculate(b, k + 1):
                last = k + 1
                self._enqueue(b, last)
                if last == num_exits - 1:
                    break  # the last stage is queued: it finishes everyone still running
            n_live = self._count(k)
            if n_live == 0:
                break  # everyone has finished (a speculative stage ran masked)
            if g.bucket_for(n_live) < b:
                if last > k:  # a later stage already ran on this bucket: compact its survivors
                    n_live = self._count(last)
                    if n_live == 0:
                        break
                nb = g.bucket_for(n_live)
                if nb < b:
                    self._flush(b, n, rows, out, exit_index)
                    keep = self.live[b][:n].nonzero().squeeze(1)
                    src_state = slice_state(g._stage_out[(b, last)][0], n)
                    copy_rows(g._stage_out[(nb, last)][0], index_state(src_state, keep))
                    src_policy = slice_state(self.state_out[(b, last)], n)
                    copy_rows(self.state_out[(nb, last)], index_state(src_policy, keep))
                    rows = keep if rows is None else rows[keep]
                    torch.lt(self.row_ids[nb], n_live, out=self.live[nb])
                    b, n = nb, n_live
            k += 1
            if last < k:  # finished rows ride along, masked, until the survivors fit a smaller bucket
                last = k
                self._enqueue(b, last)
        self._flush(b, n, rows, out, exit_index)
        return out, exit_index

    def _flush(self, b: int, n: int, rows: Tensor | None, out: Tensor, exit_index: Tensor) -> None:
        """Copy the first ``n`` rows' predictions and exits of bucket b to their samples.

        Rows still running carry stale values here; they are overwritten when those rows finish.
        """
        if rows is None:
            out.copy_(self.out[b][:n])
            exit_index.copy_(self.exit[b][:n])
        else:
            out[rows] = self.out[b][:n]
            exit_index[rows] = self.exit[b][:n]


class GraphedStages:
    """Stage executor replaying a :class:`GraphedModel`'s graphs; the handle is ``(bucket, last stage, n)``."""

    def __init__(self, graphed: GraphedModel) -> None:
        self.g = graphed

    def _state(self, handle: Handle) -> State:
        b, k, _ = handle
        return self.g._x[b] if k < 0 else self.g._stage_out[(b, k)][0]

    def start(self, x: Tensor) -> Handle:
        n = x.shape[0]
        b = self.g.bucket_for(n)
        self.g._x[b][:n].copy_(x)
        return b, -1, n

    def run(self, k: int, handle: Handle) -> tuple[Handle, Tensor]:
        b, last, n = handle
        if last != k - 1:
            raise ConfigError(f"stage {k} must follow stage {k - 1}, not {last}")
        self.g._stage_replay[(b, k)]()
        return (b, k, n), self.g._stage_out[(b, k)][1][:n]

    def _move(self, handle: Handle, rows: State, n: int) -> Handle:
        """Put ``rows`` (``n`` samples) at the front of the current stage's buffer of bucket_for(n)."""
        _, k, _ = handle
        nb = self.g.bucket_for(n)
        copy_rows(self._state((nb, k, n)), rows)
        return nb, k, n

    def keep(self, handle: Handle, keep_idx: Tensor) -> Handle:
        rows = index_state(slice_state(self._state(handle), handle[2]), keep_idx)  # a copy: the buffer may be dst
        return self._move(handle, rows, keep_idx.shape[0])

    def prefix(self, handle: Handle, n: int) -> Handle:
        b = handle[0]
        if self.g.bucket_for(n) == b:
            return b, handle[1], n  # the first n rows are already in place
        return self._move(handle, slice_state(self._state(handle), n), n)

    def own(self, prediction: Tensor) -> Tensor:
        return prediction.clone()


class PooledGraphStages(EagerStages):
    """Stage executor over a :class:`GraphedModel` whose handle is a plain state (rows of any origin).

    :class:`GraphedStages` keeps a batch's rows in the captured buffers from stage to stage, so no other rows can
    join them. A serving engine pools the survivors of many requests between stages instead: here each call
    copies its ``n`` rows into the input buffer of stage ``k``'s graph at ``bucket_for(n)``, replays that one
    graph and returns copies of its outputs (the buffers are reused by the next replay). The copies are a few
    device-to-device kernels; what the graph saves is dozens of kernel launches per stage.
    """

    def __init__(self, graphed: GraphedModel) -> None:
        super().__init__(graphed.model)  # start / keep / prefix / own as eager: the handle is a plain state
        self.g = graphed

    def run(self, k: int, handle: State) -> tuple[State, Tensor]:
        tensors = state_tensors(handle)
        if not tensors:
            raise InputError(f"stage {k} got a state without tensors")
        n = tensors[0].shape[0]
        b = self.g.bucket_for(n)
        copy_rows(self.g._x[b] if k == 0 else self.g._stage_out[(b, k - 1)][0], handle)
        self.g._stage_replay[(b, k)]()
        state, logits = self.g._stage_out[(b, k)]
        return map_state(slice_state(state, n), lambda t: t.clone()), logits[:n].clone()
