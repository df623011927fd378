"""Graph propagation against a dense reference (docs/method.md T10)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxrec import graph as graph_lib

# 5 users x 6 items; user 4 and item 5 are isolated.
PAIRS = np.array([(0, 0), (0, 2), (1, 1), (1, 2), (2, 3), (3, 0), (3, 4), (2, 2)])


def dense_reference(pairs, n_users, n_items, keep=None):
  """Â = D^-1/2 A D^-1/2 built densely with NumPy; isolated nodes get 0."""
  n = n_users + n_items
  a = np.zeros((n, n))
  for e, (u, i) in enumerate(pairs):
    if keep is None or keep[e]:
      a[u, n_users + i] = a[n_users + i, u] = 1.0
  deg = a.sum(1)
  inv = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1e-300)), 0.0)
  return inv[:, None] * a * inv[None, :]


@pytest.fixture
def g():
  return graph_lib.build_graph(PAIRS, 5, 6)


@pytest.mark.parametrize("kernel", graph_lib.KERNELS)
def test_propagation_equals_dense_mean_of_powers(x64, g, kernel):
  a_hat = dense_reference(PAIRS, 5, 6)
  w = graph_lib.edge_weights(g, dtype=jnp.float64)
  np.testing.assert_allclose(graph_lib.dense_adjacency(g, w), a_hat, atol=1e-15)
  e0 = np.random.default_rng(0).normal(size=(11, 4))
  want = sum(np.linalg.matrix_power(a_hat, k) @ e0 for k in range(4)) / 4
  got = graph_lib.propagate(g, w, jnp.asarray(e0), 3, kernel=kernel)
  np.testing.assert_allclose(got, want, atol=1e-12)


def test_all_ones_mask_is_the_base_graph(x64, g):
  base = graph_lib.edge_weights(g, dtype=jnp.float64)
  ones = graph_lib.edge_weights(g, jnp.ones(g.n_edges), dtype=jnp.float64)
  np.testing.assert_array_equal(base, ones)


def test_degrees_recomputed_after_dropout_and_isolated_nodes_are_zero(x64, g):
  keep = np.array([1, 0, 1, 1, 0, 1, 1, 1], float)
  w = graph_lib.edge_weights(g, jnp.asarray(keep), dtype=jnp.float64)
  np.testing.assert_allclose(
    graph_lib.dense_adjacency(g, w), dense_reference(PAIRS, 5, 6, keep), atol=1e-15
  )
  assert np.isfinite(np.asarray(w)).all()
  # dropping every edge of a node leaves it isolated: zero rows, no NaN
  all_off = graph_lib.edge_weights(g, jnp.zeros(g.n_edges), dtype=jnp.float64)
  assert np.all(np.asarray(all_off) == 0)
  out = graph_lib.propagate(g, w, jnp.ones((11, 2)), 2)
  np.testing.assert_allclose(out[4], 1.0 / 3)  # user 4 is isolated: only layer 0 counts
  np.testing.assert_allclose(out[5 + 5], 1.0 / 3)


def test_custom_vjp_matches_plain_autodiff_to_second_order(x64, g):
  """The `bcsr` kernel's hand-written backward pass against the `segment` kernel."""
  w = graph_lib.edge_weights(g, dtype=jnp.float64)
  rng = np.random.default_rng(1)
  e0, v = jnp.asarray(rng.normal(size=(11, 3))), jnp.asarray(rng.normal(size=(11, 3)))

  def loss(kernel):
    return lambda e: jnp.sum(jnp.tanh(graph_lib.propagate(g, w, e, 3, kernel=kernel)) ** 2)

  fast, ref = loss("bcsr"), loss("segment")
  np.testing.assert_allclose(jax.grad(fast)(e0), jax.grad(ref)(e0), rtol=1e-12)
  hvp = lambda f: jax.jvp(jax.grad(f), (e0,), (v,))[1]  # noqa: E731
  np.testing.assert_allclose(hvp(fast), hvp(ref), rtol=1e-10)
  vjp2 = lambda f: jax.vjp(jax.grad(f), e0)[1](v)[0]  # noqa: E731
  np.testing.assert_allclose(vjp2(fast), vjp2(ref), rtol=1e-10)


def test_degrees(g):
  deg = np.asarray(graph_lib.degrees(g))
  np.testing.assert_array_equal(deg[:5], [2, 2, 2, 2, 0])
  np.testing.assert_array_equal(deg[5:], [2, 1, 3, 1, 1, 0])
