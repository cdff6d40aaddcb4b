"""Model families (one module each), the registry/factory over their named variants, and checkpoint loading.

The adapters (:mod:`adaptnn.adapters`, a layer above) register their ``timm_staged``/``torchvision_staged``/
``hf_staged`` factories here when ``adaptnn`` is imported; this package never imports them.
"""

from . import efficientnet_lite, elastic_cnn, elastic_vit, msdnet, multi_exit_cnn, skip_cnn, vit  # noqa: F401  (registers the variants)
from ._builder import load_model
from ._registry import (
    CheckpointArg,
    checkpoint_args,
    checkpoint_kwargs,
    create_model,
    declare_checkpoint_args,
    list_models,
    model_accepts,
    model_spec,
    register_model,
    resolve_model_name,
)

# The presets forward **kwargs to their family's builder: a checkpoint may set that builder's (typed) arguments.
# All are plain architecture numbers and names, so they build on the meta device for the shape check on load.
for _name in list_models("mecnn_*"):
    declare_checkpoint_args(_name, args_like=multi_exit_cnn.multi_exit_cnn, build_on_meta=True)
# MSDNet lays out blocks x step layers in Python before building modules: bound those from a header.
_MSDNET_LAYOUT = {k: CheckpointArg(bounds=(0, 100)) for k in ("n_blocks", "step", "base")}
for _name in list_models("msdnet_*"):
    declare_checkpoint_args(_name, args_like=msdnet.msdnet, checkpoint_args=_MSDNET_LAYOUT, build_on_meta=True)
for _name in list_models("vit_*_conv_*"):
    declare_checkpoint_args(_name, args_like=vit.vit_staged, build_on_meta=True)
for _name in list_models("dvt_*"):
    declare_checkpoint_args(_name, args_like=vit.dvt_staged, build_on_meta=True)
del _name

__all__ = [
    "CheckpointArg",
    "checkpoint_args",
    "checkpoint_kwargs",
    "create_model",
    "declare_checkpoint_args",
    "list_models",
    "load_model",
    "model_accepts",
    "model_spec",
    "register_model",
    "resolve_model_name",
]
