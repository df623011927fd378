"""Jitted training steps: the train state, the inner step, the epoch loop (docs/method.md §3.1).

`run_steps(state, graph, weights, batches, start, count)` runs steps `start..start+count-1`
of an epoch's stacked batches in one `lax.fori_loop` with a traced trip count, so one
compilation serves every epoch and every segment between meta steps. It drives a step
through one interface, `init(state, ctx)` / `step(carry, batch, scale, ctx)` /
`finalize(state, carry, count)`: `DenseStep` (any model, any weighting) or
`sparse.SparseStep` (MF alone, row-sparse, XLA or native kernel, lazy Adam or SGD). The
loop holds the one guard: a step whose loss or gradient is not finite is skipped and
counted.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from maxrec import sharding
from maxrec.objective import Objective


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


def _finite(loss, grads) -> jax.Array:
  return jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))


class DenseStep:
  """The step of any model and weighting: autodiff of the objective's inner loss, the
  optax update of every parameter (and, with `aux_tx`, of φ: uncertainty weighting).

  The same interface as `sparse.SparseStep`: the carry is the `TrainState` itself, and a
  step that is not ok keeps the state (its step count still advances).
  """

  def __init__(self, objective: Objective, tx, aux_tx=None):
    self.objective, self.tx, self.aux_tx = objective, tx, aux_tx

  def init(self, state, ctx):
    del ctx
    return state

  def step(self, state: TrainState, batch, scale, ctx):
    graph, weights = ctx
    key = jax.random.fold_in(state.key, state.step)
    aux_tx = self.aux_tx

    def loss_fn(params, aux_params):
      loss, parts = self.objective.inner_loss(params, aux_params, batch, key, graph, weights)
      return loss * scale, parts

    argnums = (0, 1) if aux_tx is not None else 0
    grad_fn = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=True)
    (loss, parts), grads = grad_fn(state.params, state.aux_params)
    g_params = grads[0] if aux_tx is not None else grads
    updates, opt_state = self.tx.update(g_params, state.opt_state, state.params)
    new = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    if aux_tx is not None:
      upd, aux_opt_state = aux_tx.update(grads[1], state.aux_opt_state, state.aux_params)
      new = new.replace(
        aux_params=optax.apply_updates(state.aux_params, upd), aux_opt_state=aux_opt_state
      )
    ok = _finite(loss, grads)
    new = jax.lax.cond(ok, lambda: new, lambda: state.replace(step=state.step + 1))
    return new, {"loss": loss, **parts}, ok

  def finalize(self, state, carry, count):
    del state, count
    return carry


def run_steps_fn(kind, inject_nan_at: int = -1):
  """The pure `run_steps(state, graph, weights, batches, start, count)` (not jitted).

  Runs steps `start .. start+count-1` of an epoch's stacked batches `[n, B]` with `kind`
  (`DenseStep` or `sparse.SparseStep`) in one `fori_loop` (dynamic trip count, so one
  compilation serves every segment) and returns the new state and the summed loss parts
  with "good", the number of steps taken. The one guard of every step: a step whose loss
  or gradient is not finite writes nothing, its parts count as 0, and it is counted in
  `TrainState.bad_steps` (the first in `first_bad_step`). `inject_nan_at` is a test hook.
  """

  def run_steps(state: TrainState, graph, weights, batches, start, count):
    ctx = (graph, weights)
    step0 = state.step - start  # the global step of local step 0

    def step(carry, t):
      carry, parts, ok = kind.step(
        carry, _index(batches, t), _nan_hook(step0 + t, inject_nan_at), ctx
      )
      parts = jax.tree.map(lambda x: jnp.where(ok, x, 0.0), parts)
      return carry, {**parts, "good": ok.astype(jnp.float32)}, ok

    carry = kind.init(state, ctx)
    zero = jax.eval_shape(lambda: step(carry, start)[1])
    sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)

    def body(t, loop):
      carry, bad, first, acc = loop
      carry, parts, ok = step(carry, t)
      first = jnp.where(~ok & (first < 0), step0 + t, first)
      return carry, bad + jnp.where(ok, 0, 1), first, jax.tree.map(jnp.add, acc, parts)

    init = (carry, state.bad_steps, state.first_bad_step, sums)
    carry, bad, first, sums = jax.lax.fori_loop(start, start + count, body, init)
    new = kind.finalize(state, carry, count)
    return new.replace(bad_steps=bad, first_bad_step=first), sums

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


def make_run_steps(kind, inject_nan_at: int = -1):
  """`run_steps_fn(kind)`, jitted with its state donated, and compiled at most once."""
  return jax.jit(trace_once(run_steps_fn(kind, inject_nan_at)), donate_argnums=(0,))


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
