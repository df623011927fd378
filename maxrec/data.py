"""Implicit-feedback data sets: filtering, dense ids, per-user splits (docs/method.md §2.1, §5.1).

Host-side NumPy. `load_dataset(config, seed=..., meta_ratio=...)` is the one entry point;
it returns a `Dataset` whose splits are int32 `[n, 2]` arrays of (user, item) dense ids
and whose `user_ids` / `item_ids` map dense ids back to the raw ids of the source.

Documented handling (every case is counted in `Dataset.summary`):
- duplicate (user, item) pairs are collapsed to their earliest occurrence (train before
  test for pre-split data);
- a validation or test item that never occurs in training (a cold item) is kept: it is
  ranked like any other item, with its untrained initial embedding;
- a user with no training interaction (a cold user) keeps its held-out items, which are
  evaluated; both counts are logged as warnings.

Filters that leave no interaction, and (in `load_dataset`) splits that leave nothing to
validate or test on, raise `DataError` naming the source and the flags to change.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from maxrec import readers, synthetic
from maxrec.config import DataConfig
from maxrec.readers import DataError, RawInteractions


@dataclasses.dataclass
class Dataset:
  """A split implicit-feedback data set with dense int32 ids.

  Attributes:
    n_users, n_items: sizes of the id spaces.
    train: [n, 2] (user, item) pairs of the inner training set R_in.
    meta: [n, 2] pairs of the meta split R_meta ([A1]; empty unless carved).
    valid, test: [n, 2] held-out pairs.
    user_ids, item_ids: raw id of each dense id.
    summary: counts of what was read, filtered and split.
  """

  n_users: int
  n_items: int
  train: np.ndarray
  meta: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  user_ids: np.ndarray
  item_ids: np.ndarray
  summary: dict

  @property
  def observed(self) -> np.ndarray:
    """All training pairs, R_in and R_meta: never recommended, never negatives."""
    return np.concatenate([self.train, self.meta])


def to_csr(pairs: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
  """Row-sorted CSR of (row, col) pairs: `(indptr [n_rows+1], cols [n])`."""
  order = np.lexsort((pairs[:, 1], pairs[:, 0]))
  counts = np.bincount(pairs[:, 0], minlength=n_rows)
  indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  return indptr, pairs[order, 1].astype(np.int32)


def _dense(ids: np.ndarray, extra: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
  """Raw ids -> (sorted unique raw ids, dense index per row)."""
  if extra:
    ids_all = np.concatenate([ids, np.asarray(extra, dtype=ids.dtype)])
    uniq, inv = np.unique(ids_all, return_inverse=True)
    return uniq, inv[: len(ids)]
  return np.unique(ids, return_inverse=True)


def _kcore(u: np.ndarray, i: np.ndarray, user_core: int, item_core: int) -> np.ndarray:
  """Boolean keep-mask after iterated k-core filtering (until no row is removed)."""
  keep = np.ones(len(u), bool)
  while True:
    uc = np.bincount(u[keep], minlength=u.max() + 1)
    ic = np.bincount(i[keep], minlength=i.max() + 1)
    new = keep & (uc[u] >= user_core) & (ic[i] >= item_core)
    if new.sum() == keep.sum():
      return keep
    keep = new


def _kcore_error(source: str, u: np.ndarray, i: np.ndarray, cfg: DataConfig) -> DataError:
  """k-core filtering removed every row: says how far the cores must come down."""
  most_u, most_i = int(np.bincount(u).max()), int(np.bincount(i).max())
  uc, ic = min(cfg.user_core, most_u), min(cfg.item_core, most_i)
  while (kept := int(_kcore(u, i, uc, ic).sum())) == 0:  # ends: cores <= 1 keep every row
    uc, ic = uc // 2, ic // 2
  return DataError(
    f"{source}: k-core filtering (--user_core={cfg.user_core} --item_core={cfg.item_core}) "
    f"leaves no user and no interaction: before it, the most active user has {most_u} "
    f"interaction(s) and the most popular item {most_i}. Lower the cores, e.g. "
    f"--user_core={uc} --item_core={ic} keeps {kept:,} interactions (0 turns a filter off)."
  )


def _rank_within_user(user: np.ndarray, order_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorts rows by (user, order_key); returns (order, rank of each sorted row in its user)."""
  order = np.lexsort((order_key, user))
  su = user[order]
  starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]])
  first = np.repeat(starts, np.diff(np.r_[starts, len(su)]))
  return order, np.arange(len(su)) - first


