"""Adapters: exits for models from timm, torchvision and Hugging Face transformers.

Each adapter returns a :class:`~adaptnn.runtime.StagedModel` whose last exit is the original model's classifier
(same logits, same weights; checked when the model is wrapped, by
:func:`~adaptnn.adapters._common.check_last_exit`) and whose earlier exits are new heads. ``exits=`` has one
meaning and one default (``"stages"``) in every adapter: :func:`adaptnn.adapters._common.resolve_exits`. timm and
transformers are optional dependencies, imported only when an adapter that needs them is called.
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
