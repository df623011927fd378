"""Row-sparse MF training: lazy Adam against dense optax.adam, the fast path end to end,
and the fused native step against the XLA one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxrec import data, losses, native, sparse, train
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
    assert cfg.sparse_mf == sparse_updates
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
    assert cfg.sparse_mf == sparse_updates
    start = jax.device_get(tr.state.params)
    for _ in range(2):
      sums, _ = tr.epoch()
    finals.append((jax.device_get(tr.state.params), float(sums["loss"])))
  (p_sparse, l_sparse), (p_dense, l_dense) = finals
  assert not np.allclose(p_sparse["item"], start["item"])  # it trained
  np.testing.assert_allclose(p_sparse["user"], p_dense["user"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(p_sparse["item"], p_dense["item"], rtol=1e-5, atol=1e-7)
  assert l_sparse == pytest.approx(l_dense, rel=1e-5)


# The fused native step (maxrec/bpr_step.cc) against the XLA steps above.

needs_native = pytest.mark.skipif(
  native._compiler() is None, reason="no C++ compiler: the native kernels cannot be built here"
)


def _native_ready():
  """Where a compiler exists (CI, this machine) the kernels must build: an error, not a skip."""
  assert native.available(), native.why()


def _batch(rng, n_users, n_items, b):
  """A batch with repeated users and items shared between positives and negatives."""
  return {
    "user": jnp.asarray(rng.integers(n_users, size=b), jnp.int32),
    "pos": jnp.asarray(rng.integers(n_items, size=b), jnp.int32),
    "neg": jnp.asarray(rng.integers(n_items, size=b), jnp.int32),
  }


@needs_native
@pytest.mark.parametrize("adam", [True, False])
@pytest.mark.parametrize("d,b", [(8, 300), (5, 7), (17, 1500)])  # 8-lane vectors, a scalar
def test_native_step_equals_the_xla_step(adam, d, b):  # tail, both; up to 12 pool chunks
  """Each step from the same state (so rounding differences do not compound): the same
  loss parts, count and updated table up to float rounding."""
  _native_ready()
  rng = np.random.default_rng(d)
  nu, ni, lr, l2 = 23, 31, (0.01 if adam else 0.5), 0.03
  theta = jnp.asarray(rng.normal(scale=0.3, size=(nu + ni, d)), jnp.float32)
  table = jnp.concatenate([theta, jnp.zeros((nu + ni, 2 * d))], 1) if adam else theta
  scratch = jnp.full((nu + ni,), 7, jnp.int32)  # stale contents must not matter
  count = jnp.int32(0)
  for _ in range(4):
    batch = _batch(rng, nu, ni, b)
    if adam:
      want, count_w, _, parts_w, ok_w = sparse.sparse_mf_step(
        table, count, scratch, batch, nu, l2, lr
      )
    else:
      (want, parts_w, ok_w), count_w = sparse.sparse_sgd_step(table, batch, nu, l2, lr), count
    got, count_g, scratch, parts_g, ok_g = sparse.native_sparse_step(
      table, count, scratch, batch, nu, l2, lr, adam=adam
    )
    assert bool(ok_g) and bool(ok_w) and int(count_g) == int(count_w)
    for k in ("loss", "bpr", "l2"):
      assert float(parts_g[k]) == pytest.approx(float(parts_w[k]), rel=1e-5), k
    th = table[:, :d]  # both against the one definition of the batch loss
    ref = losses.bpr_batch(th[batch["user"]], th[nu + batch["pos"]], th[nu + batch["neg"]], l2)
    for k, want_k in zip(("bpr", "l2"), ref):
      assert float(parts_g[k]) == pytest.approx(float(want_k), rel=1e-5), k
    # m and v are linear in the summed gradients: close. Adam's θ step is lr · m̂ / √v̂,
    # whose size stays near lr even where a row's summed gradient nearly cancels and float
    # rounding dominates it, so θ is compared to a fraction of lr.
    np.testing.assert_allclose(got[:, d:], want[:, d:], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got[:, :d], want[:, :d], rtol=1e-4, atol=0.01 * lr if adam else 1e-6)
    table, count = want, count_w
  assert not np.allclose(table[:, :d], theta)  # it trained


@needs_native
def test_native_adam_moments_use_optax_constants():
  """One step from zero moments without repeated rows: m = (1 - b1) g and v = (1 - b2) g²
  with optax's constants, 1 - b rounded from double (1 - float32(0.999) is 1.3e-5 off)."""
  _native_ready()
  rng = np.random.default_rng(5)
  nu, ni, d = 4, 8, 8
  table = jnp.concatenate(
    [jnp.asarray(rng.normal(size=(nu + ni, d)), jnp.float32), jnp.zeros((nu + ni, 2 * d))], 1
  )
  batch = {"user": jnp.arange(4), "pos": jnp.arange(4), "neg": jnp.arange(4, 8)}
  scratch, count = jnp.zeros((nu + ni,), jnp.int32), jnp.int32(0)
  want = sparse.sparse_mf_step(table, count, scratch, batch, nu, 0.0, 0.01)[0]
  got = sparse.native_sparse_step(table, count, scratch, batch, nu, 0.0, 0.01)[0]
  np.testing.assert_allclose(got[:, d:], want[:, d:], rtol=2e-6, atol=0)


