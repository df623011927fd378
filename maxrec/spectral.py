"""The spectrum of the normalised interaction matrix: truncated SVD, graph filters, warm starts.

With R the [U, I] 0/1 training matrix and D_U, D_I its degrees, the normalised matrix

    R̃ = D_U^{-1/2} R D_I^{-1/2}

is the off-diagonal block of LightGCN's Â = [[0, R̃], [R̃ᵀ, 0]]: a singular triple
(u_k, σ_k, v_k) of R̃ gives Â [u_k; v_k] = σ_k [u_k; v_k]. Its leading singular vectors
are therefore the smoothest signals on the graph, the ones LightGCN's propagation keeps.

- `truncated_svd`: the top-k triples by randomized subspace iteration (Halko, Martinsson
  & Tropp 2011), two sparse products per iteration, in JAX (any backend).
- `spectral_init`: ego embeddings from those vectors, for a warm start of MF or LightGCN.
- `ideal_low_pass_embeddings`: the ideal low-pass graph filter of GF-CF (Shen et al.,
  CIKM 2021), s_u = r_u D_I^{-1/2} V_k V_kᵀ D_I^{1/2}, written as user and item
  embeddings so that the ordinary evaluation ranks it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse


class SVDResult(NamedTuple):
  """Top-k singular triples of R̃, in decreasing order of σ.

  Attributes:
    u: [U, k] left singular vectors (users).
    s: [k] singular values (the largest is 1 for a graph without isolated nodes).
    v: [I, k] right singular vectors (items).
    residual: [k] ‖R̃ v_j − σ_j u_j‖, how far each triple is from exact (diagnostic; the
      other side, R̃ᵀu_j = σ_j v_j, holds by construction).
  """

  u: jax.Array
  s: jax.Array
  v: jax.Array
  residual: jax.Array


def normalized_matrix(pairs: np.ndarray, n_users: int, n_items: int):
  """R̃ and R̃ᵀ as BCSR matrices, and the item degrees.

  Args:
    pairs: [E, 2] distinct training (user, item) pairs.
  Returns:
    (R̃ [U, I], R̃ᵀ [I, U], item degrees [I] float32).
  """
  pairs = np.asarray(pairs, np.int64)
  du = np.bincount(pairs[:, 0], minlength=n_users).astype(np.float64)
  di = np.bincount(pairs[:, 1], minlength=n_items).astype(np.float64)
  w = 1.0 / np.sqrt(du[pairs[:, 0]] * di[pairs[:, 1]])
  r = _csr(pairs[:, 0], pairs[:, 1], w, (n_users, n_items))
  rt = _csr(pairs[:, 1], pairs[:, 0], w, (n_items, n_users))
  return r, rt, jnp.asarray(di, jnp.float32)


def _csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape) -> sparse.BCSR:
  """A float32 BCSR matrix with entries `values` at (`rows`, `cols`)."""
  order = np.lexsort((cols, rows))
  indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=shape[0]))])
  data = (jnp.asarray(values[order], jnp.float32), jnp.asarray(cols[order], jnp.int32))
  return sparse.BCSR((*data, jnp.asarray(indptr, jnp.int32)), shape=shape)


def _orth(x: jax.Array) -> jax.Array:
  return jnp.linalg.qr(x)[0]


def truncated_svd(
  pairs: np.ndarray,
  n_users: int,
  n_items: int,
  rank: int,
  *,
  key: jax.Array,
  iterations: int = 12,
  oversample: int = 16,
) -> SVDResult:
  """The top-`rank` singular triples of R̃ by randomized subspace iteration.

  Each iteration costs two sparse-dense products with `rank + oversample` columns
  (about 4 x nnz x (rank + oversample) flops); the error of σ_j shrinks like
  (σ_{rank+oversample} / σ_j)^(2 iterations).

  Args:
    pairs: [E, 2] distinct training (user, item) pairs.
    n_users, n_items: the sizes of R̃.
    rank: k, at most min(U, I).
    key: PRNG key of the random start.
    iterations: subspace iterations q.
    oversample: extra columns p carried to sharpen the top k.
  Returns:
    An `SVDResult`.
  Raises:
    ValueError: for a rank outside [1, min(U, I)].
  """
  if not 1 <= rank <= min(n_users, n_items):
    raise ValueError(f"rank={rank} must be in [1, min(users, items) = {min(n_users, n_items)}].")
  r, rt, _ = normalized_matrix(pairs, n_users, n_items)
  m = min(rank + oversample, n_users, n_items)
  return _subspace_svd(r, rt, jax.random.normal(key, (n_items, m)), rank, iterations)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _subspace_svd(r, rt, omega, rank: int, iterations: int) -> SVDResult:
  q = _orth(r @ omega)

  def body(_, q):
    return _orth(r @ _orth(rt @ q))

  q = jax.lax.fori_loop(0, iterations, body, q)
  bt = rt @ q  # [I, m]: R̃ᵀ Q, i.e. Bᵀ for B = Qᵀ R̃
  p, s, wt = jnp.linalg.svd(bt, full_matrices=False)  # Bᵀ = P S Wᵀ, so R̃ ≈ (Q W) S Pᵀ
  u, v, s = (q @ wt.T)[:, :rank], p[:, :rank], s[:rank]
  residual = jnp.linalg.norm(r @ v - u * s, axis=0)
  return SVDResult(u, s, v, residual)


def spectral_init(svd: SVDResult, dim: int, std: float) -> dict:
  """Ego embeddings from the leading singular vectors: θ_user = c U_d S_d^{1/2}, θ_item =
  c V_d S_d^{1/2}, so that ⟨θ_u, θ_i⟩ ∝ the rank-d reconstruction of R̃, with c set so
  that the entries' root mean square is `std` (the scale of the normal initialisation).

  Args:
    svd: at least `dim` triples.
    dim: d, the embedding dimension.
    std: root mean square of the entries.
  Returns:
    {"user": [U, d], "item": [I, d]} float32.
  """
  if svd.s.shape[0] < dim:
    raise ValueError(f"the SVD has {svd.s.shape[0]} triples; {dim} are needed.")
  root = jnp.sqrt(jnp.maximum(svd.s[:dim], 0.0))
  user, item = svd.u[:, :dim] * root, svd.v[:, :dim] * root
  n = user.size + item.size
  c = std / jnp.sqrt((jnp.sum(user**2) + jnp.sum(item**2)) / n)
  return {"user": (c * user).astype(jnp.float32), "item": (c * item).astype(jnp.float32)}


def ideal_low_pass_embeddings(
  svd: SVDResult, pairs: np.ndarray, n_users: int, n_items: int
) -> tuple[jax.Array, jax.Array]:
  """GF-CF's ideal low-pass filter as embeddings: users r_u D_I^{-1/2} V_k, items
  D_I^{1/2} V_k, so that ⟨user_u, item_i⟩ = (r_u D_I^{-1/2} V_k V_kᵀ D_I^{1/2})_i.

  Args:
    svd: the triples of R̃ (all k of them are used).
    pairs: [E, 2] the training pairs R (the rows r_u).
  Returns:
    (users [U, k], items [I, k]).
  """
  _, rt, di = normalized_matrix(pairs, n_users, n_items)
  inv_sqrt = jnp.where(di > 0, jax.lax.rsqrt(jnp.maximum(di, 1.0)), 0.0)
  pairs = np.asarray(pairs, np.int64)
  r = _csr(pairs[:, 0], pairs[:, 1], np.ones(len(pairs)), (n_users, n_items))
  users = r @ (svd.v * inv_sqrt[:, None])
  items = svd.v * jnp.sqrt(di)[:, None]
  return users, items
