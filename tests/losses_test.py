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


def reference_info_nce(a, b, tau, valid):
  """Plain-autodiff InfoNCE (log_softmax over masked logits): the oracle for the VJP."""
  z1 = a / jnp.sqrt(jnp.sum(a * a, -1, keepdims=True))
  z2 = b / jnp.sqrt(jnp.sum(b * b, -1, keepdims=True))
  logits = jnp.where(valid[None, :], z1 @ z2.T / tau, -1e9)
  return jnp.where(valid, -jnp.diagonal(jax.nn.log_softmax(logits, -1)), 0.0)


def _hvp(grad_fn, a, b, argnum, v):
  """Forward-over-reverse: d/dt grad_fn at (a, b) + t v in argument `argnum`."""
  args = [a, b]

  def g(x):
    args[argnum] = x
    return grad_fn(*args)

  return jax.jvp(g, ((a, b)[argnum],), (v,))[1]


def test_info_nce_second_order_grads_finite_and_correct(x64):
  rng = np.random.default_rng(1)
  a, b = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(5, 3)))
  valid = jnp.array([True, False, True, True, True])
  weights = jnp.asarray(rng.random(5))  # a non-uniform cotangent exercises the VJP fully
  f = jax.jit(lambda x, y: jnp.sum(weights * losses.info_nce(x, y, 0.2, valid)))
  ref = lambda x, y: jnp.sum(weights * reference_info_nce(x, y, 0.2, valid))  # noqa: E731
  np.testing.assert_allclose(f(a, b), ref(a, b), rtol=1e-12)
  # The hand-written VJP: reverse mode to second order, against finite differences ...
  check_grads(f, (a, b), order=2, modes=("rev",))
  # ... and forward-over-reverse (what Hessian-vector products use) against plain autodiff.
  v = jnp.asarray(rng.normal(size=(5, 3)))
  for argnum in (0, 1):
    g, g_ref = jax.grad(f, argnum), jax.grad(ref, argnum)
    np.testing.assert_allclose(g(a, b), g_ref(a, b), rtol=1e-10)
    hv = _hvp(g, a, b, argnum, v)
    np.testing.assert_allclose(hv, _hvp(g_ref, a, b, argnum, v), rtol=1e-9, atol=1e-12)
  zero = jnp.zeros((4, 3)).at[0].set(1.0)  # rows at 0: normalisation must stay finite
  h = jax.hessian(lambda x: losses.info_nce(x, x, 0.2).sum())(zero)
  assert np.isfinite(np.asarray(h)).all()


def test_unique_ids():
  uniq, valid = losses.unique_ids(jnp.array([3, 1, 3, 0, 1]))
  assert list(np.asarray(uniq)[np.asarray(valid)]) == [0, 1, 3]
  assert int(valid.sum()) == 3


def test_softmax_ce_closed_form_with_mask_and_padding(x64):
  scores = jnp.array([[1.0, 2.0, 3.0, 0.5], [0.0, -1.0, 2.0, 1.0]])
  pos = jnp.array([1, 3])
  seen = jnp.array([[2, 4], [0, 4]])  # 4 is padding (>= I): dropped
  row0 = np.log(np.exp(1.0) + np.exp(2.0) + np.exp(0.5)) - 2.0
  row1 = np.log(np.exp(-1.0) + np.exp(2.0) + np.exp(1.0)) - 1.0
  got = losses.softmax_ce(scores, pos, seen)
  np.testing.assert_allclose(float(got), (row0 + row1) / 2, rtol=1e-12)
  # the masked scores get no gradient; the others get softmax - onehot
  g = jax.grad(lambda s: losses.softmax_ce(s, pos, seen))(scores)
  assert float(g[0, 2]) == 0.0 and float(g[1, 0]) == 0.0
  p0 = np.exp([1.0, 2.0, 0.5]) / np.sum(np.exp([1.0, 2.0, 0.5]))
  np.testing.assert_allclose(np.asarray(g[0])[[0, 1, 3]], (p0 - [0, 1, 0]) / 2, rtol=1e-12)


def test_bpr_batch_closed_form():
  """mean log(1 + exp(s_uj - s_ui)) and λ/(2B) Σ ‖e‖² over the ego rows, by hand."""
  rng = np.random.default_rng(0)
  eu, ei, ej = (jnp.asarray(rng.normal(size=(5, 3)), jnp.float32) for _ in range(3))
  ego = tuple(jnp.asarray(rng.normal(size=(5, 3)), jnp.float32) for _ in range(3))
  x = np.sum(np.asarray(eu) * (np.asarray(ei) - np.asarray(ej)), 1)
  want_bpr = np.mean(np.log1p(np.exp(-x)))
  bpr, l2 = losses.bpr_batch(eu, ei, ej, 0.3, ego)
  assert float(bpr) == pytest.approx(want_bpr, rel=1e-5)
  assert float(l2) == pytest.approx(0.3 * sum(np.sum(np.square(e)) for e in ego) / 10, rel=1e-5)
  _, l2_mf = losses.bpr_batch(eu, ei, ej, 0.3)  # MF: the final rows are the ego rows
  want_mf = 0.3 * sum(np.sum(np.square(e)) for e in (eu, ei, ej)) / 10
  assert float(l2_mf) == pytest.approx(want_mf, rel=1e-5)