@needs_native
@pytest.mark.parametrize("l2", [1e-4, 0.0])
def test_native_and_xla_steps_skip_the_same_overflowing_step(l2):
  """Rows so large that the batch's float32 loss sums overflow: both steps skip (with
  l2 = 0 the XLA loss is 0 · inf = NaN, skipped too)."""
  _native_ready()
  rng = np.random.default_rng(6)
  nu, ni, d = 30, 40, 16
  theta = jnp.asarray(rng.choice([-2e17, 2e17], size=(nu + ni, d)), jnp.float32)
  table = jnp.concatenate([theta, jnp.zeros((nu + ni, 2 * d))], 1)
  batch = _batch(rng, nu, ni, 2000)
  scratch, count = jnp.zeros((nu + ni,), jnp.int32), jnp.int32(0)
  _, _, _, parts_w, ok_w = sparse.sparse_mf_step(table, count, scratch, batch, nu, l2, 0.01)
  got, count_g, _, parts_g, ok_g = sparse.native_sparse_step(
    table, count, scratch, batch, nu, l2, 0.01
  )
  assert not bool(ok_w) and not bool(ok_g) and int(count_g) == 0
  np.testing.assert_array_equal(got, table)


@needs_native
def test_native_step_is_deterministic_and_skips_a_nonfinite_loss():
  _native_ready()
  rng = np.random.default_rng(3)
  nu, ni, d = 40, 60, 16
  table = jnp.asarray(rng.normal(size=(nu + ni, 3 * d)), jnp.float32)
  batch = _batch(rng, nu, ni, 1000)  # chunks shared out over the thread pool
  scratch = jnp.zeros((nu + ni,), jnp.int32)
  run = jax.jit(lambda t, s, c: sparse.native_sparse_step(t, c, s, batch, nu, 1e-4, 0.01)[:4])
  a, b = run(table, scratch, jnp.int32(2)), run(table, scratch, jnp.int32(2))
  np.testing.assert_array_equal(a[0], b[0])  # bit for bit, whatever thread took a chunk
  assert int(a[1]) == 3
  out, count, _, parts, ok = sparse.native_sparse_step(
    table, jnp.int32(2), scratch, batch, nu, 1e-4, 0.01, scale=jnp.nan
  )
  assert not bool(ok) and np.isnan(float(parts["loss"])) and int(count) == 2
  np.testing.assert_array_equal(out, table)  # nothing written


