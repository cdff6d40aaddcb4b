"""Export staged models for other runtimes (ONNX).

``stages`` mode (:func:`export_stages`): one ONNX file per stage plus ``manifest.json``, run with real early
exit by :class:`StagesRunner` (onnxruntime) or any server that reads the manifest.
``graph`` mode (:func:`export_graph`): one ONNX graph with per-sample exits inside it (any batch size; thresholds
and temperatures are runtime inputs). ``cond`` mode (:func:`export_cond`): batch 1, nested ``If`` branches, so
onnxruntime runs only the taken branch. Every export is checked against ``run_dynamic`` before it is written.
"""

from .cond import export_cond
from .graph import export_graph, exportable_score, policy_thresholds
from .manifest import MANIFEST_NAME, read_manifest, write_manifest
from .runner import StagesRunner
from .stages import DEFAULT_OPSET, ExportMismatchError, check_exportable_policy, export_stages, verify_export

__all__ = [
    "DEFAULT_OPSET",
    "ExportMismatchError",
    "MANIFEST_NAME",
    "StagesRunner",
    "check_exportable_policy",
    "export_cond",
    "export_graph",
    "export_stages",
    "exportable_score",
    "policy_thresholds",
    "read_manifest",
    "verify_export",
    "write_manifest",
]
