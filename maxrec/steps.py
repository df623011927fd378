"""Jitted training steps: the train state, the inner step, the epoch loop (docs/method.md §3.1).

`run_steps(state, graph, weights, batches, start, count)` runs steps `start..start+count-1`
of an epoch's stacked batches in one `lax.fori_loop` with a traced trip count, so one
compilation serves every epoch and every segment between meta steps. Two step bodies:
the dense step (any model, any weighting) and the row-sparse MF step (`maxrec.sparse`).
Both skip a step whose loss or gradient is not finite, and count it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from maxrec import auxiliary, native, sharding, sparse
from maxrec import meta as meta_lib
from maxrec.config import Config
from maxrec.objective import Objective, init_aux_params


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
    anchors=cfg.aux.ssl_anchors or None,
  )
  weight_net = None
  if cfg.aux.weighting == "meta" and cfg.meta.weight_net:
    net = meta_lib.WeightNet(len(cfg.aux.tasks), init_weight=cfg.aux.initial_weights[0])
    weight_net = lambda params, feats: net.apply({"params": params}, feats)  # noqa: E731
  return Objective(
    model,
    cfg.train.l2_reg,
    cfg.aux.tasks,
    cfg.aux.weighting,
    settings,
    weight_net=weight_net,
    meta_loss=cfg.meta.meta_loss,
  )


def initial_aux_params(cfg: Config):
  """φ at the start: scalar weights, or the [A6] network's parameters."""
  if cfg.aux.weighting == "meta" and cfg.meta.weight_net:
    net = meta_lib.WeightNet(len(cfg.aux.tasks), init_weight=cfg.aux.initial_weights[0])
    return net.init(jax.random.key(cfg.train.seed + 1), jnp.zeros((1, 2)))["params"]
  return init_aux_params(cfg.aux.weighting, cfg.aux.initial_weights)


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


def sparse_run_steps_fn(
  l2_reg: float,
  learning_rate: float,
  inject_nan_at: int = -1,
  optimizer: str = "adam",
  kernel: str = "xla",
):
  """`run_steps` for MF without auxiliary tasks, updating only the touched rows with lazy
  Adam or SGD (`maxrec.sparse`); same signature as `run_steps_fn`'s, graph and weights
  unused. `kernel`: "xla" (the XLA step) or "native" (the fused CPU kernel, the same
  update up to float rounding).

  The steps work on one node table, built at the start of the call and split back into
  `params` (and, for Adam, `opt_state`) at its end: [U + I, 3d] rows of (θ, m, v) for
  Adam, [U + I, d] rows of θ for SGD (whose optax state is empty and left as it is)."""
  if kernel not in ("xla", "native"):
    raise ValueError(f"kernel={kernel!r}: use 'xla' or 'native'")

  def run_steps(state: TrainState, graph, weights, batches, start, count):
    del graph, weights
    n_users = state.params["user"].shape[0]
    if optimizer == "adam":
      table = sparse.to_slab(state.params, state.opt_state)
      opt = (state.opt_state.count, jnp.zeros((table.shape[0],), jnp.int32))
    else:
      table = sparse.node_table(state.params)
      # The native step needs a scratch table (and takes a count that SGD ignores).
      opt = (jnp.zeros((), jnp.int32), jnp.zeros((table.shape[0],), jnp.int32))
      opt = opt if kernel == "native" else ()
    zero = {"loss": 0.0, "bpr": 0.0, "l2": 0.0, "good": 0.0}
    sums = jax.tree.map(lambda x: jnp.zeros((), table.dtype), zero)
    step0 = state.step - start

    def step(table, opt, batch, scale):
      if kernel == "native":
        n, scratch = opt
        table, n, scratch, parts, ok = sparse.native_sparse_step(
          table, n, scratch, batch, n_users, l2_reg, learning_rate, scale,
          adam=optimizer == "adam",
        )  # fmt: skip
        return table, (n, scratch), parts, ok
      if optimizer == "adam":
        n, scratch = opt
        table, n, scratch, parts, ok = sparse.sparse_mf_step(
          table, n, scratch, batch, n_users, l2_reg, learning_rate, scale
        )
        return table, (n, scratch), parts, ok
      table, parts, ok = sparse.sparse_sgd_step(table, batch, n_users, l2_reg, learning_rate, scale)
      return table, opt, parts, ok

    def body(t, carry):
      table, opt, bad, first, acc = carry
      scale = _nan_hook(step0 + t, inject_nan_at)
      table, opt, parts, ok = step(table, opt, _index(batches, t), scale)
      first = jnp.where(~ok & (first < 0), step0 + t, first)
      parts = {
        **jax.tree.map(lambda x: jnp.where(ok, x, 0.0), parts),
        "good": ok.astype(table.dtype),
      }
      bad = bad + jnp.where(ok, 0, 1)
      return table, opt, bad, first, jax.tree.map(jnp.add, acc, parts)

    init = (table, opt, state.bad_steps, state.first_bad_step, sums)
    table, opt, bad, first, sums = jax.lax.fori_loop(start, start + count, body, init)
    if optimizer == "adam":
      params, opt_state = sparse.from_slab(table, n_users, opt[0])
    else:
      params, opt_state = sparse.table_params(table, n_users, table.shape[1]), state.opt_state
    new = state.replace(step=state.step + count, params=params, opt_state=opt_state)
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


def _index(batches, t):
  return jax.tree.map(lambda b: jax.lax.dynamic_index_in_dim(b, t, keepdims=False), batches)


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
  """MF without auxiliary tasks has a row-sparse gradient: train it with lazy Adam or SGD
  on the touched rows only."""
  return cfg.sparse_mf


def resolve_sparse_kernel(choice: str, sharded: bool) -> str:
  """The row-sparse MF step's kernel for `--sparse_kernel=choice`: "native" (the fused
  CPU kernel, `maxrec.native.bpr_step`) or "xla". "auto" is native on one CPU device when
  the kernel builds (else a warning from `native.available` and xla)."""
  on_cpu = jax.default_backend() == "cpu"
  if choice == "native":
    if not on_cpu or sharded:
      where = "tables sharded over a mesh" if sharded else f"backend {jax.default_backend()}"
      raise ValueError(
        f"--sparse_kernel=native runs on one CPU device only ({where}); use auto or xla."
      )
    if not native.available():
      raise RuntimeError(
        f"--sparse_kernel=native: the native kernels are unavailable: {native.why()}"
      )
    return "native"
  if choice == "auto" and on_cpu and not sharded and native.available():
    return "native"
  return "xla"


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
