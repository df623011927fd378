"""Losses against closed forms and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from maxrec import losses


def test_bpr_closed_form(x64):
  pos, neg = jnp.array([2.0, 0.0]), jnp.array([1.0, 3.0])
  want = np.mean([np.log1p(np.exp(-1.0)), np.log1p(np.exp(3.0))])
  assert float(losses.bpr_loss(pos, neg)) == pytest.approx(want, rel=1e-12)
  check_grads(losses.bpr_loss, (pos, neg), order=2)


def test_bpr_is_stable_for_large_margins():
  assert np.isfinite(float(losses.bpr_loss(jnp.array([-1e4]), jnp.array([1e4]))))
  g = jax.grad(losses.bpr_loss)(jnp.array([1e4]), jnp.array([-1e4]))
  assert np.isfinite(np.asarray(g)).all()


def test_l2_penalty():
  e = jnp.ones((4, 3))
  assert float(losses.l2_penalty(0.5, 4, e, 2 * e)) == pytest.approx(0.5 * (12 + 48) / 8)


def test_info_nce_closed_form(x64):
  for n, tau in ((4, 0.2), (7, 0.5)):
    e = jnp.eye(n)
    got = float(losses.info_nce(e, e, tau).mean())
    assert got == pytest.approx(np.log1p((n - 1) * np.exp(-1 / tau)), rel=1e-10)
  assert float(losses.info_nce(jnp.eye(4), jnp.eye(4), 0.2).mean()) == pytest.approx(
    0.0200123, abs=1e-7
  )


def test_info_nce_masks_invalid_rows(x64):
  rng = np.random.default_rng(0)
  a, b = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(5, 3)))
  valid = jnp.array([True, True, False, True, False])
  masked = losses.info_nce(a, b, 0.3, valid)
  keep = np.flatnonzero(np.asarray(valid))
  direct = losses.info_nce(a[keep], b[keep], 0.3)
  np.testing.assert_allclose(masked[keep], direct, rtol=1e-12)
  assert float(masked[2]) == 0.0 and float(masked[4]) == 0.0


def test_info_nce_second_order_grads_finite_and_correct(x64):
  rng = np.random.default_rng(1)
  a, b = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(4, 3)))
  valid = jnp.array([True, False, True, True])
  check_grads(jax.jit(lambda x, y: losses.info_nce(x, y, 0.2, valid).sum()), (a, b), order=2)
  zero = jnp.zeros((4, 3)).at[0].set(1.0)  # rows at 0: normalisation must stay finite
  h = jax.hessian(lambda x: losses.info_nce(x, x, 0.2).sum())(zero)
  assert np.isfinite(np.asarray(h)).all()


def test_unique_ids():
  uniq, valid = losses.unique_ids(jnp.array([3, 1, 3, 0, 1]))
  assert list(np.asarray(uniq)[np.asarray(valid)]) == [0, 1, 3]
  assert int(valid.sum()) == 3
