"""Filtering, id remapping and splits: invariants and every documented handling."""

import numpy as np
import pytest

from maxrec import data, synthetic
from maxrec.config import DataConfig
from maxrec.readers import DataError, RawInteractions


def raw_from(pairs, rating=None, ts=None, fold=None, extra=()):
  pairs = np.asarray(pairs)
  return RawInteractions(
    pairs[:, 0],
    pairs[:, 1],
    rating=None if rating is None else np.asarray(rating, float),
    timestamp=None if ts is None else np.asarray(ts, float),
    fold=None if fold is None else np.asarray(fold, np.int8),
    extra_users=extra,
    source="test",
  )


def pair_set(a):
  return {tuple(x) for x in np.asarray(a).tolist()}


@pytest.fixture(scope="module")
def synth():
  return synthetic.generate(300, 400, 8000, 4, seed=1)


def test_random_split_is_disjoint_covering_and_seeded(synth):
  cfg = DataConfig()
  a = data.build_dataset(synth, cfg, seed=3)
  b = data.build_dataset(synth, cfg, seed=3)
  c = data.build_dataset(synth, cfg, seed=4)
  parts = [pair_set(a.train), pair_set(a.valid), pair_set(a.test)]
  assert sum(map(len, parts)) == len(synth)
  assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
  for split in ("train", "valid", "test"):
    np.testing.assert_array_equal(getattr(a, split), getattr(b, split))
  assert pair_set(a.test) != pair_set(c.test)
  # Per user: RecBole's rule (checked by hand in test_split_counts_matches_recbole_rule).
  n = np.bincount(synth.user, minlength=300)
  want = data.split_counts(n, (0.8, 0.1, 0.1))
  for k, split in enumerate(("train", "valid", "test")):
    np.testing.assert_array_equal(np.bincount(getattr(a, split)[:, 0], minlength=300), want[:, k])


def test_split_counts_matches_recbole_rule():
  got = data.split_counts(np.array([1, 2, 3, 5, 9, 10, 25]), (0.8, 0.1, 0.1))
  # n=1: all train; n=2: train keeps one; n=3,5,9: one each; n=10: 1/1; n=25: 2/2.
  expected = [[1, 0, 0], [1, 0, 1], [1, 1, 1], [3, 1, 1], [7, 1, 1], [8, 1, 1], [21, 2, 2]]
  np.testing.assert_array_equal(got, expected)


def test_ml100k_split_sizes_match_recbole(ml100k_path):
  from maxrec import readers

  ds = data.build_dataset(readers.read_interactions(ml100k_path), DataConfig(), seed=0)
  assert (ds.n_users, ds.n_items) == (943, 1682)
  assert (len(ds.train), len(ds.valid), len(ds.test)) == (80808, 9596, 9596)


def test_temporal_split_puts_latest_in_test():
  pairs = [(0, i) for i in range(10)]
  ts = [5, 1, 9, 3, 7, 2, 8, 0, 6, 4]
  ds = data.build_dataset(raw_from(pairs, ts=ts), DataConfig(split="temporal"), seed=0)
  assert pair_set(ds.test) == {(0, 2)} and pair_set(ds.valid) == {(0, 6)}
  with pytest.raises(DataError, match="temporal needs timestamps"):
    data.build_dataset(raw_from(pairs), DataConfig(split="temporal"), seed=0)


def test_leave_one_out():
  pairs = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (2, 0)]
  ts = [1, 2, 3, 4, 1, 2, 1]
  ds = data.build_dataset(raw_from(pairs, ts=ts), DataConfig(split="loo"), seed=0)
  assert pair_set(ds.test) == {(0, 3), (1, 1)}
  assert pair_set(ds.valid) == {(0, 2)}
  assert pair_set(ds.train) == {(0, 0), (0, 1), (1, 0), (2, 0)}


def test_presplit_carves_validation_from_train():
  pairs = [(0, i) for i in range(10)] + [(0, 10), (1, 0)]
  fold = [0] * 10 + [2, 2]
  ds = data.build_dataset(raw_from(pairs, fold=fold, extra=(7,)), DataConfig(), seed=0)
  assert ds.summary["split"] == "presplit"
  assert len(ds.valid) == 1 and len(ds.train) == 9
  assert pair_set(ds.test) == {(0, 10), (1, 0)}
  assert ds.n_users == 3  # the user listed without items is kept
  assert ds.summary["cold_users"] == 2  # user 1 (test only) and user 7 (no items)


