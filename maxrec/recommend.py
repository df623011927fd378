"""Saving a trained model with its id mappings, loading it, recommending in raw ids.

A saved model is one `.npz` file (no pickle):
  user_emb [U, d], item_emb [I, d]   the final (scoring) embeddings of the selected epoch
  user_ids [U], item_ids [I]         raw ids (int64 or unicode strings)
  seen_indptr [U+1], seen_items [n]  CSR of every interaction in the data set: these are
                                     never recommended again ("unseen items" only)
  config                             the run's configuration as JSON text
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from maxrec.data import Dataset, to_csr
from maxrec.metrics import block_pairs, select_top_k, top_k_method

MODEL_FILE = "model.npz"


def _raw_array(ids: np.ndarray) -> np.ndarray:
  """Raw ids as a pickle-free array: int64 when every id is an integer, else strings."""
  if ids.dtype.kind in "iu":
    return ids.astype(np.int64)
  return np.asarray([str(x) for x in ids], dtype=np.str_)


def save_model(path: str, user_emb, item_emb, ds: Dataset, config: dict) -> str:
  """Writes the model file atomically (a temporary file, then a rename)."""
  everything = np.concatenate([ds.train, ds.meta, ds.valid, ds.test])
  indptr, items = to_csr(everything, ds.n_users)
  tmp = path + ".tmp.npz"
  np.savez(
    tmp,
    user_emb=np.asarray(user_emb, np.float32),
    item_emb=np.asarray(item_emb, np.float32),
    user_ids=_raw_array(ds.user_ids),
    item_ids=_raw_array(ds.item_ids),
    seen_indptr=indptr,
    seen_items=items,
    config=np.asarray(json.dumps(config)),
  )
  os.replace(tmp, path)
  return path


@dataclasses.dataclass
class SavedModel:
  """A loaded model: embeddings, raw-id mappings and each user's known items."""

  user_emb: np.ndarray
  item_emb: np.ndarray
  user_ids: np.ndarray
  item_ids: np.ndarray
  seen_indptr: np.ndarray
  seen_items: np.ndarray
  config: dict

  def user_index(self, raw_users) -> np.ndarray:
    """Dense ids of raw user ids given as strings or numbers.

    Raises:
      ValueError: naming the first id the model does not know.
    """
    lookup = {str(u): i for i, u in enumerate(self.user_ids.tolist())}
    out = []
    for u in raw_users:
      if str(u) not in lookup:
        raise ValueError(
          f"user {u!r} is not in the trained model (it knows {len(lookup):,} users)."
        )
      out.append(lookup[str(u)])
    return np.asarray(out, np.int32)


def load_model(path: str) -> SavedModel:
  """Loads a model written by `save_model` (a file, or a run's work directory)."""
  if os.path.isdir(path):
    path = os.path.join(path, MODEL_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{path}: no saved model; train one with python -m experiments.train.")
  with np.load(path, allow_pickle=False) as z:
    return SavedModel(
      user_emb=z["user_emb"],
      item_emb=z["item_emb"],
      user_ids=z["user_ids"],
      item_ids=z["item_ids"],
      seen_indptr=z["seen_indptr"],
      seen_items=z["seen_items"],
      config=json.loads(str(z["config"])),
    )


@functools.partial(jax.jit, static_argnames=("k", "method"))
def _topk_block(user_emb, item_emb, mask_row, mask_col, k, method):
  scores = user_emb @ item_emb.T
  scores = scores.at[mask_row, mask_col].set(-jnp.inf, mode="drop")
  return select_top_k(scores, k, method)


def recommend(model: SavedModel, users=None, k: int = 10, batch_size: int = 1024) -> list[tuple]:
  """Top-k items each user has not interacted with, in raw ids.

  Args:
    model: a `SavedModel`.
    users: raw user ids, or None for every user.
    k: list length (at most the number of items; fewer when a user has seen almost all).
    batch_size: users scored at once (bounds memory to batch_size x items scores).
  Returns:
    Rows (raw user, rank 1..k, raw item, score), users in the order given.
  """
  n_users, n_items = model.user_emb.shape[0], model.item_emb.shape[0]
  dense = np.arange(n_users, dtype=np.int32) if users is None else model.user_index(users)
  k = int(min(k, n_items))
  seen = np.stack(
    [np.repeat(np.arange(n_users), np.diff(model.seen_indptr)), model.seen_items], 1
  ).astype(np.int64)
  item_emb = jnp.asarray(model.item_emb)
  # The same lists by any method; on the CPU the native kernel is faster than lax.top_k.
  method = "native" if top_k_method(model.user_emb, item_emb) == "native" else "lax"
  rows = []
  for start in range(0, len(dense), batch_size):
    block = dense[start : start + batch_size]
    pad = np.zeros(batch_size if len(dense) > batch_size else len(block), np.int32)
    pad[: len(block)] = block
    valid = np.arange(len(pad)) < len(block)
    mask_row, mask_col = block_pairs(
      seen, n_users + 1, np.where(valid, pad, n_users)[None], len(pad)
    )
    scores, items = _topk_block(
      jnp.asarray(model.user_emb[pad]),
      item_emb,
      jnp.asarray(mask_row[0]),
      jnp.asarray(mask_col[0]),
      k,
      method,
    )
    scores, items = np.asarray(scores), np.asarray(items)
    for r, u in enumerate(block):
      for rank in range(k):
        if np.isfinite(scores[r, rank]):
          rows.append(
            (
              model.user_ids[u].item(),
              rank + 1,
              model.item_ids[items[r, rank]].item(),
              float(scores[r, rank]),
            )
          )
  return rows
