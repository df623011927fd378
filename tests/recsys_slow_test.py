"""T12: recsys-level properties of the full method (slow; run with `pytest -m slow`).

A small synthetic data set with a few taste clusters: MF-BPR beats popularity, and the
meta-learner lowers the weight of an injected noise task (BPR on random pairs) while it
raises the weight of a leaky task (BPR on the meta split itself, test-only).
"""

import jax
import jax.numpy as jnp
import pytest

from maxrec import auxiliary, data, train
from maxrec.config import Config

pytestmark = pytest.mark.slow

SMALL = dict(
  synth_users=300,
  synth_items=400,
  synth_interactions=9000,
  synth_clusters=4,
  batch_size=512,
  epochs=40,
  patience=40,
)


def test_mf_beats_popularity(tmp_path):
  final = train.train_and_evaluate(
    Config.from_flat(**SMALL, weighting="none", learning_rate=5e-3), str(tmp_path)
  )
  assert final["test"]["recall@20"] > final["popularity"]["recall@20"] + 0.03


def _bpr_rows(params, users, pos, neg):
  u = params["user"][users]
  return jax.nn.softplus(
    jnp.sum(u * params["item"][neg], -1) - jnp.sum(u * params["item"][pos], -1)
  )


def test_meta_lowers_noise_weight_and_raises_leaky_weight(tmp_path):
  cfg = Config.from_flat(
    **SMALL,
    weighting="meta",
    aux_tasks=("t12_noise", "t12_leaky"),
    aux_weights=(0.5,),
    learning_rate=5e-3,
    meta_every=5,
    meta_lr=0.05,
    hyper_batch_size=512,
    meta_batch_size=512,
  )
  ds = data.load_dataset(cfg.data, seed=cfg.train.seed, meta_ratio=cfg.meta_ratio)
  meta_pairs = jnp.asarray(ds.meta)
  n_users, n_items = ds.n_users, ds.n_items

  if "t12_noise" not in auxiliary.names():

    @auxiliary.register("t12_noise", "user")
    def _noise(ctx):
      k1, k2, k3 = jax.random.split(jax.random.fold_in(ctx.key, 101), 3)
      b = ctx.batch["user"].shape[0]
      users = jax.random.randint(k1, (b,), 0, n_users)
      pos, neg = jax.random.randint(k2, (b,), 0, n_items), jax.random.randint(k3, (b,), 0, n_items)
      return auxiliary.AuxOutput(_bpr_rows(ctx.params, users, pos, neg), users, jnp.ones(b, bool))

  # the leaky task reads this run's R_meta (re-registered with the current split)
  auxiliary._REGISTRY.pop("t12_leaky", None)

  @auxiliary.register("t12_leaky", "user")
  def _leaky(ctx):
    k1, k2 = jax.random.split(jax.random.fold_in(ctx.key, 202))
    b = ctx.batch["user"].shape[0]
    rows = meta_pairs[jax.random.randint(k1, (b,), 0, meta_pairs.shape[0])]
    neg = jax.random.randint(k2, (b,), 0, n_items)
    return auxiliary.AuxOutput(
      _bpr_rows(ctx.params, rows[:, 0], rows[:, 1], neg), rows[:, 0], jnp.ones(b, bool)
    )

  final = train.train_and_evaluate(cfg, str(tmp_path))
  w = final["aux_weights_final"]
  assert w["t12_noise"] < 0.5 < w["t12_leaky"], w