def test_rating_threshold_and_duplicates():
  pairs = [(0, 0), (0, 0), (0, 1), (1, 1), (1, 2)]
  ds = data.build_dataset(
    raw_from(pairs, rating=[2, 5, 4, 1, 5]),
    DataConfig(min_rating=4, split_ratios=(1.0, 0.0, 0.0)),
    seed=0,
  )
  assert ds.summary["removed_below_min_rating"] == 2
  assert ds.summary["duplicates_collapsed"] == 0  # the low-rated copy was removed first
  assert pair_set(ds.train) == {(0, 0), (0, 1), (1, 2)}
  ds = data.build_dataset(raw_from(pairs), DataConfig(split_ratios=(1.0, 0.0, 0.0)), seed=0)
  assert ds.summary["duplicates_collapsed"] == 1 and len(ds.train) == 4


def test_threshold_removing_everything_is_an_error():
  with pytest.raises(
    DataError, match=r"min_rating=6 removes every interaction.*largest rating is 5"
  ):
    data.build_dataset(raw_from([(0, 0)], rating=[5]), DataConfig(min_rating=6), seed=0)
  with pytest.raises(DataError, match="no rating column"):
    data.build_dataset(raw_from([(0, 0)]), DataConfig(min_rating=3), seed=0)


def test_kcore_iterates_until_stable():
  # user 2 has one item; removing it leaves item 2 with one user, which goes next.
  pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (3, 2), (3, 0)]
  cfg = DataConfig(user_core=2, item_core=2, split_ratios=(1.0, 0.0, 0.0))
  ds = data.build_dataset(raw_from(pairs), cfg, seed=0)
  assert pair_set(ds.train) == {(0, 0), (0, 1), (1, 0), (1, 1)}
  assert ds.summary["removed_by_kcore"] == 3
  assert list(ds.user_ids) == [0, 1] and list(ds.item_ids) == [0, 1]


def test_string_ids_are_remapped_and_kept():
  raw = RawInteractions(
    np.array(["b", "a", "b"], object), np.array(["x", "y", "y"], object), source="t"
  )
  ds = data.build_dataset(raw, DataConfig(split_ratios=(1.0, 0.0, 0.0)), seed=0)
  assert list(ds.user_ids) == ["a", "b"] and list(ds.item_ids) == ["x", "y"]
  assert pair_set(ds.train) == {(1, 0), (0, 1), (1, 1)}


def test_cold_items_are_counted():
  raw = synthetic.generate(300, 3000, 6000, 4, seed=1)  # a long tail of rare items
  ds = data.build_dataset(raw, DataConfig(), seed=0)
  seen = set(ds.train[:, 1].tolist())
  cold = sum(i not in seen for i in ds.test[:, 1].tolist())
  assert ds.summary["cold_item_test_interactions"] == cold
  assert cold > 0  # the long tail makes some
  assert any("cold items" in w for w in data.warnings(ds))


def test_meta_split(synth):
  ds0 = data.build_dataset(synth, DataConfig(), seed=0)
  ds = data.build_dataset(synth, DataConfig(), seed=0, meta_ratio=0.1)
  assert pair_set(ds.train) | pair_set(ds.meta) == pair_set(ds0.train)
  assert not pair_set(ds.train) & pair_set(ds.meta)
  n = np.bincount(ds0.train[:, 0], minlength=ds.n_users)
  got = np.bincount(ds.meta[:, 0], minlength=ds.n_users)
  np.testing.assert_array_equal(got, np.where(n >= 5, np.ceil(0.1 * n - 1e-9), 0))


def test_split_ratios_must_sum_to_one():
  with pytest.raises(ValueError, match=r"split_ratios=0.8,0.1,0.2 sums to 1.1, not 1"):
    DataConfig(split_ratios=(0.8, 0.1, 0.2))


def test_train_only_lightgcn_folder_is_split_by_ratios_and_says_so(tmp_path):
  d = tmp_path / "lg"
  d.mkdir()
  rows = [f"{u} " + " ".join(str((u * 7 + k) % 40) for k in range(10)) for u in range(30)]
  (d / "train.txt").write_text("\n".join(rows) + "\n")
  cfg = DataConfig(data_path=str(d), split_ratios=(0.6, 0.2, 0.2))
  ds = data.load_dataset(cfg, seed=0)
  assert ds.summary["split"] == "random"
  assert len(ds.train) == 30 * 6 and len(ds.valid) == 30 * 2 and len(ds.test) == 30 * 2
  text = data.describe(ds)
  assert "--split_ratios=0.6,0.2,0.2" in text and "no test.txt" in text, text


