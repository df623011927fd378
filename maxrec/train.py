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
import dataclasses
import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct

from maxrec import auxiliary, checkpoint, metrics, recommend, sharding, sparse
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
    bad_steps: int32 count of steps skipped for a non-finite loss or gradient.
    first_bad_step: int32, the first such step (-1 if none).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  aux_params: Any
  aux_opt_state: Any
  key: jax.Array
  bad_steps: jax.Array
  first_bad_step: jax.Array


def _nan_hook(step, inject_at: int):
  """Test hook: a factor that is NaN at global step `inject_at` (>= 0) and 1 otherwise."""
  if inject_at < 0:
    return 1.0
  return jnp.where(step == inject_at, jnp.nan, 1.0)


def _guard(state: TrainState, new: TrainState, ok, parts) -> tuple[TrainState, dict]:
  """Keeps `new` if the step was finite; else keeps `state` (one step later) and counts it.
  The loss parts of a skipped step are zeroed and `good` (0/1) lets epochs average."""
  chosen = jax.lax.cond(ok, lambda: new, lambda: state.replace(step=state.step + 1))
  bad = chosen.bad_steps + jnp.where(ok, 0, 1)
  first = jnp.where(~ok & (chosen.first_bad_step < 0), state.step, chosen.first_bad_step)
  parts = jax.tree.map(lambda x: jnp.where(ok, x, 0.0), parts)
  return chosen.replace(bad_steps=bad, first_bad_step=first), {
    **parts,
    "good": ok.astype(jnp.float32),
  }


def _finite(loss, grads) -> jax.Array:
  return jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))


def make_objective(model, cfg: Config, anchor_caps: tuple[int, int] | None = None) -> Objective:
  """The run's objective; `anchor_caps` bounds the distinct users and items per batch that
  the contrastive tasks hold (default: the batch size)."""
  settings = auxiliary.AuxSettings(
    temperature=cfg.aux.ssl_temperature,
    edge_drop=cfg.aux.edge_drop,
    view_layers=cfg.view_layers,
    simgcl_eps=cfg.aux.simgcl_eps,
    kernel=cfg.model.propagation,
    max_users=None if anchor_caps is None else anchor_caps[0],
    max_items=None if anchor_caps is None else anchor_caps[1],
  )
  weight_net = None
  if cfg.aux.weighting == "meta" and cfg.meta.weight_net:
    net = meta_lib.WeightNet(len(cfg.aux.tasks), init_weight=cfg.aux.initial_weights[0])
    weight_net = lambda params, feats: net.apply({"params": params}, feats)  # noqa: E731
  return Objective(
    model, cfg.train.l2_reg, cfg.aux.tasks, cfg.aux.weighting, settings, weight_net=weight_net
  )


def run_steps_fn(objective: Objective, tx, aux_tx=None, inject_nan_at: int = -1):
  """The pure `run_steps(state, graph, weights, batches, start, count)` (not jitted).

  Runs steps `start .. start+count-1` of an epoch's stacked batches `[n, B]` in one
  `fori_loop` (dynamic trip count, so one compilation serves every segment) and returns
  the new state and the summed loss parts. With `aux_tx` (uncertainty weighting) φ is
  trained jointly with θ. A step whose loss or gradient is not finite is skipped and
  counted (`TrainState.bad_steps`); `inject_nan_at` is a test hook.
  """

  def loss_fn(params, aux_params, batch, key, graph, weights, step):
    loss, parts = objective.inner_loss(params, aux_params, batch, key, graph, weights)
    return loss * _nan_hook(step, inject_nan_at), parts

  def step(state: TrainState, graph, weights, batch):
    key = jax.random.fold_in(state.key, state.step)
    argnums = (0, 1) if aux_tx is not None else 0
    grad_fn = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=True)
    (loss, parts), grads = grad_fn(
      state.params, state.aux_params, batch, key, graph, weights, state.step
    )
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
    return _guard(state, new, _finite(loss, grads), {"loss": loss, **parts})

  return _loop(step)


