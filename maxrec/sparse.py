"""Row-sparse MF-BPR training: only the embedding rows a batch touches are updated.

A BPR batch touches at most B user rows and 2B item rows out of U + I, yet a dense
optimizer step reads and writes every row of the parameters and of both Adam moments.
This module trains MF (no auxiliary task, the only case where the gradient is row-sparse)
by gathering the batch's rows, differentiating the loss with respect to those rows,
summing the gradients of repeated rows, and applying a *lazy* Adam to the touched rows
only:

  for each touched row r (global step t, bias correction from t, as optax.adam):
    m_r <- b1 m_r + (1 - b1) g_r ;  v_r <- b2 v_r + (1 - b2) g_r²
    θ_r <- θ_r - lr · sqrt(1 - b2^t) / (1 - b1^t) · m_r / (sqrt(v_r) + eps')

With `--optimizer=sgd` the table is θ alone and a step scatter-adds `-lr · g` into the
touched rows, repeats summed by the scatter itself. That is exactly dense SGD (an untouched
row has a zero gradient), and the update rule of implicit's C++ BPR.

Semantics against dense Adam (documented, and tested): a row that the batch touches gets
exactly dense Adam's update; a row that it does not touch keeps θ, m and v unchanged,
whereas dense Adam would decay its moments and still move it along its old momentum. Rows
touched at every step (for example when the batch covers every row) therefore follow dense
Adam exactly. This is TensorFlow's LazyAdam.

A step reads and writes each touched row of the [U + I, 3d] slab of (θ, m, v) once: on a
CPU the step is bound by these random row accesses, not by arithmetic. Repeated rows are
summed without a sort: every occurrence writes its position into an int32 scratch table
indexed by row id, so all occurrences of a row read back the same position (whichever
write won), which then sums their gradients in a small [k, d] buffer and alone writes the
row (`representatives`).

On the CPU the same step runs by default as one fused native call (`native_sparse_step`,
`maxrec/bpr_step.cc`), tested against the XLA steps here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from maxrec import losses, native


class LazyAdamState(NamedTuple):
  """Lazy Adam state of the node table (users first, then items).

  Attributes:
    slots: [U + I, 2d]: the first and the second moment of every row.
    count: the step number t.
  """

  slots: jax.Array
  count: jax.Array


def lazy_adam_init(params: dict) -> LazyAdamState:
  n = params["user"].shape[0] + params["item"].shape[0]
  d = params["user"].shape[1]
  return LazyAdamState(jnp.zeros((n, 2 * d), params["user"].dtype), jnp.zeros((), jnp.int32))


def representatives(scratch: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One occurrence per distinct id, without sorting.

  Args:
    scratch: [n] int32 table indexed by id; its contents on entry do not matter.
    ids: [k] ids in [0, n), repeats allowed.
  Returns:
    (scratch, rep): rep[p] in [0, k) is the same position for every occurrence of
    ids[p], and is an occurrence of it, so `rep[p] == p` marks exactly one p per id.
  """
  scratch = scratch.at[ids].set(jnp.arange(ids.shape[0], dtype=scratch.dtype))
  return scratch, scratch[ids]


def lazy_adam_rows(
  slab, ids, grads, count, lr, *, rows=None, scratch=None, apply=True,
  b1=0.9, b2=0.999, eps=1e-8,
):  # fmt: skip
  """Lazy Adam on the rows `ids` of a slab [n, 3d] = (θ, m, v).

  Args:
    slab: [n, 3d].
    ids: [k] row ids (repeats allowed: their gradients are summed).
    grads: [k, d] gradient of each occurrence.
    count: the step number t >= 1.
    lr, b1, b2, eps: Adam's hyper-parameters (optax.adam's meaning of eps).
    rows: `slab[ids]` when the caller already gathered it (the MF step does).
    scratch: [n] int32 scratch table (`representatives`); a fresh one by default.
    apply: scalar bool; False writes nothing (a skipped step).
  Returns:
    (slab, scratch).
  """
  n, d = slab.shape[0], grads.shape[1]
  rows = slab[ids] if rows is None else rows
  scratch = jnp.zeros((n,), jnp.int32) if scratch is None else scratch
  scratch, rep = representatives(scratch, ids)
  g = jnp.zeros_like(grads).at[rep].add(grads)  # the row's summed gradient, at rep
  m = b1 * rows[:, d : 2 * d] + (1 - b1) * g
  v = b2 * rows[:, 2 * d :] + (1 - b2) * g * g
  t = count.astype(slab.dtype)
  theta = rows[:, :d] - lr * (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)
  pos = jnp.arange(ids.shape[0], dtype=rep.dtype)
  target = jnp.where((rep == pos) & apply, ids, n)  # n is out of bounds: dropped
  slab = slab.at[target].set(jnp.concatenate([theta, m, v], 1), mode="drop")
  return slab, scratch


