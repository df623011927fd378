"""Row-sparse MF training: lazy Adam against dense optax.adam, and the fast path end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxrec import data, sparse, steps, train
from maxrec.config import Config


def test_lazy_adam_equals_dense_adam_on_rows_touched_every_step(x64):
  """Rows in every batch (with repeats) follow optax.adam exactly; the others never move."""
  rng = np.random.default_rng(0)
  n, d, lr = 7, 3, 0.05
  table = jnp.asarray(rng.normal(size=(n, d)))
  slab = jnp.concatenate([table, jnp.zeros((n, 2 * d))], 1)
  dense, tx = table, optax.adam(lr)
  opt = tx.init(dense)
  for t in range(1, 6):
    ids = jnp.asarray([0, 2, 2, 5, 0, 2])  # rows 0, 2, 5 every step, with repeats
    grads = jnp.asarray(rng.normal(size=(6, d)))
    slab, _ = sparse.lazy_adam_rows(slab, ids, grads, jnp.int32(t), lr)
    g_dense = jnp.zeros((n, d)).at[ids].add(grads)
    upd, opt = tx.update(g_dense, opt, dense)
    dense = optax.apply_updates(dense, upd)
  touched, untouched = np.array([0, 2, 5]), np.array([1, 3, 4, 6])
  np.testing.assert_allclose(slab[touched, :d], dense[touched], rtol=1e-12)
  np.testing.assert_array_equal(slab[untouched, :d], table[untouched])
  assert np.all(np.asarray(slab[untouched, d:]) == 0)  # untouched moments stay zero


def test_representatives_pick_one_occurrence_per_id_whatever_the_scratch_holds():
  ids = jnp.asarray([4, 1, 4, 4, 0, 1, 7])
  scratch = jnp.asarray([9, -3, 5, 5, 2, 0, 0, 6, 1])  # stale contents must not matter
  _, rep = sparse.representatives(scratch, ids)
  rep, ids_np = np.asarray(rep), np.asarray(ids)
  for p, r in enumerate(rep):
    assert ids_np[r] == ids_np[p]  # an occurrence of the same id
    assert rep[r] == r  # which represents itself
  assert sorted(ids_np[rep == np.arange(len(rep))]) == [0, 1, 4, 7]  # one per distinct id


def test_a_skipped_update_writes_nothing(x64):
  slab = jnp.asarray(np.random.default_rng(1).normal(size=(5, 6)))
  out, _ = sparse.lazy_adam_rows(
    slab, jnp.asarray([1, 1, 3]), jnp.full((3, 2), jnp.nan), jnp.int32(1), 0.1, apply=False
  )
  np.testing.assert_array_equal(out, slab)


def test_lazy_adam_skips_untouched_rows_where_dense_adam_drifts(x64):
  """The documented difference: after a row leaves the batch, dense Adam keeps moving it
  on its momentum; lazy Adam does not."""
  n, d, lr = 3, 2, 0.1
  slab = jnp.zeros((n, 3 * d))
  slab, _ = sparse.lazy_adam_rows(slab, jnp.asarray([1]), jnp.ones((1, d)), jnp.int32(1), lr)
  after_first = np.asarray(slab[1, :d])
  slab, _ = sparse.lazy_adam_rows(slab, jnp.asarray([0]), jnp.ones((1, d)), jnp.int32(2), lr)
  np.testing.assert_array_equal(slab[1, :d], after_first)


def test_sparse_and_dense_mf_training_agree_when_every_row_is_touched():
  """Full-batch epochs where every item is a positive touch every row at every step: both
  paths then coincide."""
  from maxrec.readers import RawInteractions

  pairs = np.array([(u, (3 * u + k) % 30) for u in range(20) for k in range(10)])
  raw = RawInteractions(pairs[:, 0], pairs[:, 1], source="test")
  kw = dict(weighting="none", batch_size=1024, split_ratios=(1.0, 0.0, 0.0), learning_rate=0.01)
  finals = []
  for sparse_updates in (True, False):
    cfg = Config.from_flat(**kw, sparse_updates=sparse_updates)
    ds = data.build_dataset(raw, cfg.data, seed=0)
    tr = train.Trainer(cfg, ds)
    assert steps.uses_sparse_updates(cfg) == sparse_updates
    for _ in range(5):
      sums, _ = tr.epoch()
    finals.append((jax.device_get(tr.state.params), float(sums["loss"])))
  (p_sparse, l_sparse), (p_dense, l_dense) = finals
  np.testing.assert_allclose(p_sparse["user"], p_dense["user"], rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(p_sparse["item"], p_dense["item"], rtol=2e-4, atol=1e-5)
  assert l_sparse == pytest.approx(l_dense, rel=1e-5)


def test_sparse_sgd_equals_dense_sgd_when_most_rows_are_untouched():
  """SGD's update of an untouched row is zero, so the row-sparse path is dense SGD exactly
  (up to float summation order), whatever the batches cover."""
  from maxrec.readers import RawInteractions

  rng = np.random.default_rng(0)
  pairs = np.unique(np.stack([rng.integers(60, size=400), rng.integers(80, size=400)], 1), axis=0)
  raw = RawInteractions(pairs[:, 0], pairs[:, 1], source="test")
  kw = dict(
    weighting="none", optimizer="sgd", learning_rate=5.0, batch_size=16,
    split_ratios=(1.0, 0.0, 0.0),
  )  # fmt: skip
  finals = []
  for sparse_updates in (True, False):
    cfg = Config.from_flat(**kw, sparse_updates=sparse_updates)
    tr = train.Trainer(cfg, data.build_dataset(raw, cfg.data, seed=0))
    assert steps.uses_sparse_updates(cfg) == sparse_updates
    start = jax.device_get(tr.state.params)
    for _ in range(2):
      sums, _ = tr.epoch()
    finals.append((jax.device_get(tr.state.params), float(sums["loss"])))
  (p_sparse, l_sparse), (p_dense, l_dense) = finals
  assert not np.allclose(p_sparse["item"], start["item"])  # it trained
  np.testing.assert_allclose(p_sparse["user"], p_dense["user"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(p_sparse["item"], p_dense["item"], rtol=1e-5, atol=1e-7)
  assert l_sparse == pytest.approx(l_dense, rel=1e-5)