def split_counts(total: np.ndarray, ratios: tuple[float, ...]) -> np.ndarray:
  """Per-user split sizes by RecBole's rule (`_calcu_split_ids`), vectorised.

  Held-out sizes are floor(ratio * n); a held-out split that would get 0 while
  ratio * n > 0 gets 1 taken from train, as long as train keeps more than one item.

  Args:
    total: [n_users] interactions per user.
    ratios: (train, valid, test) or (train, held-out).
  Returns:
    [n_users, len(ratios)] int64 counts summing to `total`.
  """
  total = np.asarray(total, np.int64)
  cnt = np.stack([np.floor(r * total).astype(np.int64) for r in ratios], 1)
  cnt[:, 0] = total - cnt[:, 1:].sum(1)
  for k in range(len(ratios) - 1, 0, -1):
    frac = ratios[k] * total
    bump = (cnt[:, 0] > 1) & (frac > 0) & (frac < 1)
    cnt[bump, k] += 1
    cnt[bump, 0] -= 1
  return cnt


def _assign(user: np.ndarray, key: np.ndarray, counts: np.ndarray, n_users: int) -> np.ndarray:
  """Part index of each row: rows of a user ordered by `key`, cut by `counts`."""
  order, rank = _rank_within_user(user, key)
  bounds = np.cumsum(counts, 1)
  su = user[order]
  part = np.zeros(len(user), np.int8)
  part_sorted = (rank[:, None] >= bounds[su][:, :-1]).sum(1).astype(np.int8)
  part[order] = part_sorted
  return part


def _split(u, i, ts, fold, n_users, cfg: DataConfig, split: str, rng) -> np.ndarray:
  """Part of each row: 0 train, 1 valid, 2 test."""
  rand = rng.random(len(u))
  if split == "presplit":
    if fold is None:
      raise DataError("--split=presplit needs pre-split data (the LightGCN train/test files).")
    part = fold.astype(np.int8).copy()
    tr = np.flatnonzero(part == 0)
    vr = cfg.valid_ratio
    counts = split_counts(np.bincount(u[tr], minlength=n_users), (1 - vr, vr))
    part[tr] = _assign(u[tr], rand[tr], counts, n_users)  # 0 stays train, 1 -> valid
    return part
  total = np.bincount(u, minlength=n_users)
  if split == "random":
    return _assign(u, rand, split_counts(total, cfg.split_ratios), n_users)
  if split in ("temporal", "loo"):
    key = rand
    if ts is not None:
      key = np.lexsort((rand, ts)).argsort().astype(np.float64)  # time, ties at random
    elif split == "temporal":
      raise DataError("--split=temporal needs timestamps, and this source has none.")
    if split == "temporal":
      return _assign(u, key, split_counts(total, cfg.split_ratios), n_users)
    held = np.stack([np.zeros_like(total), (total >= 3), (total >= 2)], 1).astype(np.int64)
    held[:, 0] = total - held[:, 1:].sum(1)
    return _assign(u, key, held, n_users)
  raise DataError(f"Unknown split {split!r}.")


def carve_meta(train: np.ndarray, n_users: int, ratio: float, min_count: int, rng):
  """[A1] Moves ceil(ratio * n) random training items of users with n >= min_count to R_meta.

  Returns:
    (R_in, R_meta) as [n, 2] int32 arrays.
  """
  u = train[:, 0]
  total = np.bincount(u, minlength=n_users)
  take = np.where(total >= min_count, np.ceil(ratio * total - 1e-9), 0).astype(np.int64)
  order, rank = _rank_within_user(u, rng.random(len(u)))
  is_meta = np.zeros(len(u), bool)
  is_meta[order] = rank < take[u[order]]
  return train[~is_meta], train[is_meta]


