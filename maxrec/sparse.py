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

Semantics against dense Adam (documented, and tested): a row that the batch touches gets
exactly dense Adam's update; a row that it does not touch keeps θ, m and v unchanged,
whereas dense Adam would decay its moments and still move it along its old momentum. Rows
touched at every step (for example when the batch covers every row) therefore follow dense
Adam exactly. This is TensorFlow's LazyAdam.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from maxrec import losses


class LazyAdamState(NamedTuple):
  """Lazy Adam state of the node table (users first, then items).

  Attributes:
    slots: [U + I, 3d]: the first moment, the second moment and a zeroed gradient
      accumulator (used to sum the gradients of rows a batch repeats) of every row.
    count: the step number t.
  """

  slots: jax.Array
  count: jax.Array


def lazy_adam_init(params: dict) -> LazyAdamState:
  n = params["user"].shape[0] + params["item"].shape[0]
  d = params["user"].shape[1]
  return LazyAdamState(jnp.zeros((n, 3 * d), params["user"].dtype), jnp.zeros((), jnp.int32))


def lazy_adam_rows(slab, ids, grads, count, lr, b1=0.9, b2=0.999, eps=1e-8):
  """Lazy Adam on the rows `ids` of a slab [n, 4d] = (θ, m, v, gradient accumulator).

  Repeated ids are allowed: their gradients are first summed in the accumulator, then
  every copy computes the same new row, so writing all copies is exact. No sort is needed.

  Args:
    slab: [n, 4d]; the accumulator columns must be zero on entry (they are on exit).
    ids: [k] row ids (repeats allowed).
    grads: [k, d] gradient of each occurrence.
    count: the step number t >= 1.
    lr, b1, b2, eps: Adam's hyper-parameters (optax.adam's meaning of eps).
  Returns:
    The updated slab.
  """
  d = grads.shape[1]
  # Accumulate first, then gather whole rows: gathering before the in-place scatter-add
  # and reading the gathered rows afterwards would make XLA copy the whole slab.
  slab = slab.at[ids, 3 * d :].add(grads)
  rows = slab[ids]
  g = rows[:, 3 * d :]  # the summed gradient of each occurrence's row
  m = b1 * rows[:, d : 2 * d] + (1 - b1) * g
  v = b2 * rows[:, 2 * d : 3 * d] + (1 - b2) * g * g
  t = count.astype(slab.dtype)
  theta = rows[:, :d] - lr * (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)
  return slab.at[ids].set(jnp.concatenate([theta, m, v, jnp.zeros_like(g)], 1))


def bpr_rows_loss(eu, ei, ej, l2_reg: float):
  """BPR + L2 of one batch as a function of its gathered rows ([B, d] each)."""
  bpr = losses.bpr_loss(jnp.sum(eu * ei, -1), jnp.sum(eu * ej, -1))
  l2 = losses.l2_penalty(l2_reg, eu.shape[0], eu, ei, ej)
  return bpr + l2, {"bpr": bpr, "l2": l2}


def to_slab(params: dict, opt: LazyAdamState) -> jax.Array:
  """[U + I, 4d] working table of (θ, m, v, accumulator)."""
  return jnp.concatenate([jnp.concatenate([params["user"], params["item"]]), opt.slots], 1)


def from_slab(slab: jax.Array, n_users: int, count) -> tuple[dict, LazyAdamState]:
  d = slab.shape[1] // 4
  params = {"user": slab[:n_users, :d], "item": slab[n_users:, :d]}
  return params, LazyAdamState(slab[:, d:], count)


def sparse_mf_step(slab, count, batch, n_users: int, l2_reg, lr, scale=1.0):
  """One row-sparse MF-BPR step on the working slab.

  A step whose loss or row gradients are not finite leaves the slab and the count as
  they were (`scale` multiplies the loss: a test hook for injecting NaN).

  Returns:
    (slab, count, loss parts, ok).
  """
  d = slab.shape[1] // 4
  u, i, j = batch["user"], batch["pos"] + n_users, batch["neg"] + n_users
  ids = jnp.concatenate([u, i, j])
  b = u.shape[0]
  theta = slab[ids, :d]

  def loss_fn(eu, ei, ej):
    loss, parts = bpr_rows_loss(eu, ei, ej, l2_reg)
    return loss * scale, parts

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)
  (loss, parts), grads = grad_fn(theta[:b], theta[b : 2 * b], theta[2 * b :])
  grads = jnp.concatenate(grads)
  ok = jnp.isfinite(loss) & jnp.all(jnp.isfinite(grads))
  slab, count = jax.lax.cond(
    ok,
    lambda s: (lazy_adam_rows(s, ids, grads, count + 1, lr), count + 1),
    lambda s: (s, count),
    slab,
  )
  return slab, count, {"loss": loss, **parts}, ok
