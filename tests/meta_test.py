"""Meta-learning oracles: T7 (closed loop), T8 (BPR through the production hypergradient),
the meta step's wiring against a dense solve, the schedule, and skipped updates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxrec import data, implicit, losses, steps, train
from maxrec import graph as graph_lib
from maxrec import meta as meta_lib
from maxrec import objective as objective_lib
from maxrec.config import Config
from maxrec.models import make_model
from maxrec.sampling import Sampler


# ---------------------------------------------------------------- T7: closed loop, ridge
def _ridge_problem(key, p=10, lam=1e-2):
  ks = jax.random.split(key, 8)
  theta_true = jax.random.normal(ks[0], (p,))

  def make(k, n, noise, informative=True):
    x = jax.random.normal(k, (n, p))
    if informative:
      y = x @ theta_true + noise * jax.random.normal(jax.random.fold_in(k, 1), (n,))
    else:
      y = noise * jax.random.normal(jax.random.fold_in(k, 1), (n,))
    return x, y

  prim, aux1, aux2, meta = (
    make(ks[1], 12, 1.0),
    make(ks[2], 200, 0.5),
    make(ks[3], 200, 2.0, False),
    make(ks[4], 100, 0.0),
  )
  mse = lambda th, xy: jnp.sum((xy[0] @ th - xy[1]) ** 2) / (2 * xy[0].shape[0])  # noqa: E731

  def inner(th, phi):
    w = jax.nn.softplus(phi)
    return mse(th, prim) + w[0] * mse(th, aux1) + w[1] * mse(th, aux2) + 0.5 * lam * th @ th

  return inner, (lambda th: mse(th, meta)), p


@functools.partial(jax.jit, static_argnames=("method",))
def _closed_loop(key, method="cg"):
  inner, meta_loss, p = _ridge_problem(key)
  phi0 = jnp.full((2,), float(np.log(np.expm1(0.5))))  # w = 0.5
  tx = optax.adam(0.05)

  def meta_step(carry, _):
    theta, phi, opt = carry
    lam_max = jnp.linalg.eigvalsh(jax.hessian(inner)(theta, phi))[-1]

    def gd(th, _):
      return th - jax.grad(inner)(th, phi) / lam_max, None

    theta, _ = jax.lax.scan(gd, theta, None, length=20)  # warm-started inner GD
    hg, _ = implicit.hypergradient(
      inner, meta_loss, theta, phi, method=method, maxiter=10, alpha=1 / lam_max
    )
    upd, opt = tx.update(hg, opt, phi)
    return (theta, optax.apply_updates(phi, upd), opt), None

  (theta, phi, _), _ = jax.lax.scan(
    meta_step, (jnp.zeros(p), phi0, tx.init(phi0)), None, length=300
  )
  return jax.nn.softplus(phi)


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_t7_noise_task_loses_weight_informative_gains(x64, method):
  weights = np.stack([np.asarray(_closed_loop(jax.random.key(s), method)) for s in range(20)])
  ok = (weights[:, 0] > 2 * 0.5) & (weights[:, 1] < 0.5 * 0.5)
  assert ok.sum() >= 18, weights


# ---------------------------------------------------------------- T8: convex BPR oracle
def _t8_problem():
  rng = np.random.default_rng(0)
  items = jnp.asarray(rng.normal(size=(7, 3)))
  trip = lambda n: tuple(jnp.asarray(rng.integers(0, k, n)) for k in (4, 7, 7))  # noqa: E731
  main, aux, meta = trip(20), trip(15), trip(25)

  def bpr(theta, t):
    u, i, j = t
    return losses.bpr_loss(jnp.sum(theta[u] * items[i], -1), jnp.sum(theta[u] * items[j], -1))

  def inner(theta, w):
    return bpr(theta, main) + w * bpr(theta, aux) + 0.5 * 0.05 * jnp.sum(theta**2)

  return inner, (lambda theta: bpr(theta, meta))


def _newton(inner, w, iters=50):
  def step(theta, _):
    g = jax.grad(inner)(theta, w).ravel()
    h = jax.hessian(inner)(theta, w).reshape(12, 12)
    return theta - jnp.linalg.solve(h, g).reshape(4, 3), None

  return jax.lax.scan(step, jnp.zeros((4, 3)), None, length=iters)[0]


def test_t8_bpr_oracle_through_the_production_hypergradient(x64):
  inner, meta_loss = _t8_problem()
  w = jnp.asarray(0.7)
  theta = _newton(inner, w)
  assert float(jnp.linalg.norm(jax.grad(inner)(theta, w))) < 1e-12
  # dense IFT with jax.hessian vs central finite differences on w
  h = jax.hessian(inner)(theta, w).reshape(12, 12)
  mixed = jax.jacobian(jax.grad(inner), 1)(theta, w).reshape(12)
  exact = -mixed @ jnp.linalg.solve(h, jax.grad(meta_loss)(theta).reshape(12))
  eps = 1e-5
  fd = (meta_loss(_newton(inner, w + eps)) - meta_loss(_newton(inner, w - eps))) / (2 * eps)
  assert float(exact) == pytest.approx(float(fd), rel=1e-7)
  # the production path: implicit.hypergradient with CG, J = p
  for mixed_mode in ("vjp", "jvp"):
    hg, info = jax.jit(
      lambda th, ww, m=mixed_mode: implicit.hypergradient(
        inner, meta_loss, th, ww, method="cg", maxiter=12, mixed=m
      )
    )(theta, w)
    assert float(hg) == pytest.approx(float(exact), abs=1e-6, rel=1e-6)
    assert bool(info.converged) and not bool(info.negative_curvature)


# ---------------------------------------------------------------- the meta step's wiring
TINY = dict(
  synth_users=60, synth_items=120, synth_interactions=1500, synth_clusters=3, batch_size=128
)


def _setup(**kw):
  kw = {"meta_data": "heldout", "meta_loss": "bpr", **kw}  # R_meta triples unless asked
  cfg = Config.from_flat(**TINY, weighting="meta", hyper_batch_size=64, meta_batch_size=64, **kw)
  ds = data.load_dataset(cfg.data, seed=0, meta_ratio=cfg.meta_ratio)
  g = graph_lib.build_graph(ds.train, ds.n_users, ds.n_items)
  w = graph_lib.edge_weights(g)
  model = make_model(cfg.model, ds.n_users, ds.n_items)
  obj = objective_lib.make_objective(model, cfg)
  phi = objective_lib.initial_aux_params(cfg)
  tx = optax.adam(1e-2)
  state = steps.init_state(model, tx, jax.random.key(0), phi)
  sampler = Sampler(ds.train, ds.observed, ds.n_users, ds.n_items)
  return cfg, ds, g, w, obj, phi, state, sampler


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_meta_step_equals_dense_ift_with_fixed_batch_and_key(model):
  """The jitted meta step's hypergradient equals a dense damped solve built independently
  from the same inner loss, batches and key (float32, small problem). The damping
  δ = 2 λ̂max makes H + δI positive definite, so CG solves the same system."""
  cfg, ds, g, w, obj, phi, state, sampler = _setup(
    model=model,
    cg_iters=200,
    num_layers=1,
    embedding_dim=2,
    damping_rel=2.0,
    init_std=0.5,
    power_iters=100,
  )
  learner = meta_lib.MetaLearner(obj, cfg.meta, 2)
  rng = np.random.default_rng(0)
  batches = jax.device_put(
    {
      "hyper": sampler.sample(rng, 64),
      "meta": Sampler(ds.meta, ds.observed, ds.n_users, ds.n_items).sample(rng, 64),
    }
  )
  key = jax.random.key(5)
  ms = learner.init(phi)
  new_phi, ms, info = learner.step(state.params, ms, phi, batches, key, jnp.asarray(True), g, w)
  lam, delta = float(info["lambda_max"]), float(info["damping"])
  assert delta == pytest.approx(cfg.meta.damping_rel * lam)
  inner = lambda p, h: obj.inner_loss(p, h, batches["hyper"], key, g, w)[0]  # noqa: E731
  meta_loss = lambda p: obj.meta_loss(p, batches["meta"], g, w)  # noqa: E731
  dense, _ = jax.jit(
    lambda p, h: implicit.hypergradient(inner, meta_loss, p, h, method="exact", damping=delta)
  )(state.params, phi)
  assert float(info["relative_residual"]) < 1e-4 and not bool(info["negative_curvature"])
  np.testing.assert_allclose(info["hypergrad"], dense, rtol=2e-3, atol=1e-9)
  assert not bool(info["skipped"]) and int(ms.num_updates) == 1
  # the Adam step moves each φ against its hypergradient's sign
  assert np.all(np.sign(np.asarray(new_phi - phi)) == -np.sign(np.asarray(dense)))


@pytest.mark.parametrize("meta_data", ["heldout", "valid"])
def test_softmax_meta_step_equals_dense_ift(meta_data):
  """The softmax meta loss through the MetaRunner's own batches (validation pairs, or
  R_meta, with each user's training items masked) gives the dense damped hypergradient."""
  cfg, ds, g, w, obj, phi, state, sampler = _setup(
    model="lightgcn",
    meta_loss="softmax",
    meta_data=meta_data,
    cg_iters=200,
    num_layers=1,
    embedding_dim=2,
    damping_rel=2.0,
    init_std=0.5,
    power_iters=100,
  )
  assert (len(ds.meta) == 0) == (meta_data == "valid")
  runner = meta_lib.MetaRunner(obj, cfg, sampler, ds, phi, 0, steps_per_epoch=10)
  batches = runner._batches()
  pairs = ds.valid if meta_data == "valid" else ds.meta
  meta = jax.device_get(batches["meta"])
  assert set(meta) == {"user", "pos", "seen"}
  held = set(map(tuple, pairs.tolist()))
  assert all((u, i) in held for u, i in zip(meta["user"], meta["pos"]))
  train_items = {u: set(ds.train[ds.train[:, 0] == u, 1]) for u in np.unique(meta["user"])}
  for u, row in zip(meta["user"], meta["seen"]):
    assert set(row[row < ds.n_items].tolist()) == train_items[u]
  key = jax.random.key(5)
  learner = runner.learner
  new_phi, ms, info = learner.step(
    state.params, learner.init(phi), phi, batches, key, jnp.asarray(True), g, w
  )
  inner = lambda p, h: obj.inner_loss(p, h, batches["hyper"], key, g, w)[0]  # noqa: E731
  meta_loss = lambda p: obj.meta_loss(p, batches["meta"], g, w)  # noqa: E731
  delta = float(info["damping"])
  dense, _ = jax.jit(
    lambda p, h: implicit.hypergradient(inner, meta_loss, p, h, method="exact", damping=delta)
  )(state.params, phi)
  np.testing.assert_allclose(info["hypergrad"], dense, rtol=2e-3, atol=1e-9)
  # the softmax meta loss is the masked cross-entropy, computed here from its definition
  fu, fi = (np.asarray(x, np.float64) for x in obj.model.apply({"params": state.params}, g, w))
  expect = []
  for u, i in zip(meta["user"], meta["pos"]):
    s = fu[u] @ fi.T
    keep = np.ones(ds.n_items, bool)
    keep[list(train_items[u])] = False
    expect.append(np.log(np.sum(np.exp(s[keep]))) - s[i])
  assert float(meta_loss(state.params)) == pytest.approx(np.mean(expect), rel=1e-4)


