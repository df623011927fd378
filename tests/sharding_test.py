"""Sharded training on 8 simulated CPU devices equals the single-device run.

JAX reads XLA_FLAGS once, at start, so the check runs in a child process with
--xla_force_host_platform_device_count=8; that child compares a mesh of 8 against a mesh
of 1 in the same process.
"""

import textwrap

from helpers import run_script

CHILD = textwrap.dedent(
  """
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import PartitionSpec as P
  from maxrec import data, metrics, train
  from maxrec import meta as meta_lib
  from maxrec.config import Config

  assert jax.device_count() == 8, jax.devices()
  out = {}
  kw = dict(
    synth_users=203, synth_items=301, synth_interactions=6000, batch_size=256,
    meta_every=5, hyper_batch_size=256, meta_batch_size=256, propagation="segment",
  )
  for model, weighting, opt in (("mf", "none", "adam"), ("mf", "none", "sgd"),
                                ("lightgcn", "meta", "adam")):
    finals, trainers = {}, {}
    for mesh in (1, 8):
      lr = 5.0 if opt == "sgd" else 1e-3
      # two epochs for meta: its steps start once validation beats popularity
      cfg = Config.from_flat(**kw, model=model, weighting=weighting, mesh_devices=mesh,
                             optimizer=opt, learning_rate=lr, epochs=2 if weighting == "meta" else 1)
      finals[mesh] = train.train_and_evaluate(cfg, f"{sys.argv[1]}/{model}{opt}{mesh}")
      ds = data.load_dataset(cfg.data, seed=0, meta_ratio=cfg.meta_ratio)
      tr = train.Trainer(cfg, ds)
      tr.epoch()
      trainers[mesh] = tr
    for part in ("test", "valid"):
      for k, v in finals[1][part].items():
        assert abs(v - finals[8][part][k]) < 1e-5, (model, part, k, v, finals[8][part][k])
    if weighting == "meta":
      for k, v in finals[1]["aux_weights_final"].items():
        assert abs(v - finals[8]["aux_weights_final"][k]) < 1e-5
    # each device holds 1/8 of every table and of its optimizer state
    t8 = trainers[8]
    for name, table in t8.state.params.items():
      assert table.sharding.spec == P("data"), (name, table.sharding)
      shards = {s.data.shape for s in table.addressable_shards}
      assert shards == {(table.shape[0] // 8, table.shape[1])}, (name, shards)
    leaves = [x for x in jax.tree.leaves(t8.state.opt_state) if x.ndim == 2]
    assert (leaves or opt == "sgd") and all(len({s.data.shape[0] for s in x.addressable_shards}) == 1
                          and x.addressable_shards[0].data.shape[0] == x.shape[0] // 8 for x in leaves)
    # the same hypergradient from the same state, sharded and not
    if weighting == "meta":
      hg = {}
      for mesh, tr in trainers.items():
        learner = meta_lib.MetaLearner(tr.objective, tr.cfg.meta, 2)
        tr.meta.count = 0
        batches = tr.meta._batches()
        _, _, info = learner.step(
          tr.state.params, learner.init(tr.state.aux_params), tr.state.aux_params, batches,
          jax.random.key(3), jnp.asarray(True), tr.graph, tr.weights,
        )
        hg[mesh] = np.asarray(info["hypergrad"])
        out[f"hypergrad_{mesh}"] = hg[mesh].tolist()
      np.testing.assert_allclose(hg[8], hg[1], rtol=1e-4, atol=1e-9)
      # the evaluation of sharded embeddings equals the unsharded one
      es8 = trainers[8].eval_set(ds.test, ds.observed)
      es1 = trainers[1].eval_set(ds.test, ds.observed)
      assert es8.users.sharding.spec == P(None, "data")
      m8 = metrics.evaluate(*trainers[8].embeddings(), es8)
      m1 = metrics.evaluate(*trainers[1].embeddings(), es1)
      assert all(abs(m8[k] - m1[k]) < 1e-5 for k in m1), (m8, m1)
  print(json.dumps(out))
  print("SHARDING OK")
  """
)


def test_eight_device_mesh_equals_single_device(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  r = run_script(
    script,
    str(tmp_path),
    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    timeout=1200,
  )
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  assert "SHARDING OK" in r.stdout


def test_mesh_size_validation():
  import pytest

  from maxrec import sharding

  with pytest.raises(ValueError, match="--mesh_devices=64: 1 device"):
    sharding.make_mesh(64)
