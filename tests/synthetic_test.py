"""The built-in data set: exact sizes, determinism, the promised shape of the data."""

import numpy as np

from maxrec import synthetic


def test_sizes_and_determinism():
  a = synthetic.generate(500, 800, 20_000, 5, seed=3)
  b = synthetic.generate(500, 800, 20_000, 5, seed=3)
  c = synthetic.generate(500, 800, 20_000, 5, seed=4)
  assert len(a) == 20_000
  np.testing.assert_array_equal(a.user, b.user)
  np.testing.assert_array_equal(a.item, b.item)
  assert not np.array_equal(a.item, c.item)
  pairs = a.user * 800 + a.item
  assert len(np.unique(pairs)) == len(pairs)  # no duplicates
  assert a.user.min() == 0 and a.user.max() == 499 and a.item.max() < 800


def test_long_tails():
  raw = synthetic.generate(2000, 3000, 100_000, 8, seed=0)
  per_user = np.bincount(raw.user, minlength=2000)
  per_item = np.sort(np.bincount(raw.item, minlength=3000))[::-1]
  assert per_user.min() >= 5
  assert per_user.max() > 5 * np.median(per_user)  # heavy-tailed activity
  assert per_item[:300].sum() > 0.3 * len(raw)  # the top 10% of items take > 30%
