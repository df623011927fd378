"""BPR sampling: negatives are never observed positives; epochs cover every pair."""

import numpy as np
import pytest

from maxrec.sampling import Sampler


@pytest.fixture
def dense_user_sampler():
  # user 0 has 7 of 8 items: rejection must still find item 7.
  train = np.array([(0, i) for i in range(6)] + [(1, 0), (1, 1), (2, 3)])
  meta = np.array([(0, 6), (1, 5)])
  return Sampler(train, np.concatenate([train, meta]), 3, 8), train, meta


def test_negatives_avoid_train_and_meta(dense_user_sampler):
  sampler, train, meta = dense_user_sampler
  observed = {tuple(p) for p in np.concatenate([train, meta]).tolist()}
  users = np.repeat(np.arange(3), 2000)
  neg = sampler.negatives(np.random.default_rng(0), users)
  assert not any((u, n) in observed for u, n in zip(users.tolist(), neg.tolist()))
  assert set(neg[users == 0].tolist()) == {7}
  assert set(neg[users == 1].tolist()) == {2, 3, 4, 6, 7}  # uniform over the rest


def test_epoch_covers_every_pair_once_plus_padding(dense_user_sampler):
  sampler, train, _ = dense_user_sampler
  batch = sampler.epoch(np.random.default_rng(0), batch_size=4)
  assert batch["user"].shape == (3, 4) and batch["user"].dtype == np.int32
  pairs = list(zip(batch["user"].ravel().tolist(), batch["pos"].ravel().tolist()))
  assert set(pairs[: len(train)]) == {tuple(p) for p in train.tolist()}
  assert len(set(pairs[: len(train)])) == len(train)
  # second positives are training items of the same user
  train_set = {tuple(p) for p in train.tolist()}
  assert all((u, j) in train_set for u, j in zip(batch["user"].ravel(), batch["pos2"].ravel()))


def test_sampling_is_seeded(dense_user_sampler):
  sampler, _, _ = dense_user_sampler
  a = sampler.epoch(np.random.default_rng(5), 4)
  b = sampler.epoch(np.random.default_rng(5), 4)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_user_with_every_item_is_an_error():
  train = np.array([(0, 0), (0, 1)])
  with pytest.raises(ValueError, match="user 0 interacted with every item"):
    Sampler(train, train, 1, 2)


def test_observed_is_exact_where_the_bloom_filter_has_false_positives():
  """Every pair of a 2,000-user problem, checked against a Python set: the filter may flag
  unobserved pairs (it does, at this load), but the answer must be exact."""
  rng = np.random.default_rng(3)
  n_users, n_items = 2000, 300
  pairs = np.unique(
    np.stack([rng.integers(n_users, size=20000), rng.integers(n_items, size=20000)], 1), axis=0
  )
  sampler = Sampler(pairs, pairs, n_users, n_items)
  users, items = (a.ravel() for a in np.meshgrid(np.arange(n_users), np.arange(n_items)))
  truth = np.zeros((n_users, n_items), bool)
  truth[pairs[:, 0], pairs[:, 1]] = True
  h = sampler._hash(users.astype(np.int64) * n_items + items)
  flagged = ((sampler._bloom[h >> np.uint64(3)] >> (h & np.uint64(7)).astype(np.uint8)) & 1) == 1
  assert flagged[truth[users, items]].all()  # no false negatives
  assert (flagged & ~truth[users, items]).sum() > 1000  # the exact check has work to do
  np.testing.assert_array_equal(sampler.observed(users, items), truth[users, items])


def test_seen_items_rows_hold_each_users_items_then_padding():
  from maxrec.sampling import SeenItems

  pairs = np.array([[0, 3], [2, 1], [0, 1], [2, 4], [2, 0]], np.int32)
  seen = SeenItems(pairs, n_users=4, n_items=5)
  assert seen.width == 3
  rows = seen.rows(np.array([2, 0, 1, 2]))
  assert rows.shape == (4, 3) and rows.dtype == np.int32
  assert sorted(rows[0]) == [0, 1, 4] and sorted(rows[3]) == [0, 1, 4]
  assert sorted(rows[1][rows[1] < 5]) == [1, 3] and rows[1][-1] == 5
  assert (rows[2] == 5).all()  # user 1 has no items