def sparse_run_steps_fn(l2_reg: float, learning_rate: float, inject_nan_at: int = -1):
  """`run_steps` for MF without auxiliary tasks, updating only the touched rows with lazy
  Adam (`maxrec.sparse`); same signature as `run_steps_fn`'s, graph and weights unused.

  The steps work on one [U + I, 4d] table of (θ, m, v, accumulator) rows, built at the
  start of the call and split back into `params` and `opt_state` at its end."""

  def run_steps(state: TrainState, graph, weights, batches, start, count):
    del graph, weights
    n_users = state.params["user"].shape[0]
    slab = sparse.to_slab(state.params, state.opt_state)
    zero = {"loss": 0.0, "bpr": 0.0, "l2": 0.0, "good": 0.0}
    sums = jax.tree.map(lambda x: jnp.zeros((), slab.dtype), zero)
    step0 = state.step - start

    def body(t, carry):
      slab, n, bad, first, acc = carry
      scale = _nan_hook(step0 + t, inject_nan_at)
      slab, n, parts, ok = sparse.sparse_mf_step(
        slab, n, _index(batches, t), n_users, l2_reg, learning_rate, scale
      )
      first = jnp.where(~ok & (first < 0), step0 + t, first)
      parts = {
        **jax.tree.map(lambda x: jnp.where(ok, x, 0.0), parts),
        "good": ok.astype(slab.dtype),
      }
      return slab, n, bad + jnp.where(ok, 0, 1), first, jax.tree.map(jnp.add, acc, parts)

    init = (slab, state.opt_state.count, state.bad_steps, state.first_bad_step, sums)
    slab, n, bad, first, sums = jax.lax.fori_loop(start, start + count, body, init)
    params, opt = sparse.from_slab(slab, n_users, n)
    new = state.replace(step=state.step + count, params=params, opt_state=opt)
    return new.replace(bad_steps=bad, first_bad_step=first), sums

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


def init_state(model, tx, key, aux_params=None, aux_tx=None, pad_to=None) -> TrainState:
  """A fresh state; `pad_to=(users, items)` appends zero rows to the initial tables (the
  values of the real rows do not depend on the padding)."""
  init_key, train_key = jax.random.split(key)
  params = model.init_params(init_key)
  if pad_to is not None:
    params = {k: sharding.pad_rows(params[k], n) for k, n in zip(("user", "item"), pad_to)}
  if aux_params is None:
    aux_params = jnp.zeros((0,), jnp.float32)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    aux_params=aux_params,
    aux_opt_state=None if aux_tx is None else aux_tx.init(aux_params),
    key=train_key,
    bad_steps=jnp.zeros((), jnp.int32),
    first_bad_step=jnp.full((), -1, jnp.int32),
  )


def _fmt(d: dict, keys) -> str:
  return " ".join(f"{k}={d[k]:.4f}" for k in keys if k in d)


@dataclasses.dataclass
class Progress:
  """What the epoch loop carries besides the trainer: model selection and time."""

  epoch: int = 0  # epochs completed
  best_epoch: int = 0
  best_score: float = -np.inf
  best_valid: dict = dataclasses.field(default_factory=dict)
  best_params: Any = None
  best_aux: Any = None
  bad_evals: int = 0
  elapsed_s: float = 0.0  # wall time of the run's earlier sessions (resumption)


# Config fields a resumed run may change: they do not affect what was already trained.
RESUMABLE_CHANGES = ("epochs", "patience", "checkpoint_every", "keep_checkpoints")


def _check_resumable(files: RunFiles, cfg: Config) -> None:
  if not files.exists("config.json"):
    raise ValueError(f"--resume: {files.workdir} holds no run to resume (no config.json).")
  before = files.read_json("config.json")
  now = json.loads(json.dumps(cfg.flat()))  # tuples -> lists, as on disk
  changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k])
  if changed:
    details = ", ".join(f"--{k}={before.get(k)!r} -> {now[k]!r}" for k in changed)
    raise ValueError(f"--resume: the configuration differs from the run's own ({details}).")


