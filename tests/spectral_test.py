"""Truncated SVD of the normalised interactions, spectral warm start, ideal low-pass filter:
against dense NumPy on small random graphs."""

import jax
import numpy as np
import pytest

from maxrec import spectral


def _pairs(n_users=40, n_items=30, per_user=6, seed=0):
  rng = np.random.default_rng(seed)
  rows = [(u, i) for u in range(n_users) for i in rng.choice(n_items, per_user, replace=False)]
  return np.asarray(rows, np.int64)


def _dense_normalised(pairs, n_users, n_items):
  r = np.zeros((n_users, n_items))
  r[pairs[:, 0], pairs[:, 1]] = 1.0
  du, di = r.sum(1), r.sum(0)
  with np.errstate(divide="ignore"):
    su, si = np.where(du > 0, du**-0.5, 0), np.where(di > 0, di**-0.5, 0)
  return r, su[:, None] * r * si[None, :], di


def test_truncated_svd_matches_dense_svd():
  pairs, nu, ni = _pairs(), 40, 30
  _, rn, _ = _dense_normalised(pairs, nu, ni)
  u_ref, s_ref, vt_ref = np.linalg.svd(rn)
  res = spectral.truncated_svd(pairs, nu, ni, 8, key=jax.random.key(0), iterations=30)
  np.testing.assert_allclose(np.asarray(res.s), s_ref[:8], rtol=1e-4)
  assert abs(float(res.s[0]) - 1.0) < 1e-5  # the normalised matrix's top singular value
  # Singular vectors up to sign: |<u, u_ref>| = 1.
  np.testing.assert_allclose(np.abs(np.sum(np.asarray(res.u) * u_ref[:, :8], 0)), 1, atol=1e-3)
  np.testing.assert_allclose(np.abs(np.sum(np.asarray(res.v) * vt_ref[:8].T, 0)), 1, atol=1e-3)
  assert float(np.max(res.residual)) < 1e-3


def test_rank_is_checked():
  with pytest.raises(ValueError, match="rank=31 must be in"):
    spectral.truncated_svd(_pairs(), 40, 30, 31, key=jax.random.key(0))


def test_spectral_init_scale_and_reconstruction():
  pairs, nu, ni = _pairs(), 40, 30
  _, rn, _ = _dense_normalised(pairs, nu, ni)
  res = spectral.truncated_svd(pairs, nu, ni, 6, key=jax.random.key(1), iterations=30)
  params = spectral.spectral_init(res, 6, std=0.1)
  u, i = np.asarray(params["user"]), np.asarray(params["item"])
  assert u.shape == (40, 6) and i.shape == (30, 6)
  rms = np.sqrt((np.sum(u**2) + np.sum(i**2)) / (u.size + i.size))
  np.testing.assert_allclose(rms, 0.1, rtol=1e-5)
  # <θ_u, θ_i> is proportional to the rank-6 reconstruction U S Vᵀ of R̃.
  a, s, bt = np.linalg.svd(rn)
  recon = (a[:, :6] * s[:6]) @ bt[:6]
  scores = u @ i.T
  c = np.sum(scores * recon) / np.sum(recon * recon)
  np.testing.assert_allclose(scores, c * recon, atol=1e-4 * np.abs(scores).max())
  with pytest.raises(ValueError, match="7 are needed"):
    spectral.spectral_init(res, 7, std=0.1)


def test_ideal_low_pass_embeddings_equal_the_dense_filter():
  pairs, nu, ni = _pairs(seed=2), 40, 30
  r, rn, di = _dense_normalised(pairs, nu, ni)
  res = spectral.truncated_svd(pairs, nu, ni, 10, key=jax.random.key(2), iterations=30)
  users, items = spectral.ideal_low_pass_embeddings(res, pairs, nu, ni)
  v = np.asarray(res.v)
  expected = r @ np.diag(di**-0.5) @ v @ v.T @ np.diag(di**0.5)
  np.testing.assert_allclose(np.asarray(users) @ np.asarray(items).T, expected, atol=1e-4)
