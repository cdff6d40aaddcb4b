"""Model families (one module each) and the registry/factory over their named variants."""

from .. import adapters  # noqa: F401  (registers timm_staged, torchvision_staged, hf_staged)
from . import efficientnet_lite, msdnet, multi_exit_cnn  # noqa: F401  (registers the variants)
from ._registry import create_model, list_models, model_accepts, model_spec, register_model, resolve_model_name

__all__ = ["create_model", "list_models", "model_accepts", "model_spec", "register_model", "resolve_model_name"]