def test_meta_data_valid_needs_no_carved_split_and_rejects_meta_ratio():
  cfg = Config.from_flat(**TINY, weighting="meta", meta_data="valid")
  assert cfg.meta_ratio == 0.0
  with pytest.raises(ValueError, match="--meta_data=valid"):
    Config.from_flat(**TINY, weighting="meta", meta_data="valid", meta_ratio=0.1)
  with pytest.raises(ValueError, match="--meta_loss='ce' is not one of bpr, softmax"):
    Config.from_flat(**TINY, weighting="meta", meta_loss="ce")


def test_non_finite_hypergradient_skips_the_update():
  cfg, ds, g, w, obj, phi, state, sampler = _setup()
  learner = meta_lib.MetaLearner(obj, cfg.meta, 2)
  rng = np.random.default_rng(0)
  batches = jax.device_put(
    {
      "hyper": sampler.sample(rng, 64),
      "meta": Sampler(ds.meta, ds.observed, ds.n_users, ds.n_items).sample(rng, 64),
    }
  )
  bad = jax.tree.map(lambda x: x.at[0, 0].set(jnp.nan), state.params)
  ms = learner.init(phi)
  new_phi, ms, info = learner.step(
    bad, ms, phi, batches, jax.random.key(0), jnp.asarray(True), g, w
  )
  assert bool(info["skipped"]) and int(ms.num_skipped) == 1 and int(ms.num_updates) == 0
  np.testing.assert_array_equal(new_phi, phi)


