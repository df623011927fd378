"""Training: finite steps, decreasing loss, end-to-end runs on tiny and real data."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxrec import data, steps, train
from maxrec import graph as graph_lib
from maxrec import objective as objective_lib
from maxrec.config import Config
from maxrec.models import make_model
from maxrec.sampling import Sampler

TINY = dict(
  weighting="none",
  synth_users=120,
  synth_items=150,
  synth_interactions=3000,
  synth_clusters=3,
  batch_size=256,
)


def setup_run(**overrides):
  cfg = Config.from_flat(**{**TINY, **overrides})
  ds = data.load_dataset(cfg.data, seed=0)
  g = graph_lib.build_graph(ds.train, ds.n_users, ds.n_items)
  w = graph_lib.edge_weights(g)
  model = make_model(cfg.model, ds.n_users, ds.n_items)
  tx = optax.adam(cfg.learning_rate)
  state = steps.init_state(model, tx, jax.random.key(0))
  run_steps = steps.make_run_steps(steps.DenseStep(objective_lib.make_objective(model, cfg), tx))
  sampler = Sampler(ds.train, ds.observed, ds.n_users, ds.n_items)
  return cfg, ds, g, w, state, run_steps, sampler


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_one_step_is_finite_and_moves_params(model):
  cfg, ds, g, w, state, run_steps, sampler = setup_run(model=model)
  batches = jax.device_put(
    sampler.epoch(np.random.default_rng(0), cfg.batch_size_for(len(ds.train)))
  )
  before = jax.tree.map(np.array, state.params)
  state, sums = run_steps(state, g, w, batches, jnp.int32(0), jnp.int32(1))
  assert int(state.step) == 1
  for k in ("user", "item"):
    p = np.asarray(state.params[k])
    assert np.isfinite(p).all() and not np.allclose(p, before[k])
  assert np.isfinite(float(sums["loss"]))


def test_a_few_dozen_steps_lower_the_loss():
  cfg, ds, g, w, state, run_steps, sampler = setup_run(learning_rate=1e-2)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(4):
    batches = jax.device_put(sampler.epoch(rng, cfg.batch_size_for(len(ds.train))))
    n = batches["user"].shape[0]
    state, sums = run_steps(state, g, w, batches, jnp.int32(0), jnp.int32(n))
    losses.append(float(sums["loss"]) / n)
  assert int(state.step) == 4 * n >= 36
  assert losses[-1] < losses[0] - 0.05


def test_segments_equal_one_call():
  """Running an epoch in two segments gives the same parameters as one call."""
  cfg, ds, g, w, state, run_steps, sampler = setup_run()
  batches = jax.device_put(
    sampler.epoch(np.random.default_rng(0), cfg.batch_size_for(len(ds.train)))
  )
  n = batches["user"].shape[0]
  copy = jax.tree.map(jnp.copy, state)
  a, _ = run_steps(state, g, w, batches, jnp.int32(0), jnp.int32(n))
  b, _ = run_steps(copy, g, w, batches, jnp.int32(0), jnp.int32(3))
  b, _ = run_steps(b, g, w, batches, jnp.int32(3), jnp.int32(n - 3))
  np.testing.assert_allclose(a.params["user"], b.params["user"], rtol=1e-6)


def test_end_to_end_tiny(tmp_path):
  cfg = Config.from_flat(**TINY, epochs=4, learning_rate=1e-2, topk=(5, 20))
  final = train.train_and_evaluate(cfg, str(tmp_path))
  for name in ("config.json", "data_summary.json", "metrics.jsonl", "final_metrics.json"):
    assert os.path.exists(tmp_path / name)
  on_disk = json.loads((tmp_path / "final_metrics.json").read_text())
  assert on_disk["best_epoch"] == final["best_epoch"] >= 1
  for part in ("test", "popularity"):
    assert set(on_disk[part]) == {
      f"{m}@{k}" for m in ("recall", "ndcg", "precision", "hit", "mrr") for k in (5, 20)
    }
  records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [1, 2, 3, 4]
  assert all("interactions_per_s" in r and "valid" in r for r in records)
  assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 4


def test_ml100k_end_to_end(ml100k_path, tmp_path):
  cfg = Config.from_flat(
    data_path=ml100k_path, weighting="none", epochs=15, learning_rate=5e-3, patience=3
  )
  final = train.train_and_evaluate(cfg, str(tmp_path))
  assert final["test"]["recall@20"] > final["popularity"]["recall@20"] + 0.05


def test_unwritable_workdir_is_reported_first(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises((ValueError, OSError)):
    train.train_and_evaluate(Config.from_flat(**TINY), str(blocker / "sub"))


def test_meta_split_is_never_trained_on_and_masked(tmp_path):
  """R_meta pairs are not positives, not graph edges, not negatives, and masked in ranking."""
  cfg = Config.from_flat(**TINY, epochs=1, meta_ratio=0.2, model="lightgcn")
  ds = data.load_dataset(cfg.data, seed=0, meta_ratio=0.2)
  assert len(ds.meta) > 0
  meta = {tuple(p) for p in ds.meta.tolist()}
  g = graph_lib.build_graph(ds.train, ds.n_users, ds.n_items)
  edges = set(zip(np.asarray(g.row).tolist(), (np.asarray(g.col) - ds.n_users).tolist()))
  assert not meta & edges
  sampler = Sampler(ds.train, ds.observed, ds.n_users, ds.n_items)
  b = sampler.epoch(np.random.default_rng(0), 256)
  pos = set(zip(b["user"].ravel().tolist(), b["pos"].ravel().tolist()))
  neg = set(zip(b["user"].ravel().tolist(), b["neg"].ravel().tolist()))
  assert not meta & pos and not meta & neg
  final = train.train_and_evaluate(cfg, str(tmp_path))
  summary = json.loads((tmp_path / "data_summary.json").read_text())
  assert summary["n_meta"] == len(ds.meta) and final["best_epoch"] == 1


@pytest.mark.parametrize(  # the sparse Adam, sparse SGD and dense steps
  "weighting,optimizer", [("none", "adam"), ("none", "sgd"), ("fixed", "adam")]
)
def test_injected_nan_is_skipped_and_reported(tmp_path, weighting, optimizer):
  n_steps = 10  # steps in a TINY epoch: the NaN lands in the second epoch
  cfg = Config.from_flat(
    **{**TINY, "weighting": weighting, "optimizer": optimizer},
    epochs=3,
    inject_nan_at_step=n_steps + 2,
  )
  final = train.train_and_evaluate(cfg, str(tmp_path))
  assert final["skipped_steps"] == 1
  records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["skipped_steps"] for r in records] == [0, 1, 0]
  assert all(np.isfinite(r["loss"]) for r in records)
  params = np.load(tmp_path / "model.npz")
  assert np.isfinite(params["user_emb"]).all() and np.isfinite(params["item_emb"]).all()


def test_injected_nan_with_stop_keeps_the_last_good_checkpoint(tmp_path):
  from maxrec import checkpoint

  cfg = Config.from_flat(**TINY, epochs=4, inject_nan_at_step=12, on_nonfinite="stop")
  with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 12"):
    train.train_and_evaluate(cfg, str(tmp_path))
  saved = checkpoint.list_checkpoints(str(tmp_path))
  assert [e for e, _ in saved] == [1]  # epoch 2 held the NaN: no checkpoint after it
  assert not (tmp_path / "final_metrics.json").exists()


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_eval_every_with_checkpoints_before_the_first_validation(tmp_path, model):
  """The first checkpoint comes before any validation: the model it keeps as the best so
  far (the initial one) must not be a buffer the first step consumed."""
  cfg = Config.from_flat(**TINY, model=model, epochs=5, eval_every=2, checkpoint_every=1)
  final = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  assert ["valid" in x for x in lines] == [False, True, False, True, True]
  assert final["best_epoch"] in (2, 4, 5) and final["test"]["recall@20"] > 0


def test_spectral_init_starts_from_the_singular_vectors():
  from maxrec.trainer import Trainer

  cfg = Config.from_flat(**TINY, model="lightgcn", init="spectral", embedding_dim=8)
  ds = data.load_dataset(cfg.data, seed=0)
  p = jax.device_get(Trainer(cfg, ds).state.params)
  u, i = p["user"], p["item"]
  rms = np.sqrt((np.sum(u**2) + np.sum(i**2)) / (u.size + i.size))
  np.testing.assert_allclose(rms, cfg.model.resolved_init_std, rtol=1e-4)
  # Scores of the warm start are the rank-8 reconstruction of the normalised matrix: the
  # user-item pairs of training score higher on average than the others.
  scores = u @ i.T
  seen = np.zeros_like(scores, bool)
  seen[ds.train[:, 0], ds.train[:, 1]] = True
  assert scores[seen].mean() > 3 * abs(scores[~seen].mean())


def test_cosine_schedule_decays_to_one_percent_over_the_epochs():
  from maxrec.trainer import make_optimizer

  cfg = Config.from_flat(
    **TINY, model="lightgcn", lr_schedule="cosine", epochs=4, learning_rate=0.1
  )
  tx = make_optimizer(cfg, steps_per_epoch=5)
  params = {"x": jnp.zeros(())}
  state = tx.init(params)
  lrs = []
  for _ in range(21):  # Adam's first step moves by lr exactly (m/sqrt(v) = sign of g)
    upd, _ = tx.update({"x": jnp.ones(())}, state, params)
    lrs.append(-float(upd["x"]))
    _, state = tx.update({"x": jnp.ones(())}, state, params)
  np.testing.assert_allclose(lrs[0], 0.1, rtol=1e-5)
  np.testing.assert_allclose(lrs[10], 0.1 * (0.01 + 0.99 * 0.5), rtol=1e-3)  # half way
  np.testing.assert_allclose(lrs[20], 0.001, rtol=1e-3)  # the end of --epochs
  with pytest.raises(ValueError, match="row-sparse MF step has a constant"):
    Config.from_flat(model="mf", weighting="none", lr_schedule="cosine")


def test_resume_refuses_new_epochs_under_a_cosine_schedule(tmp_path):
  cfg = Config.from_flat(**TINY, model="mf", sparse_updates=False, lr_schedule="cosine", epochs=2)
  train.train_and_evaluate(cfg.replace(epochs=2, patience=1, time_budget_s=1e-9), str(tmp_path))
  with pytest.raises(ValueError, match=r"--epochs=2 -> 3"):
    train.train_and_evaluate(cfg.replace(epochs=3, time_budget_s=1e-9), str(tmp_path), resume=True)


def test_time_budget_stops_after_the_first_epoch_past_it(tmp_path):
  cfg = Config.from_flat(**TINY, epochs=50, time_budget_s=1e-9)
  final = train.train_and_evaluate(cfg, str(tmp_path))
  assert final["epochs_run"] == 1 and final["best_epoch"] == 1


def test_patience_waits_until_the_model_has_started_to_learn(tmp_path):
  """Patience counts only once the model beats popularity on validation: with a learning
  rate too small to change anything the random model never does, and patience 1 still
  runs every epoch; a model that learns is stopped by the same patience."""
  cfg = Config.from_flat(**TINY, epochs=4, patience=1, learning_rate=1e-12)
  final = train.train_and_evaluate(cfg, str(tmp_path / "stuck"))
  assert final["epochs_run"] == 4
  assert final["valid"]["recall@20"] < final["popularity"]["recall@20"] + 0.05
  cfg = Config.from_flat(**TINY, epochs=60, patience=1, learning_rate=0.05)
  final = train.train_and_evaluate(cfg, str(tmp_path / "learns"))
  assert final["epochs_run"] < 60 and final["valid"]["recall@20"] > 0.1


# The built-in data set at the defaults but for a few epochs: what each step kind (native and
# XLA row-sparse MF, the dense step with uncertainty weighting, LightGCN with meta steps) gave
# when these values were recorded. A change that moves one of them changes results.
RECORDED = {
  "mf": (
    dict(model="mf", weighting="none", epochs=2),
    {
      "test": 0.032243844121694565,
      "valid": 0.029011670500040054,
      "best_epoch": 2,
      "losses": [0.6931351661682129, 0.6917998790740967],
      "w": None,
      "meta_steps": None,
    },
  ),
  "mf_sgd_xla": (
    dict(
      model="mf",
      weighting="none",
      epochs=2,
      optimizer="sgd",
      learning_rate=0.05,
      sparse_kernel="xla",
    ),
    {
      "test": 0.006315994542092085,
      "valid": 0.008034219965338707,
      "best_epoch": 1,
      "losses": [0.6931562900543213, 0.693147611618042],
      "w": None,
      "meta_steps": None,
    },
  ),
  "mf_uncertainty": (
    dict(model="mf", weighting="uncertainty", epochs=2),
    {
      "test": 0.011922677047550678,
      "valid": 0.01288142055273056,
      "best_epoch": 2,
      "losses": [9.911990356445312, 9.832630920410157],
      "w": {"user_sgl": 0.01083266269415617, "item_sgl": 0.01083260029554367},
      "meta_steps": None,
    },
  ),
  "lightgcn_meta": (
    dict(model="lightgcn", weighting="meta", epochs=3, meta_every=10),
    {
      "test": 0.3110557496547699,
      "valid": 0.3017077147960663,
      "best_epoch": 3,
      "losses": [0.5237216949462891, 0.28076236248016356, 0.252819299697876],
      "w": {"user_sgl": 0.010000001639127731, "item_sgl": 0.010000001639127731},
      "meta_steps": 2,
    },
  ),
}


@pytest.mark.parametrize("name", list(RECORDED))
def test_same_seed_gives_the_recorded_metrics(tmp_path, name):
  overrides, want = RECORDED[name]
  final = train.train_and_evaluate(Config.from_flat(**overrides), str(tmp_path))
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
  got = {
    "test": final["test"]["recall@20"],
    "valid": final["valid"]["recall@20"],
    "best_epoch": final["best_epoch"],
    "losses": losses,
    "w": final.get("aux_weights_final"),
    "meta_steps": final.get("meta", {}).get("meta_steps"),
  }
  for key in ("best_epoch", "meta_steps"):
    assert got[key] == want[key], key
  for key in ("test", "valid"):
    assert got[key] == pytest.approx(want[key], rel=1e-5), key
  assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
  assert (got["w"] is None) == (want["w"] is None)
  if want["w"] is not None:
    assert got["w"] == pytest.approx(want["w"], rel=1e-5)