def _save_checkpoint(files: RunFiles, trainer: Trainer, p: Progress, cfg: Config) -> None:
  host = dataclasses.asdict(p) | {"best_params": None, "best_aux": None}
  host.update(trainer.host_state())
  payload = {
    "trainer": trainer.device_state(),
    "best_params": p.best_params,
    "best_aux": p.best_aux,
    "host": json.dumps(host),
  }
  checkpoint.save(files.workdir, p.epoch, payload, cfg.train.keep_checkpoints)


def _restore(files: RunFiles, trainer: Trainer) -> Progress:
  """The latest checkpoint into `trainer`; a fresh Progress when there is none."""
  found = checkpoint.list_checkpoints(files.workdir)
  if not found:
    logging.warning("--resume: no checkpoint in %s; starting from the beginning", files.workdir)
    return Progress(best_params=trainer.state.params, best_aux=trainer.state.aux_params)
  epoch, path = found[-1]
  template = {
    "trainer": trainer.device_state(),
    "best_params": trainer.state.params,
    "best_aux": trainer.state.aux_params,
    "host": "",
  }
  payload = checkpoint.restore(path, template)
  host = json.loads(payload["host"])
  trainer.load(payload["trainer"], host)
  p = Progress(**{k: v for k, v in host.items() if k in Progress.__dataclass_fields__})
  p.best_params, p.best_aux = payload["best_params"], payload["best_aux"]
  for name in ("metrics.jsonl", "meta.jsonl"):
    files.truncate(name, epoch)
  logging.info("resumed from %s: epoch %d, best epoch %d", path, epoch, p.best_epoch)
  return p


def _check_disk(files: RunFiles, trainer: Trainer, cfg: Config) -> None:
  """Fails at start, not after hours, when the work directory cannot hold the checkpoints."""
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.device_state()))
  need = (cfg.train.keep_checkpoints + 1) * 2 * state_bytes + (16 << 20)
  if files.free_bytes() < need:
    raise ValueError(
      f"--workdir={files.workdir} has {files.free_bytes() >> 20} MiB free, but the run needs "
      f"about {need >> 20} MiB for {cfg.train.keep_checkpoints} checkpoint(s); free space or "
      "lower --keep_checkpoints."
    )


