"""Full-ranking top-K metrics: Recall, NDCG, Precision, HitRate, MRR (docs/method.md §5.2).

Every item is ranked for every evaluated user, with the user's masked items (training
items; at test time also validation items) excluded. Users are scored in blocks of
`batch_size`, so memory is bounded by `batch_size x n_items` scores; the whole score matrix
is never built. Users without held-out items are excluded and counted.

Definitions, per user u with held-out set T_u and hit_r = 1[item at rank r in T_u]:
  Recall@K    = sum_{r<=K} hit_r / |T_u|
  Precision@K = sum_{r<=K} hit_r / K
  NDCG@K      = sum_{r<=K} hit_r / log2(r+1)  /  sum_{r=1}^{min(K,|T_u|)} 1 / log2(r+1)
  Hit@K       = 1[sum_{r<=K} hit_r > 0]
  MRR@K       = 1 / (rank of the first hit within K), else 0
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from maxrec import native
from maxrec.data import to_csr

METRICS = ("recall", "ndcg", "precision", "hit", "mrr")
TOP_K_CHUNK = 32  # chunk size of the CPU two-level top-k (`experiments/topk_bench.py`)
TOP_K_METHODS = ("lax", "two_level", "native")


@struct.dataclass
class EvalSet:
  """Held-out items and masks of the evaluated users, in padded blocks.

  Attributes:
    users: [n_blocks, block] user ids (padding rows hold user 0 and `valid` False).
    valid: [n_blocks, block] bool.
    n_relevant: [n_blocks, block] |T_u| as float32.
    mask_row, mask_col: [n_blocks, m] (row in block, item) to exclude; padding row = block.
    rel_row, rel_col: [n_blocks, r] (row in block, item) held out; padding row = block.
    n_users: number of evaluated users (static).
    n_excluded: users without held-out items, not evaluated (static).
  """

  users: jax.Array
  valid: jax.Array
  n_relevant: jax.Array
  mask_row: jax.Array
  mask_col: jax.Array
  rel_row: jax.Array
  rel_col: jax.Array
  n_users: int = struct.field(pytree_node=False)
  n_excluded: int = struct.field(pytree_node=False)


def block_pairs(pairs: np.ndarray, n_users: int, users: np.ndarray, block: int):
  """Pairs of each block of users, as padded (row in block, item) arrays.

  Args:
    pairs: [n, 2] (user, item).
    n_users: user id space (users >= it have no pairs: use it for padding rows).
    users: [n_blocks, block] user ids.
    block: rows per block; padding entries get row `block`, which scatters drop.
  Returns:
    (rows, cols), each [n_blocks, max pairs in a block] int32.
  """
  indptr, items = to_csr(pairs, n_users)
  n_blocks = users.shape[0]
  rows, cols = [], []
  for b in range(n_blocks):
    bu = users[b]
    counts = indptr[bu + 1] - indptr[bu]
    starts = indptr[bu]
    local = np.repeat(np.arange(len(bu)), counts)
    offs = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    rows.append(local)
    cols.append(items[np.repeat(starts, counts) + offs])
  width = max(1, max(len(r) for r in rows))
  row = np.full((n_blocks, width), block, np.int32)  # `block` is out of range: dropped
  col = np.zeros((n_blocks, width), np.int32)
  for b, (r, c) in enumerate(zip(rows, cols)):
    row[b, : len(r)] = r
    col[b, : len(c)] = c
  return row, col


def build_eval_set(
  heldout: np.ndarray,
  exclude: np.ndarray,
  n_users: int,
  batch_size: int = 1024,
  multiple_of: int = 1,
) -> EvalSet:
  """Prepares evaluation of `heldout` pairs, masking the `exclude` pairs.

  Args:
    heldout: [n, 2] (user, item) pairs to find (validation or test).
    exclude: [m, 2] pairs never to rank (training, and validation when testing).
    n_users: user id space size.
    batch_size: users per block (bounds memory).
    multiple_of: blocks are a multiple of this many users (the devices they are split over).
  """
  counts = np.bincount(heldout[:, 0], minlength=n_users)
  users = np.flatnonzero(counts > 0).astype(np.int32)
  if users.size == 0:
    raise ValueError("no user has a held-out interaction to evaluate.")
  block = int(min(batch_size, users.size))
  block = -(-block // multiple_of) * multiple_of
  n_blocks = -(-users.size // block)
  padded = np.zeros(n_blocks * block, np.int32)
  padded[: users.size] = users
  valid = np.arange(n_blocks * block) < users.size
  users_b = padded.reshape(n_blocks, block)
  # Padding rows point at user 0 but are invalid; give them no pairs.
  pad_free = np.where(valid.reshape(n_blocks, block), users_b, n_users)
  ext = n_users + 1
  mask_row, mask_col = block_pairs(exclude, ext, pad_free, block)
  rel_row, rel_col = block_pairs(heldout, ext, pad_free, block)
  return EvalSet(
    users=jnp.asarray(users_b),
    valid=jnp.asarray(valid.reshape(n_blocks, block)),
    n_relevant=jnp.asarray(
      np.where(valid, counts[padded], 1).reshape(n_blocks, block), jnp.float32
    ),
    mask_row=jnp.asarray(mask_row),
    mask_col=jnp.asarray(mask_col),
    rel_row=jnp.asarray(rel_row),
    rel_col=jnp.asarray(rel_col),
    n_users=int(users.size),
    n_excluded=int(n_users - users.size),
  )


def _topk_metrics(hits: jax.Array, n_rel: jax.Array, ks: tuple[int, ...]) -> jax.Array:
  """Per-user metrics from the hit matrix `[b, kmax]`; returns `[b, len(ks) * 5]`."""
  kmax = hits.shape[1]
  ranks = jnp.arange(1, kmax + 1, dtype=jnp.float32)
  discount = 1.0 / jnp.log2(ranks + 1.0)
  out = []
  for k in ks:
    h = hits[:, : min(k, kmax)].astype(jnp.float32)
    n_hit = h.sum(1)
    dcg = (h * discount[: h.shape[1]]).sum(1)
    ideal_len = jnp.minimum(jnp.minimum(n_rel, k), kmax)
    idcg = jnp.sum(jnp.where(ranks[None, :] <= ideal_len[:, None], discount[None, :], 0.0), 1)
    first = jnp.argmax(h, axis=1)
    out += [
      n_hit / n_rel,
      jnp.where(idcg > 0, dcg / jnp.where(idcg > 0, idcg, 1.0), 0.0),
      n_hit / k,
      (n_hit > 0).astype(jnp.float32),
      jnp.where(n_hit > 0, 1.0 / (first + 1.0), 0.0),
    ]
  return jnp.stack(out, 1)


def two_level_top_k(
  scores: jax.Array, k: int, chunk: int = 32, n_valid: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """Exact top-k values and ids of `scores[:, :n_valid]` by way of the k best chunks.

  Any element outside the k chunks with the largest maxima is at most the k-th largest
  chunk maximum, so it cannot beat k elements. Chunks are gathered in id order, so ties
  break towards the lower id, as `lax.top_k` does: the result equals `lax.top_k`'s,
  ties included. On CPU at Gowalla size, matmul included, it takes 2.3 s against 3.2 s
  with `lax.top_k` (`python -m experiments.topk_bench`): XLA's CPU `top_k` over 41k
  columns is slow.

  Args:
    scores: [b, m]; m should be a multiple of `chunk` (else a padded copy is made).
    k: how many to return, at most n_valid.
    chunk: elements per chunk.
    n_valid: columns at or beyond it are padding and never returned (default: m).
  Returns:
    (values [b, k], ids [b, k]), best first.
  """
  b, m = scores.shape
  n = m if n_valid is None else n_valid
  w = -(-m // chunk)
  if w < k:  # fewer chunks than k: nothing to gain
    return jax.lax.top_k(scores[:, :n], k)
  if w * chunk != m:
    scores = jnp.pad(scores, ((0, 0), (0, w * chunk - m)))
  s3 = scores.reshape(b, w, chunk)
  # The select on the column id (padding -> -inf) also makes XLA's CPU backend emit the
  # chunk maxima as one vectorised loop fusion, 2x faster than a bare reshape + max.
  col = jnp.arange(w * chunk, dtype=jnp.int32).reshape(w, chunk)
  maxima = jnp.where(col < n, s3, -jnp.inf).max(-1)
  _, best = jax.lax.top_k(maxima, k)
  best = jnp.sort(best, axis=1)
  cand = jnp.take_along_axis(s3, best[:, :, None], axis=1).reshape(b, k * chunk)
  cand_ids = (best[:, :, None] * chunk + jnp.arange(chunk)).reshape(b, k * chunk)
  values, pos = jax.lax.top_k(jnp.where(cand_ids < n, cand, -jnp.inf), k)
  return values, jnp.take_along_axis(cand_ids, pos, axis=1)


def _hits(top_items: jax.Array, rel_row: jax.Array, rel_col: jax.Array) -> jax.Array:
  """Which of each row's top items are held out: [b, k] bool.

  Each held-out pair (row, item) looks for its item among its row's k top items, and its
  match is scattered back: a gather of r rows and one scatter, with no dense
  [b, n_items] relevance matrix and no per-item search (each costs a pass or a gather
  per top item, several times this on the CPU).

  Args:
    top_items: [b, k] item ids.
    rel_row, rel_col: [r] held-out pairs (row in block, item); rows >= b are padding.
  """
  b, k = top_items.shape
  match = top_items[jnp.minimum(rel_row, b - 1)] == rel_col[:, None]  # [r, k]
  found = jnp.zeros((b, k), jnp.int32).at[rel_row].max(match.astype(jnp.int32), mode="drop")
  return found > 0


def top_k_method(*arrays: jax.Array) -> str:
  """The top-k `evaluate` uses by default for `arrays` (the embeddings and eval set).

  Accelerators: "lax" (`lax.top_k`, fast there). CPU: XLA's `top_k` costs ~6 us a row, so
  "native" (the FFI kernel of `maxrec.native`) when it is available, the embeddings are
  float32 (its one input type) and everything sits on one device (a custom call cannot
  be split across a mesh); else "two_level".
  """
  if jax.default_backend() != "cpu":
    return "lax"
  devices, floats = set(), set()
  for a in arrays:
    if isinstance(a, jax.Array):
      devices |= a.sharding.device_set
    if jnp.issubdtype(a.dtype, jnp.floating):
      floats.add(jnp.dtype(a.dtype))
  if len(devices) <= 1 and floats <= {jnp.dtype(jnp.float32)} and native.available():
    return "native"
  return "two_level"


def select_top_k(scores: jax.Array, k: int, method: str, n_valid: int | None = None):
  """`lax.top_k(scores[:, :n_valid], k)` by `method` (see `top_k_method`): all three give
  the same values and ids (the two-level one for NaN-free scores).

  Args:
    scores: [b, m] float; columns from `n_valid` on are padding ("two_level" only, whose
      table is padded to whole chunks).
    k: how many to return per row.
    method: "lax", "two_level" or "native".
  Returns:
    (values [b, k], ids [b, k]), best first.
  """
  if method == "two_level":
    return two_level_top_k(scores, k, TOP_K_CHUNK, n_valid=n_valid)
  if method == "native":
    return native.top_k(scores, k)
  return jax.lax.top_k(scores, k)


@functools.partial(jax.jit, static_argnames=("ks", "method"))
def _evaluate(user_emb, item_emb, es: EvalSet, ks: tuple[int, ...], method: str):
  n_items = item_emb.shape[0]
  kmax = min(max(ks), n_items)
  if method == "two_level":  # zero rows up to whole chunks: no padded copy of each block
    item_emb = jnp.pad(item_emb, ((0, -n_items % TOP_K_CHUNK), (0, 0)))

  def one_block(carry, xs):
    users, valid, n_rel, mr, mc, rr, rc = xs
    scores = user_emb[users] @ item_emb.T
    scores = scores.at[mr, mc].set(-jnp.inf, mode="drop")
    top_scores, top_items = select_top_k(scores, kmax, method, n_valid=n_items)
    hits = _hits(top_items, rr, rc) & (top_scores > -jnp.inf)
    m = _topk_metrics(hits, n_rel, ks)
    return carry + jnp.sum(jnp.where(valid[:, None], m, 0.0), 0), None

  xs = (es.users, es.valid, es.n_relevant, es.mask_row, es.mask_col, es.rel_row, es.rel_col)
  init = jnp.zeros(len(ks) * len(METRICS), jnp.float32)
  total, _ = jax.lax.scan(one_block, init, xs)
  return total / es.n_users


def evaluate(
  user_emb: jax.Array,
  item_emb: jax.Array,
  eval_set: EvalSet,
  ks: tuple[int, ...] = (10, 20, 50),
  top_k: str | None = None,
) -> dict[str, float]:
  """Mean full-ranking metrics over the evaluated users.

  Args:
    user_emb: [n_users, d] final user embeddings.
    item_emb: [n_items, d] final item embeddings (scores are inner products).
    eval_set: from `build_eval_set`.
    ks: cut-offs K.
    top_k: "lax", "two_level" or "native" (all exact, with the same tie order); default
      `top_k_method(...)`, the fastest one for where the arrays are.
  Returns:
    {"recall@10": ..., "ndcg@10": ..., ...} as Python floats.
  """
  method = top_k or top_k_method(user_emb, item_emb, eval_set.users)
  if method not in TOP_K_METHODS:
    raise ValueError(f"top_k={method!r}: choose one of {', '.join(TOP_K_METHODS)}")
  values = np.asarray(_evaluate(user_emb, item_emb, eval_set, tuple(ks), method))
  names = [f"{m}@{k}" for k in ks for m in METRICS]
  return {n: float(v) for n, v in zip(names, values)}


def popularity_embeddings(train: np.ndarray, n_users: int, n_items: int):
  """The popularity baseline as embeddings: scores = training count of the item."""
  counts = np.bincount(train[:, 1], minlength=n_items).astype(np.float32)
  return jnp.ones((n_users, 1), jnp.float32), jnp.asarray(counts[:, None])
