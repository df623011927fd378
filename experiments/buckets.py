"""Who gains from a model: test metrics by user activity, for every run of a comparison.

  python -m experiments.buckets --runs=results/gowalla \
      --data_path=../shared/datasets/gowalla --out=results/gowalla_buckets

Users are cut into --buckets groups of equal size by their number of training pairs
(quantiles; the last holds the most active users). For every finished run under
RUNS/runs/<run>/seed<k>/ made on the split of --seed, its saved model (the selected epoch)
is evaluated on each group's test pairs with the same full-ranking protocol as `experiments.train` (training
and validation items masked). OUT/buckets.{json,md} hold the table: does an auxiliary
task help the tail users and cost the head ones?
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
flags.DEFINE_string("out", "results/buckets", "Output folder.")
flags.DEFINE_integer("buckets", 4, "Groups of users by training activity.")
flags.DEFINE_string("metric", "recall@20", "The metric in the table.")


def user_groups(train: np.ndarray, n_users: int, n: int) -> tuple[np.ndarray, list[str]]:
  """[n_users] group index 0..n-1 by training-degree quantile, and each group's label."""
  if n < 1:
    raise ValueError(f"--buckets={n} must be >= 1.")
  deg = np.bincount(train[:, 0], minlength=n_users)
  order = np.argsort(deg, kind="stable")
  group = np.empty(n_users, np.int64)
  group[order] = np.arange(n_users) * n // n_users
  labels = [f"{deg[group == g].min()}-{deg[group == g].max()}" for g in range(n)]
  return group, labels


def main(argv):
  del argv
  fv = flags.FLAGS
  import jax.numpy as jnp

  from maxrec import data, metrics

  try:
    config = config_from_flags()
    ds = data.load_dataset(config.data, seed=config.train.seed)
    group, labels = user_groups(ds.train, ds.n_users, fv.buckets)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    runs = saved_runs.runs_on_split(fv.runs, config, ds)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  exclude = np.concatenate([ds.observed, ds.valid])
  sets = []
  for g in range(fv.buckets):
    test = ds.test[group[ds.test[:, 0]] == g]
    sets.append(metrics.build_eval_set(test, exclude, ds.n_users, config.train.eval_batch_size))
  ks = config.train.topk
  rows = []
  for name, _, m in runs:
    u, i = jnp.asarray(m.user_emb), jnp.asarray(m.item_emb)
    values = [metrics.evaluate(u, i, es, ks)[fv.metric] for es in sets]
    rows.append({"run": name, "by_group": values})
    print(f"{rows[-1]['run']}: " + " ".join(f"{v:.4f}" for v in values), flush=True)
  os.makedirs(fv.out, exist_ok=True)
  with open(os.path.join(fv.out, "buckets.json"), "w") as f:
    users = [es.n_users for es in sets]
    json.dump({"groups": labels, "users": users, "metric": fv.metric, "runs": rows}, f, indent=1)
  lines = [
    f"Command: `python -m experiments.buckets {' '.join(sys.argv[1:])}`",
    "",
    f"Test {fv.metric} by users' number of training pairs ({fv.buckets} groups of equal size).",
    "",
    "| run | " + " | ".join(labels) + " |",
    "|---" * (1 + len(labels)) + "|",
  ]
  for r in rows:
    lines.append(f"| {r['run']} | " + " | ".join(f"{v:.4f}" for v in r["by_group"]) + " |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(fv.out, "buckets.md"), "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