def train_and_evaluate(config: Config, workdir: str, resume: bool = False) -> dict:
  """Trains the configured model, selects the best validation epoch, tests it.

  Checkpoints are written every --checkpoint_every epochs; with `resume`, an interrupted
  run continues from its latest checkpoint and ends exactly as an uninterrupted run.

  Args:
    config: the run's configuration.
    workdir: output folder (created; must be writable).
    resume: continue the run in `workdir`.
  Returns:
    The dict written to `final_metrics.json`.
  Raises:
    ValueError: bad data or configuration, with a message naming the problem.
    FloatingPointError: a non-finite step with --on_nonfinite=stop.
  """
  t_start = time.perf_counter()
  cfg = config
  mesh = sharding.make_mesh(cfg.train.mesh_devices)  # flags first: no work on a bad mesh
  if mesh.size > 1:
    _sharded_config(cfg, mesh)
  files = RunFiles(workdir, resume=resume)
  if resume:
    _check_resumable(files, cfg)
    if files.exists("final_metrics.json"):
      logging.info("%s already finished; nothing to resume", workdir)
      return files.read_json("final_metrics.json")
  files.write_json("config.json", cfg.flat())
  ds = data_lib.load_dataset(cfg.data, seed=cfg.train.seed, meta_ratio=cfg.meta_ratio)
  logging.info("%s", data_lib.describe(ds))
  for w in data_lib.warnings(ds):
    logging.warning("%s", w)
  files.write_json("data_summary.json", ds.summary)

  trainer = Trainer(cfg, ds)
  objective, n_batches = trainer.objective, trainer.n_batches
  _check_disk(files, trainer, cfg)
  for w in config_warnings(cfg, n_batches):
    logging.warning("%s", w)
  if trainer.meta is not None:
    logging.info("%s", trainer.meta.describe())
  if resume:
    prog = _restore(files, trainer)
  else:
    prog = Progress(best_params=trainer.state.params, best_aux=trainer.state.aux_params)

  valid_set = trainer.eval_set(ds.valid, ds.observed)
  test_set = trainer.eval_set(ds.test, np.concatenate([ds.observed, ds.valid]))
  logging.info(
    "evaluating %d validation users (%d without validation items excluded), %d test users",
    valid_set.n_users,
    valid_set.n_excluded,
    test_set.n_users,
  )

  ks, select = cfg.train.topk, cfg.train.early_stop_metric
  while prog.epoch < cfg.train.epochs and prog.bad_evals < cfg.train.patience:
    epoch = prog.epoch + 1
    sums, times = trainer.epoch(
      lambda rec, e=epoch: files.append("meta.jsonl", {"epoch": e, **rec})
    )
    t_epoch = times["epoch_s"]
    sums = jax.device_get(sums)
    good = float(sums.pop("good"))
    record = {"epoch": epoch, **{k: float(v) / max(good, 1.0) for k, v in sums.items()}}
    record["skipped_steps"] = int(n_batches - good)
    if record["skipped_steps"]:
      first = int(trainer.state.first_bad_step)
      logging.warning(
        "epoch %d: %d step(s) skipped for a non-finite loss or gradient (first at step %d; "
        "%d in the run so far)",
        epoch,
        record["skipped_steps"],
        first,
        int(trainer.state.bad_steps),
      )
      if cfg.train.on_nonfinite == "stop":
        files.append("metrics.jsonl", record)
        raise FloatingPointError(
          f"non-finite loss or gradient at step {first} (epoch {epoch}); stopped as "
          "--on_nonfinite=stop asks. The last good checkpoint is kept; rerun with --resume "
          "after fixing the cause, or use --on_nonfinite=skip."
        )
    record.update(
      step=int(trainer.state.step),
      **times,
      interactions_per_s=n_batches * cfg.train.batch_size / t_epoch,
      elapsed_s=prog.elapsed_s + time.perf_counter() - t_start,
    )
    msg = f"epoch {epoch:3d} | {_fmt(record, ('loss', 'bpr', 'l2', *objective.task_names))}"
    if objective.task_names:
      msg += " | w " + " ".join(f"{k}={record['weight_' + k]:.3g}" for k in objective.task_names)
    msg += f" | {t_epoch:.2f}s ({record['interactions_per_s']:,.0f} interactions/s)"
    prog.epoch = epoch
    if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
      valid = metrics.evaluate(*trainer.embeddings(), valid_set, ks)
      record["valid"] = valid
      msg += f" | valid {_fmt(valid, ('recall@20', 'ndcg@20'))}"
      if valid[select] > prog.best_score:
        prog.best_epoch, prog.best_score, prog.best_valid = epoch, valid[select], valid
        prog.best_params = jax.tree.map(jnp.copy, trainer.state.params)
        prog.best_aux = jax.tree.map(jnp.copy, trainer.state.aux_params)
        prog.bad_evals = 0
      else:
        prog.bad_evals += 1
    logging.info("%s | elapsed %.1fs", msg, record["elapsed_s"])
    files.append("metrics.jsonl", record)
    if prog.bad_evals >= cfg.train.patience:
      logging.info("early stop: %s did not improve for %d validations", select, prog.bad_evals)
    if epoch % cfg.train.checkpoint_every == 0:
      saved_elapsed = prog.elapsed_s
      prog.elapsed_s = record["elapsed_s"]
      _save_checkpoint(files, trainer, prog, cfg)
      prog.elapsed_s = saved_elapsed

  test = metrics.evaluate(*trainer.embeddings(prog.best_params), test_set, ks)
  pop_u, pop_i = metrics.popularity_embeddings(ds.observed, ds.n_users, ds.n_items)
  popularity = metrics.evaluate(pop_u, pop_i, test_set, ks)
  final = {
    "best_epoch": prog.best_epoch,
    "valid": prog.best_valid,
    "test": test,
    "popularity": popularity,
    "epochs_run": prog.epoch,
    "skipped_steps": int(trainer.state.bad_steps),
    "wall_s": prog.elapsed_s + time.perf_counter() - t_start,
  }
  if objective.task_names and not (cfg.aux.weighting == "meta" and cfg.meta.weight_net):
    final.update(_weights_summary(cfg, objective, prog.best_aux, trainer.state.aux_params))
  if trainer.meta is not None:
    final["meta"] = trainer.meta.summary()
  recommend.save_model(
    files.path(recommend.MODEL_FILE), *trainer.embeddings(prog.best_params), ds, cfg.flat()
  )
  files.write_json("final_metrics.json", final)
  files.close()
  logging.info(
    "best epoch %d | test %s | popularity %s%s",
    prog.best_epoch,
    _fmt(test, ("recall@20", "ndcg@20")),
    _fmt(popularity, ("recall@20", "ndcg@20")),
    "".join(f" | w {k}={v:.3g}" for k, v in final.get("aux_weights", {}).items()),
  )
  return final


