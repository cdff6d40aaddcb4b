"""Files adaptnn writes and reads: atomic writes, strict JSON, bounded YAML, safetensors checkpoints with a JSON
header, and the lock that gives a run directory one writer at a time.

Everything read back from disk is treated as data, never as code.
"""

from .atomic import atomic_write_bytes, atomic_write_text, exchange_dirs, fsync_dir, sweep_temp_files
from .checkpoint import Checkpoint, load_checkpoint, load_weights, pack_tensors, save_checkpoint, unpack_tensors
from .jsonfile import to_jsonable, write_json
from .lock import LOCK_NAME, RunLock, RunLockedError, lock_holder
from .yamlfile import MAX_BYTES, check_yaml_text, load_yaml_text, read_yaml, require_mapping

__all__ = [
    "LOCK_NAME",
    "RunLock",
    "RunLockedError",
    "atomic_write_bytes",
    "atomic_write_text",
    "exchange_dirs",
    "fsync_dir",
    "lock_holder",
    "sweep_temp_files",
    "Checkpoint",
    "load_checkpoint",
    "load_weights",
    "pack_tensors",
    "save_checkpoint",
    "unpack_tensors",
    "to_jsonable",
    "write_json",
    "MAX_BYTES",
    "check_yaml_text",
    "load_yaml_text",
    "read_yaml",
    "require_mapping",
]
