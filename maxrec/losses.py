"""Losses as pure functions with documented shapes (METHOD.md §2.3, §2.4).

All are numerically stable and have finite second derivatives: BPR through `softplus`,
InfoNCE through `log_softmax` with finite masking constants, cosine normalisation through
`rsqrt(|z|^2 + eps)` (the gradient of `norm` at 0 is NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite stand-in for -inf in masked logits: exp underflows to exactly 0 in float32 and
# float64, while derivatives stay finite (METHOD.md [A4](b)).
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


def l2_penalty(reg: float, batch_size: int, *embeddings: jax.Array) -> jax.Array:
  """`reg / (2B) * sum ||e||^2` over the given batch rows (LightGCN's `reg_loss`).

  Args:
    reg: the coefficient λ.
    batch_size: B, the number of triples (not of rows).
    *embeddings: [B, d] ego embeddings of users, positives and negatives.
  """
  total = sum(jnp.sum(jnp.square(e)) for e in embeddings)
  return reg * total / (2.0 * batch_size)


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
  logits = (z1 @ z2.T) / temperature
  if valid is not None:
    logits = jnp.where(valid[None, :], logits, MASK_LOGIT)
  losses = -jnp.diagonal(jax.nn.log_softmax(logits, axis=-1))
  if valid is not None:
    losses = jnp.where(valid, losses, 0.0)
  return losses


def unique_ids(ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Jit-safe unique ids with a fixed size ([A4](a)).

  Args:
    ids: [n] int ids, possibly repeated.
  Returns:
    (unique [n] ids, padded with 0, and valid [n] bool marking the real ones).
  """
  n = ids.shape[0]
  uniq = jnp.unique(ids, size=n, fill_value=-1)
  valid = uniq >= 0
  return jnp.where(valid, uniq, 0), valid


def masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of `values` [n] over `valid` [n] entries (0 when none is valid)."""
  return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
