"""The host-side driver of one run: data pipeline, jitted steps, state, meta-learner.

`Trainer(config, dataset, mesh)` builds everything a run trains with (sampler, graph, model,
objective, state, compiled step, meta-learner, device mesh); `Trainer.epoch()` runs one
epoch. Batches of epoch e are a function of (seed, e) only and are sampled on a host
thread while the previous epoch runs, so prefetching, resuming and early stopping never
change them.
"""

from __future__ import annotations

import concurrent.futures
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from maxrec import data as data_lib
from maxrec import graph as graph_lib
from maxrec import meta as meta_lib
from maxrec import metrics, replay, sharding, sparse, spectral
from maxrec.config import Config
from maxrec.models import make_model
from maxrec.objective import init_aux_params, initial_aux_params, make_objective
from maxrec.sampling import Sampler
from maxrec.steps import DenseStep, init_state, make_run_steps


class Trainer:
  """The host-side driver of one run: data pipeline, jitted steps, state, meta-learner.

  Args:
    cfg: the run's configuration.
    ds: the data set (its R_meta must be carved when cfg.aux.weighting == "meta").
    mesh: the device mesh, with `cfg` already `sharding.sharded_config(cfg, mesh)` (as
      `train_and_evaluate` builds both, once); default: made here from --mesh_devices.
  Attributes:
    state: the current `TrainState` (replaced after every epoch).
    meta: the `MetaRunner` with --weighting=meta, else None.
    replay: the replayed `replay.Trajectory` with --weighting=replay [A9], else None.
  """

  def __init__(self, cfg: Config, ds: data_lib.Dataset, mesh=None):
    if mesh is None:
      mesh = sharding.make_mesh(cfg.train.mesh_devices)
      cfg = sharding.sharded_config(cfg, mesh)
    self.cfg, self.ds = cfg, ds
    self.epochs_done = 0
    self._prefetch = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._next = None  # (epoch index, future of its batches)
    self.mesh = None if mesh.size == 1 else mesh
    if self.mesh is not None:
      logging.info("mesh: %s", sharding.describe(self.mesh))
    n_users, n_items = ds.n_users, ds.n_items
    if self.mesh is not None:  # tables padded to a multiple of the device count
      n_users, n_items = sharding.padded(n_users, self.mesh), sharding.padded(n_items, self.mesh)
    self.sampler = Sampler(ds.train, ds.observed, ds.n_users, ds.n_items)
    self.batch_size = cfg.batch_size_for(len(ds.train))
    self.n_batches = self.sampler.num_batches(self.batch_size)
    self.graph = graph_lib.build_graph(ds.train, n_users, n_items)
    self.weights = graph_lib.edge_weights(self.graph)
    self.model = make_model(cfg.model, n_users, n_items)
    self.anchor_caps = None  # sampling checks it: unset while the caps are measured
    self.anchor_caps = self._anchor_caps() if cfg.aux.tasks else None
    self.anchor_overflows = 0
    self.objective = make_objective(self.model, cfg, self.anchor_caps)
    self.replay = None
    if cfg.aux.weighting == "replay":
      self.replay = replay.load_trajectory(cfg.aux.replay_from, self.objective.task_names)
    aux_params = initial_aux_params(cfg)
    lr = cfg.learning_rate
    tx = make_optimizer(cfg, self.n_batches)
    logging.info(
      "training: batch %d (%d steps an epoch), %s at learning rate %g (%s), %s init, "
      "validation every %d epoch(s)",
      self.batch_size,
      self.n_batches,
      cfg.train.optimizer,
      lr,
      cfg.lr_schedule,
      cfg.model.resolved_init,
      cfg.eval_every,
    )
    aux_tx = optax.adam(lr) if cfg.aux.weighting == "uncertainty" else None
    self.state = self._initial_state(tx, aux_params, aux_tx, (n_users, n_items))
    self.sparse_kernel = None  # "native" or "xla" for row-sparse MF
    if cfg.sparse_mf:
      self.sparse_kernel = sparse.resolve_kernel(cfg.train.sparse_kernel, self.mesh is not None)
      logging.info("row-sparse MF step: %s kernel", self.sparse_kernel)
      kind = sparse.SparseStep(
        n_users, cfg.train.l2_reg, lr, cfg.train.optimizer, self.sparse_kernel
      )
      self.state = kind.with_opt_state(self.state)
    else:
      kind = DenseStep(self.objective, tx, aux_tx)
    self._tables = {n_users, n_items, n_users + n_items}
    self.state = self.place(self.state)
    if self.mesh is not None:
      self.graph = sharding.shard_tree(self.graph, self.mesh, set())
      self.weights = sharding.put(self.weights, sharding.replicated(self.mesh))
    self.run_steps = make_run_steps(kind, cfg.train.inject_nan_at_step)
    model, (nu, ni) = self.model, (ds.n_users, ds.n_items)
    self._embed = jax.jit(
      lambda p, g, w: tuple(x[:n] for x, n in zip(model.apply({"params": p}, g, w), (nu, ni)))
    )
    self.meta = None
    if cfg.aux.weighting == "meta":
      self.meta = meta_lib.MetaRunner(
        self.objective, cfg, self.sampler, ds, aux_params, cfg.train.seed, self.n_batches,
        place=self.place_batches,
      )  # fmt: skip

  def _initial_state(self, tx, aux_params, aux_tx, padded: tuple[int, int]):
    """The state at step 0: tables padded to `padded` rows, spectral or random init."""
    cfg, ds = self.cfg, self.ds
    key = jax.random.key(cfg.train.seed)
    true_size = make_model(cfg.model, ds.n_users, ds.n_items)  # the same initial values
    state = init_state(true_size, tx, key, aux_params, aux_tx, pad_to=padded)
    if cfg.model.resolved_init == "spectral":
      params = self._spectral_params(jax.random.fold_in(key, 3))
      params = {k: sharding.pad_rows(params[k], n) for k, n in zip(("user", "item"), padded)}
      state = state.replace(params=params)
    return state

  def _spectral_params(self, key) -> dict:
    """[U, d] and [I, d] ego tables from the top-d singular vectors of R̃ (warm start)."""
    t0 = time.perf_counter()
    ds, m = self.ds, self.cfg.model
    svd = spectral.truncated_svd(ds.train, ds.n_users, ds.n_items, m.embedding_dim, key=key)
    params = spectral.spectral_init(svd, m.embedding_dim, m.resolved_init_std)
    jax.block_until_ready(params)
    logging.info(
      "spectral init: top %d singular values of the normalised interactions %.4f .. %.4f "
      "(largest residual %.1e) in %.1fs",
      m.embedding_dim,
      float(svd.s[0]),
      float(svd.s[-1]),
      float(svd.residual.max()),
      time.perf_counter() - t0,
    )
    return params

  def _anchor_caps(self) -> tuple[int, int]:
    """Static sizes for the in-batch contrastive tasks: 25% above the most distinct users
    and items in the first epoch's batches (and in a few hyper-batches), rounded up to 64.
    In-batch InfoNCE costs the square of this, so padding to the batch size (2048) when
    a batch holds ~800 distinct items would cost several times more."""
    first = self.sample(0)
    self._next = (0, self._prefetch.submit(lambda: first))
    anchors = self.cfg.aux.ssl_anchors or None
    counts = [Sampler.max_unique(sharding.to_host(first), anchors)]
    if self.cfg.aux.weighting == "meta":
      rng = np.random.default_rng([self.cfg.train.seed, 2])
      hyper = self.cfg.meta.hyper_batch_size
      counts += [Sampler.max_unique(self.sampler.sample(rng, hyper), anchors) for _ in range(3)]
    users, items = (max(c[k] for c in counts) for k in (0, 1))
    up = lambda n: -(-int(1.25 * n) // 64) * 64  # noqa: E731
    return up(users), up(items)

  def _check_anchors(self, batches) -> None:
    """Counts batches with more distinct users or items than the tasks hold (their
    largest ids would not be anchors) and warns: it should essentially never happen."""
    if self.anchor_caps is None:
      return
    users, items = Sampler.max_unique(batches, self.cfg.aux.ssl_anchors or None)
    if users > self.anchor_caps[0] or items > self.anchor_caps[1]:
      self.anchor_overflows += 1
      logging.warning(
        "a batch has %d distinct users / %d items, above the contrastive tasks' %d / %d: "
        "some anchors were left out of InfoNCE this epoch",
        users,
        items,
        *self.anchor_caps,
      )

  def sample(self, epoch: int):
    """Epoch `epoch`'s batches: a function of (seed, epoch) only, so prefetching, resuming
    and early stopping never change them."""
    rng = np.random.default_rng([self.cfg.train.seed, 0, epoch])
    batches = self.sampler.epoch(rng, self.batch_size)
    self._check_anchors(batches)
    return self.place_batches(batches)

  def eval_set(self, heldout: np.ndarray, exclude: np.ndarray) -> metrics.EvalSet:
    """The evaluation of `heldout` pairs; on a mesh, each block's users are split across
    the devices (each scores its users against all items)."""
    d = 1 if self.mesh is None else self.mesh.size
    es = metrics.build_eval_set(
      heldout, exclude, self.ds.n_users, self.cfg.train.eval_batch_size, multiple_of=d
    )
    if self.mesh is None:
      return es
    split = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, sharding.AXIS))
    rep = sharding.replicated(self.mesh)
    return es.replace(
      **{k: sharding.put(getattr(es, k), split) for k in ("users", "valid", "n_relevant")},
      **{
        k: sharding.put(getattr(es, k), rep) for k in ("mask_row", "mask_col", "rel_row", "rel_col")
      },
    )

  def place_batches(self, batches: dict) -> dict:
    """Batches on the device(s): split along the batch axis when sharded."""
    if self.mesh is None:
      return jax.device_put(batches)
    return sharding.shard_batches(batches, self.mesh)

  def device_state(self) -> dict:
    """The arrays a checkpoint holds: the train state and the meta state."""
    return {"train": self.state, "meta": self.meta.state if self.meta is not None else {}}

  def host_state(self) -> dict:
    """The host-side counters a checkpoint holds (JSON)."""
    out = {"epochs_done": self.epochs_done}
    if self.meta is not None:
      out["meta"] = self.meta.host_state()
    return out

  def place(self, tree):
    """Row-shards tables (and their optimizer state) on a mesh; a no-op on one device."""
    if self.mesh is None:
      return tree
    return sharding.shard_tree(tree, self.mesh, self._tables)

  def load(self, device: dict, host: dict) -> None:
    """Restores what `device_state` and `host_state` returned."""
    self.state = self.place(device["train"])
    self.epochs_done = host["epochs_done"]
    self._next = None
    if self.meta is not None:
      self.meta.state = self.place(device["meta"])
      self.meta.load_host_state(host["meta"])

  def embeddings(self, params=None):
    """Final (users [U, d], items [I, d]) of `params` (default: the current ones)."""
    params = self.state.params if params is None else params
    return self._embed(params, self.graph, self.weights)

  def epoch(self, on_meta_step=None) -> tuple[dict, dict]:
    """Samples and runs one epoch, in segments cut at meta steps.

    Args:
      on_meta_step: called with each meta step's JSON record.
    Returns:
      (summed loss parts over the epoch's steps, {"epoch_s", "sample_s", "meta_s"}).
    """
    t0 = time.perf_counter()
    e = self.epochs_done
    if self._next is not None and self._next[0] == e:
      batches = self._next[1].result()
    else:
      batches = self.sample(e)
    t_sample = time.perf_counter() - t0
    # Sample the next epoch on a host thread while this one runs (XLA releases the GIL).
    self._next = (e + 1, self._prefetch.submit(self.sample, e + 1))
    n = batches["user"].shape[0]
    state, g, w = self.state, self.graph, self.weights
    if self.replay is not None:  # [A9]: φ frozen at the trajectory's value for this epoch
      phi = init_aux_params(self.cfg.aux.weighting, self.replay.at_epoch(e + 1))
      state = state.replace(aux_params=jax.device_put(phi, state.aux_params.sharding))
    cuts = self.meta.cut_points(int(state.step), n) if self.meta is not None else []
    sums, start, meta_s = None, 0, 0.0
    for stop in sorted(set(cuts) | {n}):  # a meta point may be the epoch's last step
      if stop > start:
        t1 = time.perf_counter()
        state, part = self.run_steps(
          state, g, w, batches, jnp.int32(start), jnp.int32(stop - start)
        )
        if self.meta is not None:
          jax.block_until_ready(state.params)
          self.meta.observe_inner(time.perf_counter() - t1, stop - start)
        sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
      if stop in cuts:
        t1 = time.perf_counter()
        state, record = self.meta.step(state, g, w)
        meta_s += time.perf_counter() - t1
        if on_meta_step is not None:
          on_meta_step(record)
      start = stop
    self.state = state
    self.epochs_done += 1
    jax.block_until_ready(sums)
    return sums, {"epoch_s": time.perf_counter() - t0, "sample_s": t_sample, "meta_s": meta_s}


def make_optimizer(cfg: Config, steps_per_epoch: int) -> optax.GradientTransformation:
  """The embeddings' optimizer: --optimizer at --learning_rate, under --lr_schedule (cosine:
  down to 1% of it over --epochs x `steps_per_epoch` steps)."""
  lr = cfg.learning_rate
  if cfg.lr_schedule == "cosine":
    lr = optax.cosine_decay_schedule(lr, max(cfg.epochs * steps_per_epoch, 1), alpha=0.01)
  return optax.adam(lr) if cfg.train.optimizer == "adam" else optax.sgd(lr)
