"""The step loop: one step against a hand-made optax update, the one guard for every step
kind, segments that add up to the whole, and one compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxrec import data, sparse, steps
from maxrec import graph as graph_lib
from maxrec import objective as objective_lib
from maxrec.config import Config
from maxrec.models import make_model
from maxrec.sampling import Sampler

TINY = dict(synth_users=80, synth_items=100, synth_interactions=2000, synth_clusters=3)


def setup(kind: str, **overrides):
  """(state, step kind, graph, weights, batches [n, B]) for a tiny data set."""
  cfg = Config.from_flat(**{**TINY, "batch_size": 128, **overrides})
  ds = data.load_dataset(cfg.data, seed=0)
  g = graph_lib.build_graph(ds.train, ds.n_users, ds.n_items)
  w = graph_lib.edge_weights(g)
  model = make_model(cfg.model, ds.n_users, ds.n_items)
  tx = optax.adam(1e-2)
  phi = objective_lib.initial_aux_params(cfg)
  state = steps.init_state(model, tx, jax.random.key(0), phi)
  if kind == "dense":
    step_kind = steps.DenseStep(objective_lib.make_objective(model, cfg), tx)
  else:
    step_kind = sparse.SparseStep(ds.n_users, cfg.train.l2_reg, 1e-2, "adam", "xla")
    state = step_kind.with_opt_state(state)
  sampler = Sampler(ds.train, ds.observed, ds.n_users, ds.n_items)
  batches = jax.device_put(sampler.epoch(np.random.default_rng(0), 128))
  return cfg, model, tx, state, step_kind, g, w, batches


def test_a_dense_step_is_the_optax_update_of_the_inner_loss_gradient():
  cfg, model, tx, state, kind, g, w, batches = setup("dense", weighting="fixed", model="lightgcn")
  obj = objective_lib.make_objective(model, cfg)
  batch = jax.tree.map(lambda b: b[0], batches)
  key = jax.random.fold_in(state.key, 0)
  grads = jax.grad(lambda p: obj.inner_loss(p, state.aux_params, batch, key, g, w)[0])(state.params)
  updates, _ = tx.update(grads, state.opt_state, state.params)
  want = optax.apply_updates(state.params, updates)
  run = steps.run_steps_fn(kind)
  got, sums = jax.jit(run)(state, g, w, batches, jnp.int32(0), jnp.int32(1))
  for k in ("user", "item"):  # Adam's first step is about ±lr where rounding moves g/|g|
    np.testing.assert_allclose(got.params[k], want[k], rtol=1e-5, atol=1e-3 * 1e-2)
  assert int(got.step) == 1 and float(sums["good"]) == 1.0
  assert set(sums) >= {"loss", "bpr", "l2", "user_sgl", "weight_user_sgl", "good"}


@pytest.mark.parametrize("kind_name", ["dense", "sparse"])
def test_the_guard_skips_a_non_finite_step_for_every_step_kind(kind_name):
  """Step 2 of 4 made NaN: the state is the one of the three good steps, the skipped step
  is counted with its global index, and its loss parts count as zero."""
  _, _, _, state, kind, g, w, batches = setup(kind_name, weighting="none")
  clean = jax.jit(steps.run_steps_fn(kind))
  nan_at_2 = jax.jit(steps.run_steps_fn(kind, inject_nan_at=2))
  s_clean, sums_clean = clean(state, g, w, batches, jnp.int32(0), jnp.int32(2))
  s_nan, sums_nan = nan_at_2(state, g, w, batches, jnp.int32(0), jnp.int32(3))
  assert int(s_nan.step) == 3 and int(s_nan.bad_steps) == 1 and int(s_nan.first_bad_step) == 2
  assert float(sums_nan["good"]) == 2.0 and np.isfinite(float(sums_nan["loss"]))
  assert float(sums_nan["loss"]) == pytest.approx(float(sums_clean["loss"]), rel=1e-6)
  for k in ("user", "item"):  # the NaN step wrote nothing (other programs: rounding)
    np.testing.assert_allclose(s_nan.params[k], s_clean.params[k], rtol=1e-5, atol=1e-7)
  assert int(s_clean.bad_steps) == 0 and int(s_clean.first_bad_step) == -1


@pytest.mark.parametrize("kind_name", ["dense", "sparse"])
def test_segments_add_up_to_the_whole_epoch(kind_name):
  """Steps 0..n in one call equal steps 0..k then k..n (the cut at a meta step)."""
  _, _, _, state, kind, g, w, batches = setup(kind_name, weighting="none")
  run = jax.jit(steps.run_steps_fn(kind))
  n = batches["user"].shape[0]
  whole, sums = run(state, g, w, batches, jnp.int32(0), jnp.int32(n))
  first, s1 = run(state, g, w, batches, jnp.int32(0), jnp.int32(3))
  second, s2 = run(first, g, w, batches, jnp.int32(3), jnp.int32(n - 3))
  assert int(second.step) == int(whole.step) == n
  for k in ("user", "item"):
    np.testing.assert_allclose(second.params[k], whole.params[k], rtol=1e-6, atol=1e-7)
  assert float(s1["good"] + s2["good"]) == float(sums["good"]) == n


def test_make_run_steps_compiles_once_and_a_retrace_is_an_error():
  _, _, _, state, kind, g, w, batches = setup("dense", weighting="none")
  run = steps.make_run_steps(kind)
  state, _ = run(state, g, w, batches, jnp.int32(0), jnp.int32(2))
  state, _ = run(state, g, w, batches, jnp.int32(2), jnp.int32(1))  # another segment
  half = jax.tree.map(lambda b: b[:, :64], batches)  # another batch shape
  with pytest.raises(RuntimeError, match="traced a second time"):
    run(state, g, w, half, jnp.int32(0), jnp.int32(1))
