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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_meta_lowers_noise_weight_and_raises_leaky_weight(tmp_path, seed):
  """At the selected (best validation) epoch the noise task's weight has fallen below its
  start (0.5) and the leaky one's has risen above it. Later, once the model overfits, both
  rise: BPR on random pairs pulls each user's scores together, a shrinkage that does lower
  the held-out loss then, and the implicit hypergradient sees it (the first-order cosine
  stays negative). The selected epoch is the one the method reports."""
  # The tasks read this run's sizes and R_meta from `split` at trace time; they are
  # registered first, since the configuration checks task names.
  split = {}

  def noise(ctx):
    k1, k2, k3 = jax.random.split(jax.random.fold_in(ctx.key, 101), 3)
    b, n_users, n_items = ctx.batch["user"].shape[0], split["n_users"], split["n_items"]
    users = jax.random.randint(k1, (b,), 0, n_users)
    pos, neg = jax.random.randint(k2, (b,), 0, n_items), jax.random.randint(k3, (b,), 0, n_items)
    return auxiliary.AuxOutput(_bpr_rows(ctx.params, users, pos, neg), users, jnp.ones(b, bool))

  def leaky(ctx):
    k1, k2 = jax.random.split(jax.random.fold_in(ctx.key, 202))
    b, pairs = ctx.batch["user"].shape[0], split["meta"]
    rows = pairs[jax.random.randint(k1, (b,), 0, pairs.shape[0])]
    neg = jax.random.randint(k2, (b,), 0, split["n_items"])
    return auxiliary.AuxOutput(
      _bpr_rows(ctx.params, rows[:, 0], rows[:, 1], neg), rows[:, 0], jnp.ones(b, bool)
    )

  for name, fn in (("t12_noise", noise), ("t12_leaky", leaky)):
    auxiliary._REGISTRY.pop(name, None)
    auxiliary.register(name, "user")(fn)
  try:
    _train_and_check(tmp_path, split, seed)
  finally:
    for name in ("t12_noise", "t12_leaky"):
      auxiliary._REGISTRY.pop(name, None)


def _train_and_check(tmp_path, split, seed):
  cfg = Config.from_flat(
    **{**SMALL, "patience": 10},
    seed=seed,
    weighting="meta",
    aux_tasks=("t12_noise", "t12_leaky"),
    aux_weights=(0.5,),
    learning_rate=5e-3,
    meta_every=5,
    meta_lr=0.05,
    hyper_batch_size=512,
    meta_batch_size=512,
    meta_data="heldout",  # T12's leaky task reads R_meta, carved from training
    meta_loss="bpr",
  )
  ds = data.load_dataset(cfg.data, seed=cfg.train.seed, meta_ratio=cfg.meta_ratio)
  split.update(meta=jnp.asarray(ds.meta), n_users=ds.n_users, n_items=ds.n_items)
  final = train.train_and_evaluate(cfg, str(tmp_path))
  w = final["aux_weights"]
  assert w["t12_noise"] < 0.5 < w["t12_leaky"], (final["best_epoch"], w)
