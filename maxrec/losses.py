"""Losses as pure functions with documented shapes (docs/method.md §2.3, §2.4).

All are numerically stable and have finite second derivatives: BPR through `softplus`,
InfoNCE through `log_softmax` with finite masking constants, cosine normalisation through
`rsqrt(|z|^2 + eps)` (the gradient of `norm` at 0 is NaN).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Finite stand-in for -inf in masked logits: exp underflows to exactly 0 in float32 and
# float64, while derivatives stay finite (docs/method.md [A4](b)).
MASK_LOGIT = -1e9


def bpr_loss(pos_scores: jax.Array, neg_scores: jax.Array) -> jax.Array:
  """Mean BPR loss `mean(softplus(neg - pos)) = -mean(log sigmoid(pos - neg))`.

  Args:
    pos_scores: [B] scores of the positive items.
    neg_scores: [B] scores of the sampled negatives.
  Returns:
    A scalar.

  >>> float(bpr_loss(jnp.array([0.0]), jnp.array([0.0])))  # log 2
  0.6931...
  """
  return jnp.mean(jax.nn.softplus(neg_scores - pos_scores))


def softmax_ce(scores: jax.Array, pos: jax.Array, seen: jax.Array) -> jax.Array:
  """Mean full-softmax cross-entropy of held-out items against every item.

  Args:
    scores: [B, I] scores of B users (rows) for every item.
    pos: [B] int, each row's held-out item.
    seen: [B, W] int, items to leave out of each row's softmax (the user's training
      items), padded with any id >= I (dropped).
  Returns:
    mean_b [log Σ_{j not seen} exp(s_bj) - s_b,pos_b], a scalar.
  """
  rows = jnp.arange(scores.shape[0])[:, None]
  masked = scores.at[rows, seen].set(MASK_LOGIT, mode="drop")
  target = jnp.take_along_axis(scores, pos[:, None], axis=1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(masked, axis=-1) - target)


def l2_penalty(reg: float, batch_size: int, *embeddings: jax.Array) -> jax.Array:
  """`reg / (2B) * sum ||e||^2` over the given batch rows (LightGCN's `reg_loss`).

  Args:
    reg: the coefficient λ.
    batch_size: B, the number of triples (not of rows).
    *embeddings: [B, d] ego embeddings of users, positives and negatives.
  """
  total = sum(jnp.sum(jnp.square(e)) for e in embeddings)
  return reg * total / (2.0 * batch_size)


def bpr_batch(eu, ei, ej, l2_reg: float, ego=None) -> tuple[jax.Array, jax.Array]:
  """(BPR, L2) of one batch of triples: the primary loss of §2.3, the one definition that
  the dense objective, the row-sparse XLA step and the native kernel all compute.

  Args:
    eu, ei, ej: [B, d] final embeddings of the users, positives and negatives.
    l2_reg: λ of the L2 term.
    ego: the [B, d] ego embeddings (users, positives, negatives) that the L2 term
      penalises; default the final ones (MF, where they are the same).
  Returns:
    (mean BPR loss, `l2_penalty(l2_reg, B, *ego)`), scalars.
  """
  bpr = bpr_loss(jnp.sum(eu * ei, -1), jnp.sum(eu * ej, -1))
  ego = (eu, ei, ej) if ego is None else ego
  return bpr, l2_penalty(l2_reg, eu.shape[0], *ego)


def cosine_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """`x / |x|` row-wise as `x * rsqrt(|x|^2 + eps)`: smooth, finite at 0. x: [n, d]."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def info_nce(
  anchors: jax.Array,
  positives: jax.Array,
  temperature: float,
  valid: jax.Array | None = None,
) -> jax.Array:
  """Per-anchor InfoNCE with in-batch negatives and cosine similarity.

  loss_a = -log( exp(s(z1_a, z2_a)/τ) / sum_b exp(s(z1_a, z2_b)/τ) ), the sum running
  over valid columns b only.

  Args:
    anchors: [n, d] first-view embeddings z1.
    positives: [n, d] second-view embeddings z2 (row a is the positive of anchor a).
    temperature: τ > 0.
    valid: [n] bool; invalid rows are neither anchors nor negatives (their loss is 0).
  Returns:
    [n] per-anchor losses (0 where invalid).

  >>> e = jnp.eye(4)
  >>> round(float(info_nce(e, e, 0.2).mean()), 7)  # log(1 + 3 exp(-1/0.2))
  0.0200123
  """
  z1, z2 = cosine_normalize(anchors), cosine_normalize(positives)
  col_ok = jnp.ones(z1.shape[0], bool) if valid is None else valid
  losses = _info_nce_logits(z1, z2, col_ok, temperature)
  if valid is not None:
    losses = jnp.where(valid, losses, 0.0)
  return losses


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _info_nce_logits(z1, z2, col_ok, temperature):
  """-log softmax(z1 z2^T / τ)_aa with invalid columns masked: [n] losses.

  A hand-written VJP: the autodiff backward of `log_softmax` over the n x n logits makes
  several passes over the matrix; this one makes one (`exp`) plus two matmuls, which
  halves the cost of an InfoNCE gradient on CPU. The backward pass is plain JAX, so
  forward-over-reverse (Hessian-vector products) and reverse-over-reverse still work.
  """
  return _info_nce_fwd(z1, z2, col_ok, temperature)[0]


def _info_nce_fwd(z1, z2, col_ok, temperature):
  sim = jax.lax.dot_general(z1, z2, (((1,), (1,)), ((), ())))  # z1 z2^T, [n, n]
  logits = jnp.where(col_ok[None, :], sim / temperature, MASK_LOGIT)
  top = jnp.max(logits, axis=-1)
  lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
  positive = jnp.sum(z1 * z2, axis=-1) / temperature  # the diagonal, without a gather
  return lse - positive, (z1, z2, logits, lse)


def _info_nce_bwd(temperature, res, g):
  z1, z2, logits, lse = res
  # d loss_a / d logits_ab = softmax_ab - [a == b]; masked columns have softmax 0.
  weighted = (g / temperature)[:, None] * jnp.exp(logits - lse[:, None])
  diag = (g / temperature)[:, None]
  d_z1 = weighted @ z2 - diag * z2
  d_z2 = (z1.T @ weighted).T - diag * z1  # cheaper than weighted.T @ z1 on CPU
  return d_z1, d_z2, None


_info_nce_logits.defvjp(_info_nce_fwd, _info_nce_bwd)


def unique_ids(ids: jax.Array, size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Jit-safe unique ids with a fixed size ([A4](a)).

  Args:
    ids: [n] non-negative int ids, possibly repeated.
    size: static output length, at least the number of distinct ids (default n); pass
      min(n, number of entities) to keep in-batch matrices small.
  Returns:
    (unique [size] ids, padded with 0, and valid [size] bool marking the real ones).
  """
  n = ids.shape[0] if size is None else size
  uniq = jnp.unique(ids, size=n, fill_value=-1)
  valid = uniq >= 0
  return jnp.where(valid, uniq, 0), valid


def masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of `values` [n] over `valid` [n] entries (0 when none is valid)."""
  return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