def bpr_rows_loss(eu, ei, ej, l2_reg: float):
  """BPR + L2 of one batch as a function of its gathered rows ([B, d] each)."""
  bpr, l2 = losses.bpr_batch(eu, ei, ej, l2_reg)
  return bpr + l2, {"bpr": bpr, "l2": l2}


def node_table(params: dict) -> jax.Array:
  """[U + I, d] θ of users, then items: the table the SGD steps work on."""
  return jnp.concatenate([params["user"], params["item"]])


def table_params(table: jax.Array, n_users: int, d: int) -> dict:
  """`params` from the first d columns of a node table (the inverse of `node_table`)."""
  return {"user": table[:n_users, :d], "item": table[n_users:, :d]}


def to_slab(params: dict, opt: LazyAdamState) -> jax.Array:
  """[U + I, 3d] working table of (θ, m, v)."""
  return jnp.concatenate([node_table(params), opt.slots], 1)


def from_slab(slab: jax.Array, n_users: int, count) -> tuple[dict, LazyAdamState]:
  d = slab.shape[1] // 3
  return table_params(slab, n_users, d), LazyAdamState(slab[:, d:], count)


def _rows_grads(theta, b: int, l2_reg, scale):
  """Loss, parts and [3b, d] gradient of a batch's gathered rows (users, pos, neg)."""

  def loss_fn(eu, ei, ej):
    loss, parts = bpr_rows_loss(eu, ei, ej, l2_reg)
    return loss * scale, parts

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)
  (loss, parts), grads = grad_fn(theta[:b], theta[b : 2 * b], theta[2 * b :])
  return loss, parts, jnp.concatenate(grads)


def batch_rows(batch, n_users: int) -> jax.Array:
  """[3B] row ids of a batch in the node table: users, positives, negatives."""
  return jnp.concatenate([batch["user"], batch["pos"] + n_users, batch["neg"] + n_users])


