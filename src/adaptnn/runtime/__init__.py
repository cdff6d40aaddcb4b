"""The runtime: the staged model and the one loop that runs it with real per-sample early exit.

* :class:`StagedModel` (``staged``): segments passing a state, exit heads between them; ``walk`` is the one
  stage walk every tool uses, ``forward_all`` runs everything, ``run_dynamic`` really exits;
* ``execution``: the early-exit loop shared by every stage executor (eager here, CUDA graphs in ``cuda_graphs``);
* ``state``: batch indexing of nested states (compaction); ``policy``: the :class:`ExitPolicy` contract;
* ``cost``: MACs per segment, head and exit (the runtime reports them per sample).

This is the bottom layer: it imports nothing from adaptnn but :mod:`adaptnn.errors`.
"""

from .cost import CostBreakdown, cost_breakdown, count_macs, count_params, exit_macs, heads_share
from .cuda_graphs import GraphedModel, default_buckets
from .execution import EagerStages, StageExecutor, dynamic_loop, oracle_loop, split_finished, stage_segments
from .policy import ExitPolicy
from .staged import DynamicOutput, InputSpec, StagedModel
from .state import State, cat_states, copy_rows, index_state, map_state, slice_state, state_tensors

__all__ = [
    "CostBreakdown",
    "DynamicOutput",
    "EagerStages",
    "ExitPolicy",
    "GraphedModel",
    "InputSpec",
    "StageExecutor",
    "StagedModel",
    "State",
    "cat_states",
    "copy_rows",
    "cost_breakdown",
    "count_macs",
    "count_params",
    "default_buckets",
    "dynamic_loop",
    "exit_macs",
    "heads_share",
    "index_state",
    "map_state",
    "oracle_loop",
    "slice_state",
    "split_finished",
    "stage_segments",
    "state_tensors",
]
