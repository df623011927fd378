"""Auxiliary tasks: closed forms, duplicate masking, second-order gradients, fixed views."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

from maxrec import auxiliary, losses
from maxrec import graph as graph_lib
from maxrec.models import MF, LightGCN
from maxrec.objective import Objective

PAIRS = np.array([(0, 0), (0, 2), (1, 1), (1, 2), (2, 3), (3, 0), (3, 4), (2, 2), (0, 4)])
N_USERS, N_ITEMS = 4, 5


def toy(kernel="bcsr", layers=1, seed=0):
  g = graph_lib.build_graph(PAIRS, N_USERS, N_ITEMS)
  rng = np.random.default_rng(seed)
  params = {
    "user": jnp.asarray(rng.normal(size=(N_USERS, 3))),
    "item": jnp.asarray(rng.normal(size=(N_ITEMS, 3))),
  }
  batch = {
    "user": jnp.array([0, 1, 0, 3, 2, 1]),
    "pos": jnp.array([0, 1, 2, 4, 3, 2]),
    "neg": jnp.array([1, 0, 3, 1, 0, 4]),
    "pos2": jnp.array([2, 2, 4, 0, 2, 1]),
  }
  settings = auxiliary.AuxSettings(
    temperature=0.2, edge_drop=0.3, view_layers=layers, kernel=kernel
  )
  return g, params, batch, settings


def ctx_for(params, batch, g, key, settings):
  w = graph_lib.edge_weights(g, dtype=params["user"].dtype)
  final = MF(N_USERS, N_ITEMS, 3).apply({"params": params}, g, w)
  return auxiliary.AuxContext(params, final, batch, g, key, settings)


def task_loss(name, g, batch, key, settings):
  def f(params):
    out = auxiliary.get(name).loss_fn(ctx_for(params, batch, g, key, settings))
    return losses.masked_mean(out.losses, out.valid)

  return f


def test_registry_and_sides():
  assert set(auxiliary.names()) >= {"user_sgl", "item_sgl", "user_simgcl", "item_cooc"}
  assert auxiliary.get("user_sgl").side == "user" and auxiliary.get("item_cooc").side == "item"
  with pytest.raises(ValueError, match="unknown auxiliary task 'nope'"):
    auxiliary.get("nope")


def test_adding_a_task_is_one_function():
  @auxiliary.register("test_user_identity", "user")
  def _(ctx):
    ids, valid = losses.unique_ids(ctx.batch["user"])
    e = ctx.params["user"][ids]
    return auxiliary.AuxOutput(losses.info_nce(e, e, 0.5, valid), ids, valid)

  assert "test_user_identity" in auxiliary.names()
  with pytest.raises(ValueError, match="already registered"):
    auxiliary.register("test_user_identity", "user")(lambda ctx: None)


def test_duplicate_ids_are_masked(x64):
  """user_sgl over a batch with repeated users equals InfoNCE over the distinct users."""
  g, params, batch, settings = toy()
  key = jax.random.key(3)
  ctx = ctx_for(params, batch, g, key, settings)
  out = auxiliary.get("user_sgl").loss_fn(ctx)
  v1, v2 = ctx.edge_dropout_views
  users = np.unique(np.asarray(batch["user"]))
  direct = losses.info_nce(v1[users], v2[users], 0.2)
  assert int(out.valid.sum()) == len(users)
  np.testing.assert_allclose(losses.masked_mean(out.losses, out.valid), direct.mean(), rtol=1e-12)


def test_views_come_from_the_key_only(x64):
  g, params, batch, settings = toy()
  a = ctx_for(params, batch, g, jax.random.key(1), settings).edge_dropout_views
  b = ctx_for(params, batch, g, jax.random.key(1), settings).edge_dropout_views
  c = ctx_for(params, batch, g, jax.random.key(2), settings).edge_dropout_views
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.allclose(a[0], c[0])
  assert not np.allclose(a[0], a[1])  # the two views differ


@pytest.mark.parametrize("name", ["user_sgl", "item_sgl", "user_simgcl", "item_cooc"])
@pytest.mark.parametrize("kernel", ["bcsr", "segment"])
def test_second_order_gradients(x64, name, kernel):
  g, params, batch, settings = toy(kernel=kernel)
  f = jax.jit(task_loss(name, g, batch, jax.random.key(0), settings))
  assert np.isfinite(float(f(params)))
  # The bcsr kernel and InfoNCE have hand-written VJPs: reverse mode (to 2nd order).
  check_grads(f, (params,), order=2, modes=("rev",), atol=1e-5, rtol=1e-5)


def full_inner_loss(model, tasks=("user_sgl", "item_sgl"), weighting="fixed"):
  g, params, batch, settings = toy(layers=2)
  obj = Objective(model, 1e-2, tasks, weighting, settings)
  w = graph_lib.edge_weights(g, dtype=jnp.float64)
  key = jax.random.key(7)
  phi = jnp.array([0.3, -0.5])
  return (lambda p: obj.inner_loss(p, phi, batch, key, g, w)[0]), params


@pytest.mark.parametrize(
  "model", [MF(N_USERS, N_ITEMS, 3), LightGCN(N_USERS, N_ITEMS, 3, num_layers=2)]
)
def test_inner_loss_hvp_symmetric_linear_and_equal_to_hessian(x64, model):
  """T9 on the production inner loss: the HVP uses the fixed key, so it is a symmetric
  linear map, and it equals the dense Hessian."""
  f, params = full_inner_loss(model)
  flat, unravel = ravel_pytree(params)
  hvp = jax.jit(lambda v: ravel_pytree(jax.jvp(jax.grad(f), (params,), (unravel(v),))[1])[0])
  rng = np.random.default_rng(0)
  u, v = jnp.asarray(rng.normal(size=flat.shape)), jnp.asarray(rng.normal(size=flat.shape))
  np.testing.assert_allclose(
    hvp(2.0 * u - 3.0 * v), 2.0 * hvp(u) - 3.0 * hvp(v), rtol=1e-9, atol=1e-12
  )
  np.testing.assert_allclose(jnp.dot(u, hvp(v)), jnp.dot(v, hvp(u)), rtol=1e-9)
  hess = jax.jit(jax.hessian(lambda x: f(unravel(x))))(flat)
  np.testing.assert_allclose(hvp(v), hess @ v, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["user_sgl", "item_sgl", "user_simgcl", "item_simgcl"])
def test_anchors_come_from_the_first_triples_only(name):
  g, params, batch, settings = toy()
  side = "user" if name.startswith("user") else "pos"
  capped = auxiliary.AuxSettings(**{**settings.__dict__, "anchors": 3})
  key = jax.random.key(0)
  out = auxiliary.get(name).loss_fn(ctx_for(params, batch, g, key, capped))
  expected = np.unique(np.asarray(batch[side][:3]))
  assert sorted(np.asarray(out.ids)[np.asarray(out.valid)].tolist()) == expected.tolist()
  full = auxiliary.get(name).loss_fn(ctx_for(params, batch, g, key, settings))
  assert int(full.valid.sum()) == len(np.unique(np.asarray(batch[side])))
  # The loss is the InfoNCE of those anchors alone: recomputed from the same views.
  ctx = ctx_for(params, batch, g, key, capped)
  v1, v2 = ctx.noise_views if "simgcl" in name else ctx.edge_dropout_views
  off = 0 if side == "user" else N_USERS
  ref = losses.info_nce(v1[off + expected], v2[off + expected], 0.2)
  np.testing.assert_allclose(
    np.sort(np.asarray(out.losses)[np.asarray(out.valid)]), np.sort(np.asarray(ref)), rtol=1e-5
  )


def test_item_simgcl_is_registered_on_the_item_side():
  assert auxiliary.get("item_simgcl").side == "item"
  assert "item_simgcl" in auxiliary.names()