def sparse_sgd_step(table, batch, n_users: int, l2_reg, lr, scale=1.0):
  """One row-sparse MF-BPR step of plain SGD on the [U + I, d] node table.

  Returns:
    (table, loss parts, ok); a step with a non-finite loss writes nothing (see
    `sparse_mf_step` on why the loss alone is checked).
  """
  ids = batch_rows(batch, n_users)
  loss, parts, grads = _rows_grads(table[ids], ids.shape[0] // 3, l2_reg, scale)
  ok = jnp.isfinite(loss)
  table = table.at[jnp.where(ok, ids, table.shape[0])].add(-lr * grads, mode="drop")
  return table, {"loss": loss, **parts}, ok


def sparse_mf_step(slab, count, scratch, batch, n_users: int, l2_reg, lr, scale=1.0):
  """One row-sparse MF-BPR step on the working slab.

  A step whose loss is not finite leaves the slab and the count as they were (`scale`
  multiplies the loss: a test hook for injecting NaN). Only the loss is checked: its
  gradients are finite whenever it is, since they are sigmoids times differences of rows
  that the finite scores and L2 term bound (a reduction over the [3B, d] gradients would
  cost 5% of the step).

  Returns:
    (slab, count, scratch, loss parts, ok).
  """
  d = slab.shape[1] // 3
  ids = batch_rows(batch, n_users)
  rows = slab[ids]  # the only read of the table
  loss, parts, grads = _rows_grads(rows[:, :d], ids.shape[0] // 3, l2_reg, scale)
  ok = jnp.isfinite(loss)
  count = count + ok.astype(count.dtype)
  slab, scratch = lazy_adam_rows(slab, ids, grads, count, lr, rows=rows, scratch=scratch, apply=ok)
  return slab, count, scratch, {"loss": loss, **parts}, ok


def native_sparse_step(
  table, count, scratch, batch, n_users: int, l2_reg, lr, scale=1.0, *, adam: bool = True
):  # fmt: skip
  """`sparse_mf_step` (adam) or `sparse_sgd_step` as one fused native CPU call.

  The same update up to float rounding (the kernel sums in another order); see
  `maxrec.native.bpr_step`. SGD ignores `count` and returns it unchanged.

  Returns:
    (table, count, scratch, loss parts, ok), as `sparse_mf_step`.
  """
  ids = batch_rows(batch, n_users)
  table, scratch, out = native.bpr_step(
    table, scratch, ids, count, scale, adam=adam, lr=lr, l2_reg=l2_reg
  )
  ok = jnp.isfinite(out[0])
  if adam:
    count = count + ok.astype(count.dtype)
  return table, count, scratch, {"loss": out[0], "bpr": out[1], "l2": out[2]}, ok


class SparseStep:
  """The row-sparse MF step behind one interface, whatever the kernel and optimizer.

  `steps.run_steps_fn` drives it: `init(state, ctx)` builds the working table (a [U + I, 3d]
  slab of (θ, m, v) for lazy Adam, a [U + I, d] node table for SGD), `step(carry, batch,
  scale, ctx)` runs one step on it and returns (carry, loss parts, ok), and
  `finalize(state, carry, count)` splits the table back into the state's parameters and
  optimizer state. A step that is not ok writes nothing.

  Args:
    n_users: user rows of the tables (padded on a mesh).
    l2_reg, learning_rate: λ and the constant rate.
    optimizer: "adam" (lazy Adam) or "sgd".
    kernel: "xla" (`sparse_mf_step` / `sparse_sgd_step`) or "native" (`native_sparse_step`).
  """

  def __init__(self, n_users: int, l2_reg: float, learning_rate: float, optimizer: str, kernel):
    if kernel not in ("xla", "native"):
      raise ValueError(f"kernel={kernel!r}: use 'xla' or 'native'")
    if optimizer not in ("adam", "sgd"):
      raise ValueError(f"optimizer={optimizer!r}: use 'adam' or 'sgd'")
    self.n_users, self.l2_reg, self.lr = n_users, l2_reg, learning_rate
    self.adam, self.kernel = optimizer == "adam", kernel

  def with_opt_state(self, state):
    """`state` with the optimizer state this step keeps: lazy Adam's slots and count (SGD
    keeps the optax state it has, which is empty)."""
    return state.replace(opt_state=lazy_adam_init(state.params)) if self.adam else state

  def init(self, state, ctx):
    del ctx
    if self.adam:
      table = to_slab(state.params, state.opt_state)
      return table, state.opt_state.count, jnp.zeros((table.shape[0],), jnp.int32)
    table = node_table(state.params)
    # the native SGD step needs a scratch table too (and takes a count that it ignores)
    return table, jnp.zeros((), jnp.int32), jnp.zeros((table.shape[0],), jnp.int32)

  def step(self, carry, batch, scale, ctx):
    del ctx
    table, count, scratch = carry
    args = (batch, self.n_users, self.l2_reg, self.lr, scale)
    if self.kernel == "native":
      table, count, scratch, parts, ok = native_sparse_step(
        table, count, scratch, *args, adam=self.adam
      )
    elif self.adam:
      table, count, scratch, parts, ok = sparse_mf_step(table, count, scratch, *args)
    else:
      table, parts, ok = sparse_sgd_step(table, *args)
    return (table, count, scratch), parts, ok

  def finalize(self, state, carry, count):
    table, n, _ = carry
    if self.adam:
      params, opt_state = from_slab(table, self.n_users, n)
    else:
      params, opt_state = table_params(table, self.n_users, table.shape[1]), state.opt_state
    return state.replace(step=state.step + count, params=params, opt_state=opt_state)


def resolve_kernel(choice: str, sharded: bool) -> str:
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