@needs_native
def test_native_step_rejects_bad_input():
  _native_ready()
  table, scratch = jnp.zeros((10, 6)), jnp.zeros((10,), jnp.int32)
  bad = jnp.asarray([0, 1, 10], jnp.int32)  # row 10 of a 10-row table
  with pytest.raises(Exception, match="out of range"):
    jax.block_until_ready(
      native.bpr_step(table, scratch, bad, 0, 1.0, adam=True, lr=0.1, l2_reg=0.0)
    )
  with pytest.raises(Exception, match=r"\[n, 3d\]"):
    jax.block_until_ready(
      native.bpr_step(jnp.zeros((10, 5)), scratch, bad - 1, 0, 1.0, adam=True, lr=0.1, l2_reg=0.0)
    )
  with pytest.raises(TypeError, match="scratch must be int32"):
    native.bpr_step(
      table, scratch.astype(jnp.float32), bad - 1, 0, 1.0, adam=True, lr=0.1, l2_reg=0.0
    )
  with pytest.raises(TypeError, match="ids must be integer"):
    native.bpr_step(
      table, scratch, jnp.zeros((2, 3), jnp.int32), 0, 1.0, adam=True, lr=0.1, l2_reg=0.0
    )
  with pytest.raises(TypeError, match="scalars"):
    native.bpr_step(
      table, scratch, bad - 1, jnp.zeros(2, jnp.int32), 1.0, adam=True, lr=0.1, l2_reg=0.0
    )
  with pytest.raises(TypeError, match="float32"):
    native.bpr_step(
      table.astype(jnp.bfloat16), scratch, bad - 1, 0, 1.0, adam=True, lr=0.1, l2_reg=0.0
    )


@needs_native
@pytest.mark.parametrize("optimizer,lr", [("adam", 0.01), ("sgd", 5.0)])
def test_trainer_native_and_xla_kernels_agree(optimizer, lr):
  """Whole epochs through the Trainer, a NaN step included: the same model and the same
  skipped step with either kernel."""
  _native_ready()
  from maxrec.readers import RawInteractions

  rng = np.random.default_rng(0)
  pairs = np.unique(np.stack([rng.integers(60, size=600), rng.integers(80, size=600)], 1), axis=0)
  raw = RawInteractions(pairs[:, 0], pairs[:, 1], source="test")
  kw = dict(
    weighting="none", optimizer=optimizer, learning_rate=lr, batch_size=32,
    split_ratios=(1.0, 0.0, 0.0), inject_nan_at_step=5,
  )  # fmt: skip
  finals = []
  for kernel in ("native", "xla"):
    cfg = Config.from_flat(**kw, sparse_kernel=kernel)
    tr = train.Trainer(cfg, data.build_dataset(raw, cfg.data, seed=0))
    assert tr.sparse_kernel == kernel
    for _ in range(3):
      sums, _ = tr.epoch()
    s = tr.state
    finals.append(
      (jax.device_get(s.params), float(sums["loss"]), int(s.bad_steps), int(s.first_bad_step))
    )
  (p_n, l_n, bad_n, first_n), (p_x, l_x, bad_x, first_x) = finals
  assert (bad_n, first_n) == (bad_x, first_x) == (1, 5)
  # Rounding differences compound over the epochs (Adam's step has size ~lr even for a
  # gradient that rounding dominates); a wrong update would move rows by ~lr per step.
  for k in ("user", "item"):
    np.testing.assert_allclose(
      p_n[k], p_x[k], rtol=1e-3, atol=1e-4 if optimizer == "adam" else 1e-6
    )
  assert l_n == pytest.approx(l_x, rel=1e-5)


def test_sparse_kernel_choice():
  assert sparse.resolve_kernel("xla", sharded=False) == "xla"
  assert sparse.resolve_kernel("auto", sharded=True) == "xla"
  with pytest.raises(ValueError, match="one CPU device only"):
    sparse.resolve_kernel("native", sharded=True)
  if native.available():
    assert sparse.resolve_kernel("auto", sharded=False) == "native"
  with pytest.raises(ValueError, match="--sparse_kernel='fast'"):
    Config.from_flat(sparse_kernel="fast")
  for other in ({"model": "lightgcn"}, {"weighting": "fixed"}, {"sparse_updates": False}):
    with pytest.raises(ValueError, match="--sparse_kernel=native is the row-sparse MF step"):
      Config.from_flat(**{"weighting": "none", "sparse_kernel": "native", **other})