def _sharded_config(cfg: Config, mesh) -> Config:
  """The configuration under a mesh of D > 1 devices: batch sizes must split evenly, and
  the graph product uses the `segment` kernel, which XLA can partition."""
  d = mesh.size
  for name in ("batch_size", "hyper_batch_size", "meta_batch_size"):
    value = cfg.flat()[name]
    if value % d:
      raise ValueError(f"--{name}={value} must be a multiple of the {d} devices of the mesh.")
  if cfg.model.propagation != "segment":
    logging.info("sharded over %d devices: using --propagation=segment", d)
    cfg = cfg.replace(propagation="segment")
  return cfg


def config_warnings(cfg: Config, steps_per_epoch: int) -> list[str]:
  """Settings that are valid but probably not what was meant, once the data is known."""
  out = []
  if cfg.aux.weighting == "meta" and cfg.meta.meta_every > 2 * steps_per_epoch:
    out.append(
      f"--meta_every={cfg.meta.meta_every} is more than two epochs ({steps_per_epoch} steps "
      "each): the weights will change rarely; consider a smaller --meta_every."
    )
  if cfg.aux.weighting == "meta":
    first = max(cfg.meta.warmup_epochs * steps_per_epoch, cfg.meta.meta_every)
    if first > cfg.train.epochs * steps_per_epoch:
      out.append(
        f"no meta step will run: the first comes after step {first}, but --epochs="
        f"{cfg.train.epochs} gives {cfg.train.epochs * steps_per_epoch} steps."
      )
  return out


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
    self.mesh = sharding.make_mesh(cfg.train.mesh_devices)
    if self.mesh.size == 1:
      self.mesh = None
    else:
      cfg = self.cfg = _sharded_config(cfg, self.mesh)
    n_users, n_items = ds.n_users, ds.n_items
    if self.mesh is not None:  # tables padded to a multiple of the device count
      n_users, n_items = sharding.padded(n_users, self.mesh), sharding.padded(n_items, self.mesh)
    self.sampler = Sampler(ds.train, ds.observed, ds.n_users, ds.n_items)
    self.graph = graph_lib.build_graph(ds.train, n_users, n_items)
    self.weights = graph_lib.edge_weights(self.graph)
    self.model = make_model(cfg.model, n_users, n_items)
    self.anchor_caps = None
    self.anchor_caps = self._anchor_caps() if cfg.aux.tasks else None
    self.anchor_overflows = 0
    self.objective = make_objective(self.model, cfg, self.anchor_caps)
    aux_params = initial_aux_params(cfg)
    tx = optax.adam(cfg.train.learning_rate)
    aux_tx = optax.adam(cfg.train.learning_rate) if cfg.aux.weighting == "uncertainty" else None
    key = jax.random.key(cfg.train.seed)
    true_size = make_model(cfg.model, ds.n_users, ds.n_items)  # the same initial values
    self.state = init_state(true_size, tx, key, aux_params, aux_tx, pad_to=(n_users, n_items))
    inject = cfg.train.inject_nan_at_step
    if uses_sparse_updates(cfg):
      self.state = self.state.replace(opt_state=sparse.lazy_adam_init(self.state.params))
      fn = sparse_run_steps_fn(cfg.train.l2_reg, cfg.train.learning_rate, inject)
    else:
      fn = run_steps_fn(self.objective, tx, aux_tx, inject)
    self._tables = {n_users, n_items, n_users + n_items}
    self.state = self._place(self.state)
    if self.mesh is not None:
      self.graph = sharding.shard_tree(self.graph, self.mesh, set())
      self.weights = sharding.put(self.weights, sharding.replicated(self.mesh))
    self.run_steps = make_run_steps(self.objective, tx, fn=fn)
    model, (nu, ni) = self.model, (ds.n_users, ds.n_items)
    self._embed = jax.jit(
      lambda p, g, w: tuple(x[:n] for x, n in zip(model.apply({"params": p}, g, w), (nu, ni)))
    )
    self.n_batches = self.sampler.num_batches(cfg.train.batch_size)
    self.meta = None
    if cfg.aux.weighting == "meta":
      self.meta = meta_lib.MetaRunner(
        self.objective, cfg, self.sampler, ds, aux_params, cfg.train.seed, self.n_batches,
        place=self.place_batches,
      )  # fmt: skip

  def _anchor_caps(self) -> tuple[int, int]:
    """Static sizes for the in-batch contrastive tasks: 25% above the most distinct users
    and items in the first epoch's batches (and in a few hyper-batches), rounded up to 64.
    In-batch InfoNCE costs the square of this, so padding to the batch size (2048) when
    a batch holds ~800 distinct items would cost several times more."""
    first = self._sample(0)
    self._next = (0, self._prefetch.submit(lambda: first))
    counts = [Sampler.max_unique(jax.device_get(first))]
    if self.cfg.aux.weighting == "meta":
      rng = np.random.default_rng([self.cfg.train.seed, 2])
      hyper = self.cfg.meta.hyper_batch_size
      counts += [Sampler.max_unique(self.sampler.sample(rng, hyper)) for _ in range(3)]
    users, items = (max(c[k] for c in counts) for k in (0, 1))
    up = lambda n: -(-int(1.25 * n) // 64) * 64  # noqa: E731
    return up(users), up(items)

  def _check_anchors(self, batches) -> None:
    """Counts batches with more distinct users or items than the tasks hold (their
    largest ids would not be anchors) and warns: it should essentially never happen."""
    if self.anchor_caps is None:
      return
    users, items = Sampler.max_unique(batches)
    if users > self.anchor_caps[0] or items > self.anchor_caps[1]:
      self.anchor_overflows += 1
      logging.warning(
        "a batch has %d distinct users / %d items, above the contrastive tasks' %d / %d: "
        "some anchors were left out of InfoNCE this epoch",
        users,
        items,
        *self.anchor_caps,
      )

  def _sample(self, epoch: int):
    """Epoch `epoch`'s batches: a function of (seed, epoch) only, so prefetching, resuming
    and early stopping never change them."""
    rng = np.random.default_rng([self.cfg.train.seed, 0, epoch])
    batches = self.sampler.epoch(rng, self.cfg.train.batch_size)
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

  def _place(self, tree):
    """Row-shards tables (and their optimizer state) on a mesh; a no-op on one device."""
    if self.mesh is None:
      return tree
    return sharding.shard_tree(tree, self.mesh, self._tables)

  def load(self, device: dict, host: dict) -> None:
    """Restores what `device_state` and `host_state` returned."""
    self.state = self._place(device["train"])
    self.epochs_done = host["epochs_done"]
    self._next = None
    if self.meta is not None:
      self.meta.state = self._place(device["meta"])
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