def test_cut_points_follow_warmup_and_interval():
  cfg, ds, g, w, obj, phi, state, sampler = _setup(meta_every=4, warmup_epochs=1)
  runner = meta_lib.MetaRunner(
    obj, cfg, sampler, ds, phi, np.random.default_rng(0), steps_per_epoch=10
  )
  assert runner.cut_points(0, 10) == []  # warm-up: the first 10 steps
  assert runner.cut_points(10, 10) == [2, 6, 10]  # global steps 12, 16, 20
  assert runner.cut_points(20, 10) == [4, 8]


def test_meta_run_end_to_end_logs_weights(tmp_path):
  import json

  cfg = Config.from_flat(
    **TINY,
    weighting="meta",
    epochs=3,
    learning_rate=0.05,  # beats popularity after one epoch: meta steps start
    meta_every=5,
    warmup_epochs=1,
    hyper_batch_size=64,
    meta_batch_size=64,
  )
  final = train.train_and_evaluate(cfg, str(tmp_path))
  assert set(final["aux_weights"]) == {"user_sgl", "item_sgl"}
  assert final["meta"]["meta_steps"] >= 2
  records = [json.loads(x) for x in (tmp_path / "meta.jsonl").read_text().splitlines()]
  assert len(records) == final["meta"]["meta_steps"]
  for key in (
    "weights",
    "hypergrad",
    "alignment",
    "cosine",
    "lambda_max",
    "damping",
    "num_steps",
    "relative_residual",
    "negative_curvature",
    "inner_grad_norm",
    "meta_loss",
    "meta_step_s",
    "inner_step_s",
    "skipped",
  ):
    assert key in records[-1], key


