"""Export staged models for other runtimes (ONNX).

``stages`` mode (:func:`export_stages`): one ONNX file per stage plus ``manifest.json``, run with real early
exit by :class:`StagesRunner` (onnxruntime) or any server that reads the manifest.
``graph`` mode (:func:`export_graph`): one ONNX graph with per-sample exits inside it (any batch size; thresholds
and temperatures are runtime inputs). ``cond`` mode (:func:`export_cond`): batch 1, nested ``If`` branches, so
onnxruntime runs only the taken branch. Every export is checked against ``run_dynamic`` before it is written.

Typed states cross the stage boundary too: a NamedTuple registered with
:func:`~adaptnn.runtime.state_types.register_state_type` (a ViT's ``TokenState``, DVT's ``CascadeState``) is
recorded by name, its constant fields (``TokenState.prefix``) as range-checked numbers, its tensors as tensors;
token knobs (ToMe, EViT) export, with fixed token counts per stage.

Every threshold rule exports in every mode: confidence, entropy and margin, and the stateful ones (patience, the
averaged and boosted ensembles, learned), whose state travels as tensors and is compacted with the model's. A
rule that cannot be carried (one that starts with a per-sample state, or whose ``step`` does not trace, such as
the learned rule in ``cond`` mode with torch 2.14.1) fails with a :class:`~adaptnn.errors.ConfigError` naming it.
"""

from .cond import export_cond
from .graph import export_graph, policy_thresholds, runtime_policy
from .manifest import MANIFEST_NAME, read_manifest, write_manifest
from .runner import StagesRunner
from .stages import (
    DEFAULT_OPSET,
    ExportMismatchError,
    check_exportable_policy,
    export_stages,
    policy_label,
    verify_export,
)

__all__ = [
    "DEFAULT_OPSET",
    "ExportMismatchError",
    "MANIFEST_NAME",
    "StagesRunner",
    "check_exportable_policy",
    "export_cond",
    "export_graph",
    "export_stages",
    "policy_label",
    "policy_thresholds",
    "read_manifest",
    "runtime_policy",
    "verify_export",
    "write_manifest",
]
