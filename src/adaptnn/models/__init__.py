"""Model families (one module each), the registry/factory over their named variants, and checkpoint loading.

The adapters (:mod:`adaptnn.adapters`, a layer above) register their ``timm_staged``/``torchvision_staged``/
``hf_staged`` factories here when ``adaptnn`` is imported; this package never imports them.
"""

from . import efficientnet_lite, msdnet, multi_exit_cnn  # noqa: F401  (registers the variants)
from ._builder import load_model
from ._registry import create_model, list_models, model_accepts, model_spec, register_model, resolve_model_name

__all__ = [
    "create_model",
    "list_models",
    "load_model",
    "model_accepts",
    "model_spec",
    "register_model",
    "resolve_model_name",
]
