"""A training-free baseline: GF-CF's ideal low-pass graph filter (Shen et al., CIKM 2021).

  python -m experiments.graph_filter --data_path=../shared/datasets/gowalla \
      --ranks=64,128,256,512 --out=results/gowalla_graph_filter

Scores s_u = r_u D_I^{-1/2} V_k V_kᵀ D_I^{1/2}, with V_k the top-k right singular vectors
of the normalised interactions R̃ = D_U^{-1/2} R D_I^{-1/2} (`maxrec.spectral`). Each rank
is validated on the same split as `experiments.train` (same --seed), the best one on
--early_stop_metric is tested, and OUT/final_metrics.json has the same keys as a trained
run's (best_epoch is 0: nothing is trained), plus the rank and the time of each step.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from experiments.config_flags import config_from_flags, define_config_flags, parse_flags

define_config_flags()
flags.DEFINE_list("ranks", ["64", "128", "256", "512"], "Ranks k to validate.")
flags.DEFINE_string("out", "results/graph_filter", "Output folder.")


def run(config, ranks: list[int], out: str) -> dict:
  """Validates each rank, tests the best; returns what final_metrics.json holds."""
  import jax
  import numpy as np

  from maxrec import data, metrics, spectral

  t0 = time.perf_counter()
  ds = data.load_dataset(config.data, seed=config.train.seed)
  ks, select = config.train.topk, config.train.early_stop_metric
  valid_set = metrics.build_eval_set(
    ds.valid, ds.observed, ds.n_users, config.train.eval_batch_size
  )
  test_set = metrics.build_eval_set(
    ds.test, np.concatenate([ds.observed, ds.valid]), ds.n_users, config.train.eval_batch_size
  )
  t1 = time.perf_counter()
  key = jax.random.key(config.train.seed)
  svd = spectral.truncated_svd(ds.train, ds.n_users, ds.n_items, max(ranks), key=key)
  jax.block_until_ready(svd.u)
  svd_s = time.perf_counter() - t1
  print(
    f"SVD of rank {max(ranks)} in {svd_s:.1f}s (largest residual {float(svd.residual.max()):.1e})"
  )
  by_rank, best = {}, None
  for k in sorted(ranks):
    sub = spectral.SVDResult(svd.u[:, :k], svd.s[:k], svd.v[:, :k], svd.residual[:k])
    emb = spectral.ideal_low_pass_embeddings(sub, ds.train, ds.n_users, ds.n_items)
    t2 = time.perf_counter()
    valid = metrics.evaluate(*emb, valid_set, ks)
    by_rank[k] = {"valid": valid, "eval_s": time.perf_counter() - t2}
    print(f"rank {k:4d}: valid recall@20={valid['recall@20']:.4f} ndcg@20={valid['ndcg@20']:.4f}")
    if best is None or valid[select] > by_rank[best]["valid"][select]:
      best = k
  sub = spectral.SVDResult(svd.u[:, :best], svd.s[:best], svd.v[:, :best], svd.residual[:best])
  test = metrics.evaluate(
    *spectral.ideal_low_pass_embeddings(sub, ds.train, ds.n_users, ds.n_items), test_set, ks
  )
  popularity = metrics.evaluate(
    *metrics.popularity_embeddings(ds.observed, ds.n_users, ds.n_items), test_set, ks
  )
  final = {
    "method": "ideal low-pass graph filter (GF-CF)",
    "rank": best,
    "best_epoch": 0,
    "epochs_run": 0,
    "valid": by_rank[best]["valid"],
    "test": test,
    "popularity": popularity,
    "svd_s": svd_s,
    "wall_s": time.perf_counter() - t0,
    "by_rank": {str(k): v for k, v in by_rank.items()},
    "command": "python -m experiments.graph_filter " + " ".join(sys.argv[1:]),
  }
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "final_metrics.json"), "w") as f:
    json.dump(final, f, indent=1)
  print(
    f"rank {best}: test recall@20={test['recall@20']:.4f} ndcg@20={test['ndcg@20']:.4f} | "
    f"popularity recall@20={popularity['recall@20']:.4f} | {final['wall_s']:.1f}s in all"
  )
  return final


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from maxrec.readers import DataError

  try:
    config = config_from_flags()
    ranks = [int(r) for r in flags.FLAGS.ranks]
    if not ranks or min(ranks) < 1:
      raise ValueError(f"--ranks={','.join(flags.FLAGS.ranks)}: give positive ranks.")
    run(config, ranks, flags.FLAGS.out)
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
