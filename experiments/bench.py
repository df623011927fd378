"""Benchmarks measured side by side in one process, printed as times and ratios.

  python -m experiments.bench                      # meta vs fixed epoch, default settings
  python -m experiments.bench --out=bench.json     # also write the figures as JSON

Every figure is a mean over timed epochs after warm-up epochs that absorb compilation
(and, for meta-learning, the first meta step's compilation). Any config flag applies, e.g.
--model=lightgcn or --data_path=...; the data set is the built-in one by default.
"""

from __future__ import annotations

import json
import platform
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments.config_flags import config_from_flags, define_config_flags

define_config_flags()
flags.DEFINE_list("only", ["fixed", "meta"], "What to measure: fixed, meta.")
flags.DEFINE_integer("timed_epochs", 5, "Epochs timed per measurement (after warm-up).")
flags.DEFINE_string("out", None, "Write the figures to this JSON file.")


def time_epochs(cfg, ds, timed: int) -> dict:
  """Mean epoch time of a `Trainer` after the epochs that compile its steps."""
  from maxrec.train import Trainer

  trainer = Trainer(cfg, ds)
  warm = 1
  if trainer.meta is not None:  # run past the first meta step, which compiles the meta step
    first_meta = max(trainer.meta.warmup, cfg.meta.meta_every)
    warm = -(-first_meta // trainer.n_batches) + 1
  t0 = time.perf_counter()
  for _ in range(warm):
    trainer.epoch()
  warm_s = time.perf_counter() - t0
  times, meta_s = [], 0.0
  meta_before = trainer.meta.count if trainer.meta is not None else 0
  for _ in range(timed):
    _, t = trainer.epoch()
    times.append(t["epoch_s"])
    meta_s += t["meta_s"]
  out = {
    "epoch_s": float(np.mean(times)),
    "epoch_s_all": [round(x, 4) for x in times],
    "warmup_epochs": warm,
    "warmup_s": warm_s,
    "steps_per_epoch": trainer.n_batches,
  }
  if trainer.meta is not None:
    out["meta_steps_timed"] = trainer.meta.count - meta_before
    out["meta_s_per_epoch"] = meta_s / timed
    out["meta_summary"] = trainer.meta.summary()
  return out


def main(argv):
  del argv
  from maxrec import data

  fv = flags.FLAGS
  try:
    base = config_from_flags()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  unknown = set(fv.only) - {"fixed", "meta"}
  if unknown:
    print(f"error: --only: unknown item(s) {', '.join(sorted(unknown))}", file=sys.stderr)
    return 2
  meta_cfg = base.replace(weighting="meta")
  ds = data.load_dataset(base.data, seed=base.train.seed, meta_ratio=meta_cfg.meta_ratio)
  logging.info("%s", data.describe(ds))
  result = {
    "machine": f"{platform.machine()}, {jax.devices()[0].device_kind}, {jax.device_count()} device(s)",
    "jax": jax.__version__,
    "command": "python -m experiments.bench " + " ".join(sys.argv[1:]),
    "config": {
      k: v
      for k, v in base.flat().items()
      if k in ("model", "aux_tasks", "batch_size", "meta_every", "cg_iters")
    },
  }
  if "fixed" in fv.only:
    r = time_epochs(base.replace(weighting="fixed"), ds, fv.timed_epochs)
    result["fixed_epoch_s"], result["fixed"] = r["epoch_s"], r
  if "meta" in fv.only:
    r = time_epochs(meta_cfg, ds, fv.timed_epochs)
    result["meta_epoch_s"], result["meta"] = r["epoch_s"], r
  print(f"{'measurement':<28}{'seconds':>10}")
  for key in ("fixed_epoch_s", "meta_epoch_s"):
    if key in result:
      print(f"{key:<28}{result[key]:>10.3f}")
  if "fixed_epoch_s" in result and "meta_epoch_s" in result:
    result["meta_over_fixed"] = result["meta_epoch_s"] / result["fixed_epoch_s"]
    print(f"{'meta / fixed epoch':<28}{result['meta_over_fixed']:>10.2f}x   (target <= 1.3x)")
  if fv.out:
    with open(fv.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {fv.out}")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
