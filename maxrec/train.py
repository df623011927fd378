"""Training loop: jitted steps, validation, early stopping, `train_and_evaluate`.

The Flax-examples contract: `train_and_evaluate(config, workdir)` runs one experiment and
writes everything it measured to `workdir`:
  config.json          the resolved configuration
  data_summary.json    what was read, filtered and split
  metrics.jsonl        one JSON object per epoch (losses, timings, validation metrics)
  final_metrics.json   {"best_epoch", "valid", "test", "popularity", ...}
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct

from maxrec import auxiliary, metrics, recommend, sparse
from maxrec import data as data_lib
from maxrec import graph as graph_lib
from maxrec import meta as meta_lib
from maxrec.config import Config
from maxrec.models import make_model
from maxrec.objective import Objective, aux_weights, init_aux_params
from maxrec.runfiles import RunFiles
from maxrec.sampling import Sampler


@struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree.

  Attributes:
    step: scalar int32, optimizer steps taken.
    params: {"user": [U, d], "item": [I, d]} ego embeddings θ.
    opt_state: the inner optimizer's state.
    aux_params: φ, the unconstrained auxiliary weights [K] (traced: changing them never
      retraces a step).
    aux_opt_state: state of φ's optimizer (uncertainty weighting), else None.
    key: PRNG key; step t draws its views from `fold_in(key, t)`.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  aux_params: Any
  aux_opt_state: Any
  key: jax.Array


def make_objective(model, cfg: Config) -> Objective:
  settings = auxiliary.AuxSettings(
    temperature=cfg.aux.ssl_temperature,
    edge_drop=cfg.aux.edge_drop,
    view_layers=cfg.view_layers,
    simgcl_eps=cfg.aux.simgcl_eps,
    kernel=cfg.model.propagation,
  )
  weight_net = None
  if cfg.aux.weighting == "meta" and cfg.meta.weight_net:
    net = meta_lib.WeightNet(len(cfg.aux.tasks), init_weight=cfg.aux.initial_weights[0])
    weight_net = lambda params, feats: net.apply({"params": params}, feats)  # noqa: E731
  return Objective(
    model, cfg.train.l2_reg, cfg.aux.tasks, cfg.aux.weighting, settings, weight_net=weight_net
  )


def run_steps_fn(objective: Objective, tx, aux_tx=None):
  """The pure `run_steps(state, graph, weights, batches, start, count)` (not jitted).

  Runs steps `start .. start+count-1` of an epoch's stacked batches `[n, B]` in one
  `fori_loop` (dynamic trip count, so one compilation serves every segment) and returns
  the new state and the summed loss parts. With `aux_tx` (uncertainty weighting) φ is
  trained jointly with θ.
  """

  def step(state: TrainState, graph, weights, batch):
    key = jax.random.fold_in(state.key, state.step)
    argnums = (0, 1) if aux_tx is not None else 0
    grad_fn = jax.value_and_grad(objective.inner_loss, argnums=argnums, has_aux=True)
    (loss, parts), grads = grad_fn(state.params, state.aux_params, batch, key, graph, weights)
    g_params = grads[0] if aux_tx is not None else grads
    updates, opt_state = tx.update(g_params, state.opt_state, state.params)
    new = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    if aux_tx is not None:
      upd, aux_opt_state = aux_tx.update(grads[1], state.aux_opt_state, state.aux_params)
      new = new.replace(
        aux_params=optax.apply_updates(state.aux_params, upd), aux_opt_state=aux_opt_state
      )
    return new, {"loss": loss, **parts}

  return _loop(step)


def sparse_run_steps_fn(l2_reg: float, learning_rate: float):
  """`run_steps` for MF without auxiliary tasks, updating only the touched rows with lazy
  Adam (`maxrec.sparse`); same signature as `run_steps_fn`'s, graph and weights unused.

  The steps work on one [U + I, 4d] table of (θ, m, v, accumulator) rows, built at the
  start of the call and split back into `params` and `opt_state` at its end."""

  def run_steps(state: TrainState, graph, weights, batches, start, count):
    del graph, weights
    n_users = state.params["user"].shape[0]
    slab = sparse.to_slab(state.params, state.opt_state)
    zero = {"loss": 0.0, "bpr": 0.0, "l2": 0.0}
    sums = jax.tree.map(lambda x: jnp.zeros((), slab.dtype), zero)

    def body(t, carry):
      slab, n, acc = carry
      slab, n, parts = sparse.sparse_mf_step(
        slab, n, _index(batches, t), n_users, l2_reg, learning_rate
      )
      return slab, n, jax.tree.map(jnp.add, acc, parts)

    slab, n, sums = jax.lax.fori_loop(
      start, start + count, body, (slab, state.opt_state.count, sums)
    )
    params, opt = sparse.from_slab(slab, n_users, n)
    return state.replace(step=state.step + count, params=params, opt_state=opt), sums

  return run_steps


def _loop(step):
  """run_steps(state, graph, weights, batches, start, count): `step` in a fori_loop."""

  def run_steps(state, graph, weights, batches, start, count):
    zero = jax.eval_shape(lambda: step(state, graph, weights, _index(batches, 0))[1])
    sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)

    def body(t, carry):
      st, acc = carry
      st, parts = step(st, graph, weights, _index(batches, t))
      return st, jax.tree.map(jnp.add, acc, parts)

    return jax.lax.fori_loop(start, start + count, body, (state, sums))

  return run_steps


def trace_once(fn):
  """Makes a second trace of `fn` an error: a retrace means recompiling mid-run."""
  traces = 0

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    nonlocal traces
    traces += 1
    if traces > 1:
      raise RuntimeError(
        f"{fn.__name__} was traced a second time: an argument changed shape or dtype, "
        "which would recompile the step in the middle of a run."
      )
    return fn(*args, **kwargs)

  return wrapped


def make_run_steps(objective: Objective, tx, aux_tx=None, fn=None):
  """`run_steps_fn` (or `fn`), jitted with its state donated, and compiled at most once."""
  fn = run_steps_fn(objective, tx, aux_tx) if fn is None else fn
  return jax.jit(trace_once(fn), donate_argnums=(0,))


def uses_sparse_updates(cfg: Config) -> bool:
  """MF without auxiliary tasks has a row-sparse gradient: train it with lazy Adam."""
  return cfg.train.sparse_updates and cfg.model.model == "mf" and not cfg.aux.tasks


def _index(batches, t):
  return jax.tree.map(lambda b: jax.lax.dynamic_index_in_dim(b, t, keepdims=False), batches)


def init_state(model, tx, key, aux_params=None, aux_tx=None) -> TrainState:
  init_key, train_key = jax.random.split(key)
  params = model.init_params(init_key)
  if aux_params is None:
    aux_params = jnp.zeros((0,), jnp.float32)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    aux_params=aux_params,
    aux_opt_state=None if aux_tx is None else aux_tx.init(aux_params),
    key=train_key,
  )


def _fmt(d: dict, keys) -> str:
  return " ".join(f"{k}={d[k]:.4f}" for k in keys if k in d)


def train_and_evaluate(config: Config, workdir: str) -> dict:
  """Trains the configured model, selects the best validation epoch, tests it.

  Args:
    config: the run's configuration.
    workdir: output folder (created; must be writable).
  Returns:
    The dict written to `final_metrics.json`.
  Raises:
    ValueError: bad data or configuration, with a message naming the problem.
  """
  t_start = time.perf_counter()
  cfg = config
  files = RunFiles(workdir)
  files.write_json("config.json", cfg.flat())
  ds = data_lib.load_dataset(cfg.data, seed=cfg.train.seed, meta_ratio=cfg.meta_ratio)
  logging.info("%s", data_lib.describe(ds))
  for w in data_lib.warnings(ds):
    logging.warning("%s", w)
  files.write_json("data_summary.json", ds.summary)

  trainer = Trainer(cfg, ds)
  objective, n_batches = trainer.objective, trainer.n_batches
  if trainer.meta is not None:
    logging.info("%s", trainer.meta.describe())

  valid_set = metrics.build_eval_set(ds.valid, ds.observed, ds.n_users, cfg.train.eval_batch_size)
  test_exclude = np.concatenate([ds.observed, ds.valid])
  test_set = metrics.build_eval_set(ds.test, test_exclude, ds.n_users, cfg.train.eval_batch_size)
  logging.info(
    "evaluating %d validation users (%d without validation items excluded), %d test users",
    valid_set.n_users,
    valid_set.n_excluded,
    test_set.n_users,
  )

  ks, select = cfg.train.topk, cfg.train.early_stop_metric
  best = {"epoch": 0, "score": -np.inf, "valid": {}, "params": trainer.state.params, "aux": None}
  bad_evals = 0
  for epoch in range(1, cfg.train.epochs + 1):
    sums, times = trainer.epoch(
      lambda rec, e=epoch: files.append("meta.jsonl", {"epoch": e, **rec})
    )
    t_epoch = times["epoch_s"]
    record = {"epoch": epoch, **{k: float(v) / n_batches for k, v in jax.device_get(sums).items()}}
    if not np.isfinite(record["loss"]):
      raise FloatingPointError(f"epoch {epoch}: the training loss is {record['loss']}.")
    record.update(
      step=int(trainer.state.step),
      **times,
      interactions_per_s=n_batches * cfg.train.batch_size / t_epoch,
      elapsed_s=time.perf_counter() - t_start,
    )
    msg = f"epoch {epoch:3d} | {_fmt(record, ('loss', 'bpr', 'l2', *objective.task_names))}"
    if objective.task_names:
      msg += " | w " + " ".join(f"{k}={record['weight_' + k]:.3g}" for k in objective.task_names)
    msg += f" | {t_epoch:.2f}s ({record['interactions_per_s']:,.0f} interactions/s)"
    if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
      valid = metrics.evaluate(*trainer.embeddings(), valid_set, ks)
      record["valid"] = valid
      msg += f" | valid {_fmt(valid, ('recall@20', 'ndcg@20'))}"
      if valid[select] > best["score"]:
        best.update(epoch=epoch, score=valid[select], valid=valid)
        best["params"] = jax.tree.map(jnp.copy, trainer.state.params)
        best["aux"] = jax.device_get(trainer.state.aux_params)
        bad_evals = 0
      else:
        bad_evals += 1
    logging.info("%s | elapsed %.1fs", msg, record["elapsed_s"])
    files.append("metrics.jsonl", record)
    if bad_evals >= cfg.train.patience:
      logging.info("early stop: %s did not improve for %d validations", select, bad_evals)
      break

  test = metrics.evaluate(*trainer.embeddings(best["params"]), test_set, ks)
  pop_u, pop_i = metrics.popularity_embeddings(ds.observed, ds.n_users, ds.n_items)
  popularity = metrics.evaluate(pop_u, pop_i, test_set, ks)
  final = {
    "best_epoch": best["epoch"],
    "valid": best["valid"],
    "test": test,
    "popularity": popularity,
    "epochs_run": epoch,
    "wall_s": time.perf_counter() - t_start,
  }
  if objective.task_names and not (cfg.aux.weighting == "meta" and cfg.meta.weight_net):
    final.update(_weights_summary(cfg, objective, best["aux"], trainer.state.aux_params))
  if trainer.meta is not None:
    final["meta"] = trainer.meta.summary()
  recommend.save_model(
    os.path.join(workdir, recommend.MODEL_FILE), *trainer.embeddings(best["params"]), ds, cfg.flat()
  )
  files.write_json("final_metrics.json", final)
  files.close()
  logging.info(
    "best epoch %d | test %s | popularity %s%s",
    best["epoch"],
    _fmt(test, ("recall@20", "ndcg@20")),
    _fmt(popularity, ("recall@20", "ndcg@20")),
    "".join(f" | w {k}={v:.3g}" for k, v in final.get("aux_weights", {}).items()),
  )
  return final


def initial_aux_params(cfg: Config):
  """φ at the start: scalar weights, or the [A6] network's parameters."""
  if cfg.aux.weighting == "meta" and cfg.meta.weight_net:
    net = meta_lib.WeightNet(len(cfg.aux.tasks), init_weight=cfg.aux.initial_weights[0])
    return net.init(jax.random.key(cfg.train.seed + 1), jnp.zeros((1, 2)))["params"]
  return init_aux_params(cfg.aux.weighting, cfg.aux.initial_weights)