def build_dataset(
  raw: RawInteractions, cfg: DataConfig, *, seed: int, meta_ratio: float = 0.0
) -> Dataset:
  """Filters, remaps and splits raw interactions (see the module docstring).

  Args:
    raw: the interactions as read.
    cfg: filtering and split options.
    seed: split seed (unless `cfg.split_seed` is set).
    meta_ratio: share of each user's training items moved to R_meta [A1]; 0 for none.
  """
  n_rows = len(raw)
  summary = {"source": raw.source, "rows_read": n_rows, "blank_lines_skipped": raw.blank_lines}
  keep = np.ones(n_rows, bool)
  if cfg.min_rating is not None:
    if raw.rating is None:
      raise DataError(f"{raw.source}: --min_rating is set but the data has no rating column.")
    keep = raw.rating >= cfg.min_rating
    if not keep.any():
      raise DataError(
        f"{raw.source}: --min_rating={cfg.min_rating:g} removes every interaction "
        f"(the largest rating is {raw.rating.max():g}); lower it."
      )
  summary["removed_below_min_rating"] = int(n_rows - keep.sum())

  # Dedupe on first-pass dense ids; keep the earliest occurrence (train before test).
  ru, ri = raw.user[keep], raw.item[keep]
  ts = None if raw.timestamp is None else raw.timestamp[keep]
  fold = None if raw.fold is None else raw.fold[keep]
  _, u0 = _dense(ru)
  _, i0 = _dense(ri)
  pair = u0.astype(np.int64) * (i0.max() + 1) + i0
  sort_keys = [np.arange(len(pair))]
  if ts is not None:
    sort_keys.append(ts)
  if fold is not None:
    sort_keys.append(fold)
  order = np.lexsort(tuple(sort_keys) + (pair,))
  first = order[np.r_[True, pair[order][1:] != pair[order][:-1]]]
  first.sort()
  summary["duplicates_collapsed"] = int(len(pair) - len(first))

  kc = _kcore(u0[first], i0[first], cfg.user_core, cfg.item_core)
  rows = first[kc]
  if not rows.size:
    raise _kcore_error(raw.source, u0[first], i0[first], cfg)
  summary["removed_by_kcore"] = int(len(first) - len(rows))
  extra = raw.extra_users if cfg.user_core == 0 else ()
  user_ids, u = _dense(ru[rows], extra)
  item_ids, i = _dense(ri[rows])
  n_users, n_items = len(user_ids), len(item_ids)
  if cfg.user_core or cfg.item_core:
    summary["kcore_users_removed"] = int(len(np.unique(u0)) - n_users)
    summary["kcore_items_removed"] = int(len(np.unique(i0)) - n_items)
  ts = None if ts is None else ts[rows]
  fold = None if fold is None else fold[rows]

  split = cfg.split
  if split == "auto":
    split = "presplit" if fold is not None else "random"
  ratios = ",".join(f"{r:g}" for r in cfg.split_ratios)
  summary["split_how"] = {
    "presplit": f"the given train/test files, --valid_ratio={cfg.valid_ratio:g} of each "
    "user's training items for validation",
    "random": f"each user's interactions at random by --split_ratios={ratios}",
    "temporal": f"each user's interactions by time by --split_ratios={ratios}",
    "loo": "each user's last interaction for test, the one before for validation",
  }.get(split, "")
  if split == "random" and cfg.split == "auto" and raw.source.endswith("train.txt"):
    summary["split_how"] += " (train.txt has no test.txt beside it)"
  rng = np.random.default_rng(seed if cfg.split_seed is None else cfg.split_seed)
  part = _split(u, i, ts, fold, n_users, cfg, split, rng)
  pairs = np.stack([u, i], 1).astype(np.int32)
  train, valid, test = (pairs[part == k] for k in range(3))
  meta = np.zeros((0, 2), np.int32)
  if meta_ratio > 0:
    train, meta = carve_meta(train, n_users, meta_ratio, cfg.meta_min_interactions, rng)

  seen_items = np.zeros(n_items, bool)
  seen_items[train[:, 1]] = True
  seen_items[meta[:, 1]] = True
  has_train = np.bincount(train[:, 0], minlength=n_users) > 0
  n = len(pairs)
  summary.update(
    split=split,
    n_users=n_users,
    n_items=n_items,
    n_interactions=int(n),
    density=float(n / (n_users * n_items)),
    n_train=len(train),
    n_meta=len(meta),
    n_valid=len(valid),
    n_test=len(test),
    cold_item_valid_interactions=int((~seen_items[valid[:, 1]]).sum()),
    cold_item_test_interactions=int((~seen_items[test[:, 1]]).sum()),
    cold_users=int((~has_train).sum()),
    users_without_valid=int(n_users - len(np.unique(valid[:, 0]))),
    users_without_test=int(n_users - len(np.unique(test[:, 0]))),
  )
  return Dataset(n_users, n_items, train, meta, valid, test, user_ids, item_ids, summary)


def load_raw(cfg: DataConfig) -> RawInteractions:
  """Reads `cfg.data_path`, or generates the built-in data set when it is empty."""
  if not cfg.data_path:
    return synthetic.generate(
      n_users=cfg.synth_users,
      n_items=cfg.synth_items,
      n_interactions=cfg.synth_interactions,
      n_clusters=cfg.synth_clusters,
      seed=cfg.synth_seed,
    )
  return readers.read_interactions(
    cfg.data_path,
    cfg.data_format,
    user_column=cfg.user_column,
    item_column=cfg.item_column,
    rating_column=cfg.rating_column,
    timestamp_column=cfg.timestamp_column,
    delimiter=cfg.delimiter,
  )


