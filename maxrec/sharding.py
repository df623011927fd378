"""Data and model parallelism with JAX's SPMD partitioner (`jax.sharding`).

One 1-D device mesh, axis "data":
  - embedding tables and their optimizer state are sharded by rows (each device holds
    1/D of the users and 1/D of the items);
  - each batch of triples is split across devices;
  - everything else (graph structure, auxiliary weights, scalars) is replicated.
XLA partitions the jitted steps, the hypergradient (its Hessian-vector products and CG dot
products become sharded computations with all-reduces) and the evaluation from these
input shardings.

Row counts must divide by D, so tables are padded with zero rows that no batch, edge or
anchor ever references (they stay zero and never change a metric). Arrays are placed with
`jax.make_array_from_callback`, which also works when several hosts each hold the same
host-side copy (multi-host runs: call `jax.distributed.initialize()` first; every host
runs the same program with the same seed, so their host copies agree).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (0: all devices).

  Raises:
    ValueError: more devices asked for than exist.
  """
  devices = jax.devices()
  n = len(devices) if num_devices == 0 else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(
      f"--mesh_devices={num_devices}: {len(devices)} device(s) available "
      f"({devices[0].platform}); use 0 for all of them."
    )
  return Mesh(np.asarray(devices[:n]), (AXIS,))


def padded(n: int, mesh: Mesh) -> int:
  """n rounded up to a multiple of the mesh size."""
  d = mesh.size
  return -(-n // d) * d


def rows(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put(x, sharding: NamedSharding) -> jax.Array:
  """Places a host or device array with `sharding` (multi-host safe)."""
  if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
    data = put(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(tree):
  """NumPy copies of a pytree's arrays. An array that spans several processes is gathered
  from all of them, so every process must call this together (a collective)."""

  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return jax.device_get(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(get, tree)


def is_primary() -> bool:
  """True on the process that writes files (process 0; the only one on a single host)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op on a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def pad_rows(x: jax.Array, n: int) -> jax.Array:
  """Zero rows appended to reach `n` rows."""
  return x if x.shape[0] == n else jnp.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def shard_tree(tree, mesh: Mesh, table_rows: set[int]):
  """Row-shards every array whose leading dimension is a table size; replicates the rest."""

  def place(x):
    if not hasattr(x, "shape"):
      return x
    if x.ndim >= 1 and x.shape[0] in table_rows:
      return put(x, rows(mesh))
    return put(x, replicated(mesh))

  return jax.tree.map(place, tree)


def shard_batches(batches: dict, mesh: Mesh) -> dict:
  """[n_batches, B] (or [B]) arrays split across devices along B; a meta batch's "seen"
  rows ([B, W], each user's training items) split along B too."""

  def spec(key, x):
    if key == "seen":
      return NamedSharding(mesh, P(AXIS, None))
    return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), AXIS))

  return {k: put(v, spec(k, np.asarray(v))) for k, v in batches.items()}


def sharded_config(cfg, mesh: Mesh):
  """The configuration to train with on `mesh`: unchanged on one device; on D > 1 devices
  batch sizes must split evenly, and the graph product uses the `segment` kernel, which
  XLA can partition.

  Raises:
    ValueError: a batch size that D does not divide.
  """
  d = mesh.size
  if d == 1:
    return cfg
  sizes = {"batch_size": cfg.train.batch_size}
  sizes.update({k: cfg.flat()[k] for k in ("hyper_batch_size", "meta_batch_size")})
  for name, value in sizes.items():  # an automatic batch size is a multiple of 1024
    if value is not None and value % d:
      raise ValueError(f"--{name}={value} must be a multiple of the {d} devices of the mesh.")
  if cfg.model.propagation != "segment":
    logging.info("sharded over %d devices: using --propagation=segment", d)
    cfg = cfg.replace(propagation="segment")
  return cfg


def describe(mesh: Mesh) -> str:
  d = mesh.devices.ravel()
  return f"{mesh.size} x {d[0].platform} device(s) on {jax.process_count()} process(es)"
