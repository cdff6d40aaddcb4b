"""Files adaptnn writes and reads: atomic writes, strict JSON, safetensors checkpoints with a JSON header.

Everything read back from disk is treated as data, never as code.
"""

from .atomic import atomic_write_bytes, atomic_write_text
from .checkpoint import Checkpoint, load_checkpoint, load_weights, pack_tensors, save_checkpoint, unpack_tensors
from .jsonfile import to_jsonable, write_json

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "Checkpoint",
    "load_checkpoint",
    "load_weights",
    "pack_tensors",
    "save_checkpoint",
    "unpack_tensors",
    "to_jsonable",
    "write_json",
]
