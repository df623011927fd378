"""Which held-out loss ranks trained models the way validation Recall@20 does?

  python -m experiments.meta_objectives --runs=results/gowalla_grid \
      --data_path=../shared/datasets/gowalla --out=results/gowalla_meta_objectives

The meta-learner moves the auxiliary weights down the gradient of a held-out primary loss
(`--meta_loss`), so that loss should order models as the metric we select them by does.
For every finished run under RUNS/runs/<run>/seed<k>/ made on the split of --seed (its saved
model, the embeddings of the selected epoch), this evaluates on the validation pairs of the same split:

  bpr      mean softplus(s_uj - s_ui), one uniform unobserved negative j per pair (the
           same negatives for every run);
  softmax  mean [logsumexp_j s_uj - s_ui] over every item j but the user's training items;

and reports Spearman's rank correlation of each loss (negated) with the run's validation
Recall@20. OUT/meta_objectives.{json,md} hold the table.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags

from experiments import saved_runs
from experiments.config_flags import config_from_flags, define_config_flags, parse_flags

define_config_flags()
flags.DEFINE_string("runs", "results/compare", "A compare output folder (its runs/).")
flags.DEFINE_string("out", "results/meta_objectives", "Output folder.")
flags.DEFINE_integer("block", 1024, "Validation pairs scored per block.")


def _ranks(x) -> np.ndarray:
  """Ranks 0..n-1, ties given their mean rank."""
  x = np.asarray(x, float)
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(len(x))
  for v in np.unique(x):
    ranks[x == v] = ranks[x == v].mean()
  return ranks


def spearman(a, b) -> float:
  """Spearman's rank correlation: Pearson's on the (tie-averaged) ranks."""
  ra, rb = _ranks(a), _ranks(b)
  return float(np.corrcoef(ra, rb)[0, 1])


def held_out_losses(user_emb, item_emb, ds, negatives, block: int) -> dict:
  """{"bpr", "softmax"} on ds.valid for one model's scoring embeddings."""
  import jax
  import jax.numpy as jnp

  from maxrec import losses
  from maxrec.sampling import SeenItems

  seen = SeenItems(ds.train, ds.n_users, ds.n_items)
  users, items = ds.valid[:, 0], ds.valid[:, 1]
  fu, fi = jnp.asarray(user_emb), jnp.asarray(item_emb)

  @jax.jit
  def block_losses(fu, fi, u, i, j, s):  # tables as arguments, not baked-in constants
    scores = fu[u] @ fi.T
    bpr = jax.nn.softplus(scores[jnp.arange(u.shape[0]), j] - scores[jnp.arange(u.shape[0]), i])
    rows = jnp.arange(u.shape[0])[:, None]
    masked = scores.at[rows, s].set(losses.MASK_LOGIT, mode="drop")
    ce = jax.nn.logsumexp(masked, -1) - scores[jnp.arange(u.shape[0]), i]
    return jnp.sum(bpr), jnp.sum(ce)

  n, tot = len(users), np.zeros(2)
  for a in range(0, n, block):
    sl = np.arange(a, a + block) % n  # full blocks: one compilation; the wrap is cut below
    take = min(block, n - a)
    b, c = block_losses(fu, fi, users[sl], items[sl], negatives[sl], seen.rows(users[sl]))
    if take < block:  # recompute the tail exactly
      b, c = block_losses(
        fu,
        fi,
        users[sl][:take],
        items[sl][:take],
        negatives[sl][:take],
        seen.rows(users[sl][:take]),
      )
    tot += [float(b), float(c)]
  return {"bpr": tot[0] / n, "softmax": tot[1] / n}


def main(argv):
  del argv
  fv = flags.FLAGS
  from maxrec import data
  from maxrec.sampling import Sampler

  config = config_from_flags()
  ds = data.load_dataset(config.data, seed=config.train.seed)
  try:
    runs = saved_runs.runs_on_split(fv.runs, config, ds)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  negatives = Sampler(ds.valid, ds.observed, ds.n_users, ds.n_items).negatives(
    np.random.default_rng(0), ds.valid[:, 0]
  )
  select = config.train.early_stop_metric
  rows = []
  for name, d, model in runs:
    with open(os.path.join(d, "final_metrics.json")) as f:
      final = json.load(f)
    row = {
      "run": name,
      "valid": final["valid"][select],
    }
    row.update(held_out_losses(model.user_emb, model.item_emb, ds, negatives, fv.block))
    rows.append(row)
    print(
      f"{row['run']}: valid {select} {row['valid']:.4f} | bpr {row['bpr']:.4f} | "
      f"softmax {row['softmax']:.4f}",
      flush=True,
    )
  valid = [r["valid"] for r in rows]
  corr = {k: spearman(valid, [-r[k] for r in rows]) for k in ("bpr", "softmax")}
  os.makedirs(fv.out, exist_ok=True)
  with open(os.path.join(fv.out, "meta_objectives.json"), "w") as f:
    json.dump({"runs": rows, "spearman": corr}, f, indent=1)
  lines = [
    f"Command: `python -m experiments.meta_objectives {' '.join(sys.argv[1:])}`",
    "",
    f"| run | valid {select} | held-out BPR | held-out softmax CE |",
    "|---|---|---|---|",
  ]
  for r in sorted(rows, key=lambda r: -r["valid"]):
    lines.append(f"| {r['run']} | {r['valid']:.4f} | {r['bpr']:.4f} | {r['softmax']:.4f} |")
  lines += [
    "",
    f"Spearman's ρ with validation {select} (of the negated loss): "
    f"BPR {corr['bpr']:+.3f}, softmax {corr['softmax']:+.3f} ({len(rows)} runs).",
  ]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(fv.out, "meta_objectives.md"), "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