def check_heldout(ds: Dataset, cfg: DataConfig) -> None:
  """Raises `DataError` unless the split holds out validation and test interactions.

  The message names the source and the flag to change: a zero share in --split_ratios,
  --valid_ratio=0, or users with too few interactions for the split.
  """
  missing = [name for name, part in (("validation", ds.valid), ("test", ds.test)) if not len(part)]
  if not missing:
    return
  s, split = ds.summary, ds.summary["split"]
  head = f"{s['source']}: --split={split} leaves no {' and no '.join(missing)} interaction"
  if split in ("random", "temporal"):
    zero = [m for m, r in zip(("validation", "test"), cfg.split_ratios[1:]) if r == 0]
    if set(missing) & set(zero):
      ratios = ",".join(f"{r:g}" for r in cfg.split_ratios)
      raise DataError(
        f"{head} to evaluate: --split_ratios={ratios} gives {' and '.join(zero)} a share of "
        "0; use e.g. --split_ratios=0.8,0.1,0.1."
      )
  if split == "presplit" and "validation" in missing and cfg.valid_ratio == 0:
    raise DataError(
      f"{head} to evaluate: --valid_ratio=0 carves no validation items from the training "
      "file; use e.g. --valid_ratio=0.1."
    )
  if split == "presplit" and "test" in missing:
    cores = f"--user_core={cfg.user_core} --item_core={cfg.item_core}"
    kcore = cfg.user_core or cfg.item_core
    raise DataError(
      f"{head} to evaluate: every test pair is also a training pair"
      f"{f' or was removed by k-core filtering ({cores})' if kcore else ''}; check that the "
      f"test file holds the held-out interactions{', or lower the cores' if kcore else ''}."
    )
  if split == "presplit":
    held, need, where = [ds.train, ds.meta, ds.valid], 2, " in the training file"
  else:
    held, where = [ds.train, ds.meta, ds.valid, ds.test], ""
    need = 3 if "validation" in missing else 2
  per_user = np.bincount(np.concatenate([p[:, 0] for p in held]))
  most = int(per_user.max()) if per_user.size else 0
  lower = [f"--min_rating={cfg.min_rating:g}"] if cfg.min_rating is not None else []
  lower += [f"--item_core={cfg.item_core}"] if cfg.item_core else []
  also = f", or lower {' and '.join(lower)}, which removed interactions" if lower else ""
  raise DataError(
    f"{head} to evaluate: it needs users with at least {need} interactions{where}, and no "
    f"user has more than {most} after filtering. Use data with at least {need} interactions "
    f"per user{also}."
  )


def load_dataset(cfg: DataConfig, *, seed: int = 0, meta_ratio: float = 0.0) -> Dataset:
  """Reads (or generates) and splits a data set; `meta_ratio` > 0 carves R_meta [A1].

  Raises `DataError` when the split leaves no validation or test interaction to evaluate
  (`check_heldout`); `build_dataset` alone allows that (e.g. --split_ratios=1,0,0).
  """
  ds = build_dataset(load_raw(cfg), cfg, seed=seed, meta_ratio=meta_ratio)
  check_heldout(ds, cfg)
  return ds


def _split_words(summary: dict) -> str:
  """How the split was made, with the flag that sets it."""
  split, how = summary["split"], summary.get("split_how", "")
  return f"{split} split{': ' + how if how else ''}"


def describe(ds: Dataset) -> str:
  """A short human-readable summary, logged at the start of a run."""
  s = ds.summary
  lines = [
    f"data: {s['source']} ({_split_words(s)})",
    f"  {s['n_users']:,} users x {s['n_items']:,} items, {s['n_interactions']:,} interactions, "
    f"density {s['density']:.4%}",
    f"  train {s['n_train']:,} | meta {s['n_meta']:,} | valid {s['n_valid']:,} | "
    f"test {s['n_test']:,}",
    f"  filtered: {s['removed_below_min_rating']:,} below min_rating, "
    f"{s['duplicates_collapsed']:,} duplicates collapsed, {s['removed_by_kcore']:,} by k-core, "
    f"{s['blank_lines_skipped']:,} blank lines skipped",
  ]
  return "\n".join(lines)


def warnings(ds: Dataset) -> list[str]:
  """Conditions a user should know about (cold items and users)."""
  s, out = ds.summary, []
  cold = s["cold_item_valid_interactions"] + s["cold_item_test_interactions"]
  if cold:
    out.append(
      f"{cold:,} held-out interactions have an item never seen in training (cold items: "
      "kept and ranked with their untrained embedding)."
    )
  if s["cold_users"]:
    out.append(
      f"{s['cold_users']:,} users have no training interaction (cold users: their held-out "
      "items are still evaluated)."
    )
  return out
