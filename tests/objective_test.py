"""The inner objective's weighting schemes, and that new weights never retrace the step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxrec import data, steps
from maxrec import graph as graph_lib
from maxrec import objective as objective_lib
from maxrec.config import Config
from maxrec.models import make_model
from maxrec.objective import aux_weights, init_aux_params, softplus_inverse
from maxrec.sampling import Sampler

TINY = dict(
  synth_users=80, synth_items=100, synth_interactions=1500, synth_clusters=3, batch_size=128
)


def test_softplus_parametrisation():
  assert float(softplus_inverse(0.1)) == pytest.approx(-2.25217, abs=1e-5)
  phi = init_aux_params("fixed", (0.1, 2.0, 50.0))
  w, penalty = aux_weights("fixed", phi)
  np.testing.assert_allclose(w, [0.1, 2.0, 50.0], rtol=1e-5)
  assert float(penalty) == 0.0


def test_uncertainty_weights_and_penalty():
  s = init_aux_params("uncertainty", (0.1, 0.5))
  w, penalty = aux_weights("uncertainty", s)
  np.testing.assert_allclose(w, [0.1, 0.5], rtol=1e-6)
  assert float(penalty) == pytest.approx(float(-np.log(0.1) - np.log(0.5)), rel=1e-6)
  # d/ds (exp(-s) L + s) = 0 at exp(-s) = 1/L: the learned weight tracks 1 / loss.
  grad = jax.grad(lambda s: jnp.exp(-s) * 4.0 + s)(jnp.log(4.0))
  assert abs(float(grad)) < 1e-6


def make(weighting, **kw):
  cfg = Config.from_flat(**TINY, weighting=weighting, aux_weights=(0.1,), **kw)
  ds = data.load_dataset(cfg.data, seed=0)
  g = graph_lib.build_graph(ds.train, ds.n_users, ds.n_items)
  w = graph_lib.edge_weights(g)
  model = make_model(cfg.model, ds.n_users, ds.n_items)
  obj = objective_lib.make_objective(model, cfg)
  batches = jax.device_put(
    Sampler(ds.train, ds.observed, ds.n_users, ds.n_items).epoch(np.random.default_rng(0), 128)
  )
  return cfg, obj, model, g, w, batches


def test_changing_aux_weights_never_retraces():
  cfg, obj, model, g, w, batches = make("fixed")
  tx = optax.adam(1e-3)
  chex.clear_trace_counter()
  run = jax.jit(
    chex.assert_max_traces(steps.run_steps_fn(steps.DenseStep(obj, tx)), n=1), donate_argnums=(0,)
  )
  state = steps.init_state(model, tx, jax.random.key(0), init_aux_params("fixed", (0.1, 0.1)))
  state, sums = run(state, g, w, batches, jnp.int32(0), jnp.int32(2))
  np.testing.assert_allclose(sums["weight_user_sgl"] / 2, 0.1, rtol=1e-5)
  state = state.replace(aux_params=init_aux_params("fixed", (3.0, 0.02)))
  state, sums = run(state, g, w, batches, jnp.int32(2), jnp.int32(3))  # a retrace would raise
  np.testing.assert_allclose(sums["weight_user_sgl"] / 3, 3.0, rtol=1e-5)
  np.testing.assert_allclose(sums["weight_item_sgl"] / 3, 0.02, rtol=1e-5)


def test_uncertainty_learns_its_log_variances():
  cfg, obj, model, g, w, batches = make("uncertainty")
  tx, aux_tx = optax.adam(1e-2), optax.adam(1e-2)
  s0 = init_aux_params("uncertainty", cfg.aux.initial_weights)
  s0_host = np.asarray(s0)  # the state's buffers are donated to the step
  state = steps.init_state(model, tx, jax.random.key(0), s0, aux_tx)
  run = steps.make_run_steps(steps.DenseStep(obj, tx, aux_tx))
  n = batches["user"].shape[0]
  state, _ = run(state, g, w, batches, jnp.int32(0), jnp.int32(n))
  assert not np.allclose(state.aux_params, s0_host)
  assert np.isfinite(np.asarray(state.aux_params)).all()


def test_weighting_none_ignores_tasks():
  cfg, obj, *_ = make("none")
  assert obj.task_names == () and cfg.aux.initial_weights == ()


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(weighting="fixed", aux_tasks=()), "needs at least one task"),
    (dict(weighting="fixed", aux_weights=(0.1, 0.2, 0.3)), "give 1 or one per task"),
    (dict(weighting="fixed", aux_weights=(0.0,)), "must be positive"),
  ],
)
def test_aux_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    Config.from_flat(**kw)


def test_unknown_task_is_an_error_naming_it_and_the_registered_ones():
  cfg = Config.from_flat(weighting="fixed", aux_tasks=("user_sgl", "bogus"))
  with pytest.raises(ValueError, match="unknown task 'bogus'; registered: item_cooc, item_sgl"):
    objective_lib.check_tasks(cfg.aux.aux_tasks)
  model = make_model(cfg.model, 10, 10)
  with pytest.raises(ValueError, match="unknown task 'bogus'"):
    objective_lib.make_objective(model, cfg)
