"""The built-in data set: a deterministic synthetic generator with learnable structure.

Users and items get latent factors drawn around a few cluster centres; item popularity is
long-tailed (Zipf) and interaction counts per user are heavy-tailed (log-normal). Each user
picks their items without replacement with probability proportional to
`exp(affinity * <u, v> + log popularity)` (Gumbel top-k), so a recommender that learns the
factors beats popularity. Nothing is downloaded and no file is shipped.
"""

from __future__ import annotations

import numpy as np

from maxrec.readers import RawInteractions


def _counts_per_user(rng, n_users, n_interactions, min_count, max_count, sigma):
  """Heavy-tailed per-user counts in [min_count, max_count] summing to n_interactions."""
  if not n_users * min_count <= n_interactions <= n_users * max_count:
    raise ValueError(
      f"cannot give {n_users} users between {min_count} and {max_count} items each and "
      f"{n_interactions} interactions in total; change the sizes."
    )
  w = rng.lognormal(0.0, sigma, n_users)
  counts = np.full(n_users, min_count, np.int64)
  left = n_interactions - counts.sum()
  while left > 0:
    room = max_count - counts
    share = np.where(room > 0, w, 0.0)
    add = np.minimum(np.floor(left * share / share.sum()).astype(np.int64), room)
    if add.sum() == 0:  # hand out the last few one by one, heaviest users first
      order = np.argsort(-share)[:left]
      add = np.zeros_like(counts)
      add[order[room[order] > 0]] = 1
    counts += add
    left = n_interactions - counts.sum()
  return counts


def generate(
  n_users: int = 2000,
  n_items: int = 3000,
  n_interactions: int = 100_000,
  n_clusters: int = 8,
  seed: int = 0,
  *,
  latent_dim: int = 16,
  affinity: float = 4.0,
  zipf_exponent: float = 0.8,
  activity_sigma: float = 1.0,
  min_per_user: int = 5,
) -> RawInteractions:
  """Generates the built-in implicit-feedback data set.

  Args:
    n_users, n_items, n_interactions: sizes (exact).
    n_clusters: number of taste clusters shared by users and items.
    seed: generator seed; the same arguments give the same data.
    latent_dim: dimension of the true factors.
    affinity: strength of the personal signal against popularity.
    zipf_exponent: popularity of the item at popularity rank r is proportional to r^-exponent.
    activity_sigma: log-normal sigma of the per-user interaction counts.
    min_per_user: every user has at least this many interactions.

  Returns:
    `RawInteractions` with integer ids 0..n-1 and increasing integer timestamps per user.
  """
  rng = np.random.default_rng(seed)
  max_per_user = max(min_per_user, n_items // 4)
  min_per_user = min(min_per_user, max_per_user)
  counts = _counts_per_user(
    rng, n_users, n_interactions, min_per_user, max_per_user, activity_sigma
  )
  centres = rng.normal(size=(n_clusters, latent_dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  user_f = centres[rng.integers(n_clusters, size=n_users)]
  item_f = centres[rng.integers(n_clusters, size=n_items)]
  user_f = user_f + 0.5 * rng.normal(size=user_f.shape) / np.sqrt(latent_dim)
  item_f = item_f + 0.5 * rng.normal(size=item_f.shape) / np.sqrt(latent_dim)
  log_pop = -zipf_exponent * np.log1p(rng.permutation(n_items)).astype(np.float64)

  users, items = [], []
  block = max(1, 4_000_000 // n_items)
  for start in range(0, n_users, block):
    stop = min(start + block, n_users)
    logits = affinity * user_f[start:stop] @ item_f.T + log_pop
    logits += rng.gumbel(size=logits.shape)  # Gumbel top-k = sampling without replacement
    kmax = int(counts[start:stop].max())
    top = np.argpartition(-logits, kmax - 1, axis=1)[:, :kmax]
    top_logits = np.take_along_axis(logits, top, 1)
    top = np.take_along_axis(top, np.argsort(-top_logits, axis=1), 1)
    for row, u in enumerate(range(start, stop)):
      items.append(top[row, : counts[u]])
      users.append(np.full(counts[u], u, np.int64))
  user = np.concatenate(users)
  item = np.concatenate(items).astype(np.int64)
  # Timestamps: each user's interactions in a random order over time.
  timestamp = rng.permutation(len(user)).astype(np.float64)
  return RawInteractions(
    user,
    item,
    timestamp=timestamp,
    source=f"built-in synthetic ({n_users} users, {n_items} items, {n_interactions} "
    f"interactions, {n_clusters} clusters, seed {seed})",
  )