def _weights_summary(cfg, objective, best_aux, last_aux) -> dict:
  """The auxiliary weights at the selected epoch and at the end."""
  if not objective.task_names or best_aux is None:
    return {}
  names = objective.task_names
  w_best = np.asarray(aux_weights(cfg.aux.weighting, jnp.asarray(best_aux))[0])
  w_last = np.asarray(aux_weights(cfg.aux.weighting, last_aux)[0])
  return {
    "aux_weights": dict(zip(names, w_best.tolist())),
    "aux_weights_final": dict(zip(names, w_last.tolist())),
  }


class Trainer:
  """The host-side driver of one run: data pipeline, jitted steps, state, meta-learner.

  Args:
    cfg: the run's configuration.
    ds: the data set (its R_meta must be carved when cfg.aux.weighting == "meta").
  Attributes:
    state: the current `TrainState` (replaced after every epoch).
    meta: the `MetaRunner` with --weighting=meta, else None.
  """

  def __init__(self, cfg: Config, ds: data_lib.Dataset):
    self.cfg, self.ds = cfg, ds
    self.epochs_done = 0
    self._prefetch = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._next = None  # (epoch index, future of its batches)
    self.sampler = Sampler(ds.train, ds.observed, ds.n_users, ds.n_items)
    self.graph = graph_lib.build_graph(ds.train, ds.n_users, ds.n_items)
    self.weights = graph_lib.edge_weights(self.graph)
    self.model = make_model(cfg.model, ds.n_users, ds.n_items)
    self.objective = make_objective(self.model, cfg)
    aux_params = initial_aux_params(cfg)
    tx = optax.adam(cfg.train.learning_rate)
    aux_tx = optax.adam(cfg.train.learning_rate) if cfg.aux.weighting == "uncertainty" else None
    self.state = init_state(self.model, tx, jax.random.key(cfg.train.seed), aux_params, aux_tx)
    if uses_sparse_updates(cfg):
      self.state = self.state.replace(opt_state=sparse.lazy_adam_init(self.state.params))
      fn = sparse_run_steps_fn(cfg.train.l2_reg, cfg.train.learning_rate)
      self.run_steps = make_run_steps(self.objective, tx, fn=fn)
    else:
      self.run_steps = make_run_steps(self.objective, tx, aux_tx)
    model = self.model
    self._embed = jax.jit(lambda p, g, w: model.apply({"params": p}, g, w))
    self.n_batches = self.sampler.num_batches(cfg.train.batch_size)
    self.meta = None
    if cfg.aux.weighting == "meta":
      self.meta = meta_lib.MetaRunner(
        self.objective, cfg, self.sampler, ds, aux_params, cfg.train.seed, self.n_batches
      )

  def _sample(self, epoch: int):
    """Epoch `epoch`'s batches: a function of (seed, epoch) only, so prefetching, resuming
    and early stopping never change them."""
    rng = np.random.default_rng([self.cfg.train.seed, 0, epoch])
    return jax.device_put(self.sampler.epoch(rng, self.cfg.train.batch_size))

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
      batches = self._sample(e)
    t_sample = time.perf_counter() - t0
    # Sample the next epoch on a host thread while this one runs (XLA releases the GIL).
    self._next = (e + 1, self._prefetch.submit(self._sample, e + 1))
    n = batches["user"].shape[0]
    state, g, w = self.state, self.graph, self.weights
    cuts = self.meta.cut_points(int(state.step), n) if self.meta is not None else []
    sums, start, meta_s = None, 0, 0.0
    for stop in [*cuts, n]:
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
