"""Atomic checkpoints of a run, the last N kept, for exact resumption (`--resume`).

A checkpoint is one msgpack file (Flax serialization) under `<workdir>/checkpoints/`,
named by the epoch it follows. It is written to a temporary name, flushed to disk and then
renamed, so a process killed while saving leaves the previous checkpoints intact and never
a truncated file under a checkpoint's name.

Multi-host runs: arrays that span several processes are gathered (every process calls
`save` together), process 0 writes the file, and all wait for it before going on. The work
directory must be shared by the hosts (a network file system); every process reads the
same file on `restore` and places its own shards from it.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from flax import serialization

from maxrec import sharding

DIR = "checkpoints"
_NAME = re.compile(r"^ckpt_(\d{6})\.msgpack$")


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  """PRNG key arrays -> their raw uint32 data (msgpack cannot hold key dtypes)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree, template):
  return jax.tree.map(lambda x, t: jax.random.wrap_key_data(x) if _is_key(t) else x, tree, template)


def list_checkpoints(workdir: str) -> list[tuple[int, str]]:
  """(epoch, path) of the complete checkpoints in `workdir`, oldest first."""
  folder = os.path.join(workdir, DIR)
  if not os.path.isdir(folder):
    return []
  found = [
    (int(m.group(1)), os.path.join(folder, n)) for n in os.listdir(folder) if (m := _NAME.match(n))
  ]
  return sorted(found)


def save(workdir: str, epoch: int, payload, keep: int) -> str:
  """Writes `payload` (a pytree of arrays, numbers and dicts) as the checkpoint of `epoch`,
  atomically, then deletes all but the newest `keep` checkpoints."""
  folder = os.path.join(workdir, DIR)
  path = os.path.join(folder, f"ckpt_{epoch:06d}.msgpack")
  host = sharding.to_host(_keys_to_data(payload))  # a collective on several processes
  if sharding.is_primary():
    _write(folder, path, serialization.msgpack_serialize(serialization.to_state_dict(host)))
    for _, old in list_checkpoints(workdir)[:-keep]:
      os.remove(old)
  sharding.barrier(f"checkpoint {epoch}")  # nobody goes on before the file exists
  return path


def _write(folder: str, path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically and durably (temporary name, fsync, rename)."""
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  dir_fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(dir_fd)  # make the rename itself durable
  finally:
    os.close(dir_fd)


def restore(path: str, template):
  """Reads a checkpoint into the structure of `template` (e.g. a freshly built state)."""
  with open(path, "rb") as f:
    state_dict = serialization.msgpack_restore(f.read())
  restored = serialization.from_state_dict(_keys_to_data(template), state_dict)
  restored = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, np.ndarray) else x, restored)
  want = jax.tree_util.tree_leaves_with_path(_keys_to_data(template))
  for (where, a), b in zip(want, jax.tree.leaves(restored)):
    if np.shape(a) != np.shape(b):
      raise ValueError(
        f"{path}: {jax.tree_util.keystr(where)} has shape {np.shape(b)}, but this run "
        f"expects {np.shape(a)}. The checkpoint was written by another configuration or "
        "MAXRec version; resume it with that version, or start a fresh --workdir."
      )
  return _data_to_keys(restored, template)
