"""The Trainer, built once: the recipe it resolves, epochs that depend on (seed, epoch)
only, and a state that saves and loads into a fresh Trainer to continue identically."""

import jax
import numpy as np
import pytest

from maxrec import data, sharding
from maxrec.config import Config
from maxrec.trainer import Trainer

TINY = dict(synth_users=100, synth_items=140, synth_interactions=2500, synth_clusters=3)


def build(**overrides) -> Trainer:
  cfg = Config.from_flat(**{**TINY, **overrides})
  ds = data.load_dataset(cfg.data, seed=cfg.train.seed, meta_ratio=cfg.meta_ratio)
  return Trainer(cfg, ds)


def params(trainer):
  return {k: np.asarray(v) for k, v in trainer.state.params.items()}


def test_the_resolved_recipe_and_one_epoch():
  t = build(model="lightgcn", weighting="fixed")
  n_train = len(t.ds.train)
  assert t.batch_size == t.cfg.batch_size_for(n_train) == 2048
  assert t.n_batches == -(-n_train // 2048) and t.mesh is None and t.sparse_kernel is None
  assert t.objective.task_names == ("user_sgl", "item_sgl") and t.meta is None
  sums, times = t.epoch()
  assert t.epochs_done == 1 and int(t.state.step) == t.n_batches
  assert float(sums["good"]) == t.n_batches and set(times) == {"epoch_s", "sample_s", "meta_s"}
  users, items = t.embeddings()
  assert users.shape == (t.ds.n_users, 64) and items.shape == (t.ds.n_items, 64)


def test_mf_alone_takes_the_row_sparse_step():
  t = build(model="mf", weighting="none", sparse_kernel="xla")
  assert t.sparse_kernel == "xla" and t.objective.task_names == ()
  t.epoch()
  assert int(t.state.bad_steps) == 0 and int(t.state.step) == t.n_batches


def test_same_seed_same_epochs_and_a_loaded_state_continues_identically():
  meta = dict(weighting="meta", meta_every=5, warmup_epochs=0, batch_size=128)
  a, b = build(**meta), build(**meta)
  a.epoch()
  b.epoch()
  for k, v in params(a).items():
    np.testing.assert_array_equal(v, params(b)[k])
  device, host = jax.device_get(a.device_state()), a.host_state()
  a.epoch()
  c = build(**meta)
  c.load(device, host)
  assert c.epochs_done == 1
  c.epoch()
  for k, v in params(a).items():
    np.testing.assert_array_equal(v, params(c)[k])
  assert c.meta.count == a.meta.count > 0


def test_a_mesh_given_to_the_trainer_is_used_as_it_is():
  mesh = sharding.make_mesh(1)
  cfg = Config.from_flat(**TINY, weighting="none")
  t = Trainer(cfg, data.load_dataset(cfg.data, seed=0), mesh)
  assert t.mesh is None  # one device: no sharding
  assert t.place({"x": np.zeros(3)})["x"].shape == (3,)
  with pytest.raises(ValueError, match="--mesh_devices=2: 1 device"):
    Trainer(Config.from_flat(**TINY, mesh_devices=2), data.load_dataset(cfg.data, seed=0))