def test_a_meta_point_on_an_epochs_last_step_runs_once():
  """Regression: with the meta point at the end of an epoch, the meta step ran twice."""
  cfg = Config.from_flat(**TINY, weighting="meta", hyper_batch_size=64, meta_batch_size=64)
  ds = data.load_dataset(cfg.data, seed=0, meta_ratio=cfg.meta_ratio)
  from maxrec.trainer import Trainer

  n = Trainer(cfg, ds).n_batches
  cfg = cfg.replace(meta_every=n, warmup_epochs=1)  # meta points exactly at epoch ends
  tr = Trainer(cfg, ds)
  records = []
  for _ in range(4):
    tr.epoch(records.append)
  assert [r["step"] for r in records] == [n, 2 * n, 3 * n, 4 * n][: len(records)]
  assert len(records) == 4 and tr.meta.count == 4


def test_meta_steps_wait_until_validation_beats_popularity(tmp_path):
  """The hypergradient of a model that ranks worse than popularity means nothing: no meta
  step runs before validation beats popularity, and none at all for a model that never
  learns (a learning rate too small to move it)."""
  import json

  kw = dict(**TINY, weighting="meta", meta_every=2, warmup_epochs=1, hyper_batch_size=64,
            meta_batch_size=64, learning_rate=0.02)  # fmt: skip
  final = train.train_and_evaluate(Config.from_flat(**kw, epochs=8), str(tmp_path / "a"))
  start = final["meta"]["active_at"]
  assert start is not None and start > 0
  records = [json.loads(x) for x in (tmp_path / "a" / "meta.jsonl").read_text().splitlines()]
  assert records and all(r["step"] >= start for r in records)
  stuck = Config.from_flat(**{**kw, "learning_rate": 1e-12}, epochs=3)
  final = train.train_and_evaluate(stuck, str(tmp_path / "b"))
  assert final["meta"]["active_at"] is None and final["meta"]["meta_steps"] == 0
