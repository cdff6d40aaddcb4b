"""Adapters: exits for models from timm, torchvision and Hugging Face transformers.

Each adapter returns a :class:`~adaptnn.staged.StagedModel` whose last exit is the original model's classifier
(same logits, same weights) and whose earlier exits are new heads. timm and transformers are optional
dependencies, imported only when an adapter that needs them is called.
"""

from .hf import from_hf, hf_staged, wrap_hf
from .timm import from_timm, timm_staged, wrap_timm
from .torchvision import from_torchvision, torchvision_staged, wrap_torchvision

__all__ = [
    "from_hf",
    "hf_staged",
    "wrap_hf",
    "from_timm",
    "from_torchvision",
    "timm_staged",
    "torchvision_staged",
    "wrap_timm",
    "wrap_torchvision",
]