def test_kcore_removing_everything_names_source_flags_and_a_working_core():
  # every user has 2 items and every item 2 users: a 3-core is empty, a 2-core is everything
  pairs = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 0)]
  for cores, suggestion in [
    (dict(user_core=3), "e.g. --user_core=2 --item_core=0 keeps 6 interactions"),
    (dict(item_core=5), "e.g. --user_core=0 --item_core=2 keeps 6 interactions"),
    (dict(user_core=40, item_core=3), "e.g. --user_core=2 --item_core=2 keeps 6 interactions"),
  ]:
    cfg = DataConfig(**cores)
    with pytest.raises(DataError) as e:
      data.build_dataset(raw_from(pairs, extra=(9,)), cfg, seed=0)
    msg = str(e.value)
    assert msg.startswith(
      f"test: k-core filtering (--user_core={cfg.user_core} --item_core={cfg.item_core}) "
      "leaves no user and no interaction: before it, the most active user has 2 "
      "interaction(s) and the most popular item 2. Lower the cores, "
    ), msg
    assert suggestion in msg, msg
  # a star: user 0 has items 0-3, users 1 and 2 item 0; capping the cores at the largest
  # counts (4, 3) is still empty, halving them (2, 1) keeps user 0
  star = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (2, 0)]
  with pytest.raises(DataError, match=r"--user_core=2 --item_core=1 keeps 4 interactions"):
    data.build_dataset(raw_from(star), DataConfig(user_core=4, item_core=3), seed=0)


def write_udata(tmp_path, per_user, n_users=6):
  """A MovieLens file where every user has `per_user` interactions (ratings 1..per_user)."""
  p = tmp_path / "u.data"
  rows = [f"{u}\t{(u + k) % 10}\t{k + 1}\t{k}" for u in range(n_users) for k in range(per_user)]
  p.write_text("\n".join(rows) + "\n")
  return str(p)


def heldout_error(**cfg):
  with pytest.raises(DataError) as e:
    data.load_dataset(DataConfig(**cfg), seed=0)
  return str(e.value)


def test_split_without_heldout_interactions_names_file_and_flags(tmp_path):
  p = write_udata(tmp_path, per_user=5)
  assert heldout_error(data_path=p, split_ratios=(1.0, 0.0, 0.0)) == (
    f"{p}: --split=random leaves no validation and no test interaction to evaluate: "
    "--split_ratios=1,0,0 gives validation and test a share of 0; use e.g. "
    "--split_ratios=0.8,0.1,0.1."
  )
  msg = heldout_error(data_path=p, split="temporal", split_ratios=(0.9, 0.1, 0.0))
  assert msg.startswith(f"{p}: --split=temporal leaves no test interaction"), msg
  assert "--split_ratios=0.9,0.1,0 gives test a share of 0" in msg, msg
  # leave-one-out where every user has one item
  p = write_udata(tmp_path, per_user=1)
  assert heldout_error(data_path=p, split="loo") == (
    f"{p}: --split=loo leaves no validation and no test interaction to evaluate: it needs "
    "users with at least 3 interactions, and no user has more than 1 after filtering. Use "
    "data with at least 3 interactions per user."
  )
  p = write_udata(tmp_path, per_user=2)
  msg = heldout_error(data_path=p, split="loo")
  assert msg.startswith(f"{p}: --split=loo leaves no validation interaction"), msg
  assert "at least 3 interactions, and no user has more than 2" in msg, msg
  # a filter that thinned every user out is named, with its value
  p = write_udata(tmp_path, per_user=4)
  msg = heldout_error(data_path=p, split="loo", min_rating=3)
  assert msg.startswith(f"{p}: --split=loo leaves no validation interaction"), msg
  assert "or lower --min_rating=3, which removed interactions" in msg, msg
  # the splits that hold something out still load, and build_dataset alone allows none
  assert len(data.load_dataset(DataConfig(data_path=p, split="loo"), seed=0).valid) == 6
  cfg = DataConfig(data_path=p, split_ratios=(1.0, 0.0, 0.0))
  assert len(data.build_dataset(data.load_raw(cfg), cfg, seed=0).train) == 24


def test_presplit_without_validation_names_valid_ratio(tmp_path):
  d = tmp_path / "lg"
  d.mkdir()
  (d / "train.txt").write_text("0 1 2 3\n1 2 3 4\n")
  (d / "test.txt").write_text("0 4\n1 5\n")
  source = f"{d}/{{train,test}}.txt"
  assert heldout_error(data_path=str(d), valid_ratio=0.0) == (
    f"{source}: --split=presplit leaves no validation interaction to evaluate: "
    "--valid_ratio=0 carves no validation items from the training file; use e.g. "
    "--valid_ratio=0.1."
  )
  (d / "train.txt").write_text("0 1\n1 2\n")
  msg = heldout_error(data_path=str(d))
  assert msg.startswith(f"{source}: --split=presplit leaves no validation interaction"), msg
  assert "at least 2 interactions in the training file, and no user has more than 1" in msg
  (d / "train.txt").write_text("0 1 4\n1 2 5\n")  # the test pairs repeat training pairs
  msg = heldout_error(data_path=str(d))
  assert msg.startswith(f"{source}: --split=presplit leaves no test interaction"), msg
  assert "every test pair is also a training pair; check that the test file" in msg, msg
