"""Benchmarks measured side by side in one process, printed as times and ratios.

  python -m experiments.bench                                # default data: meta vs fixed
  python -m experiments.bench --scale=gowalla --out=bench.json   # the performance targets

--scale=gowalla builds a Gowalla-sized problem with the built-in generator (29,858 users x
40,981 items, about 810k training interactions, d = 64, batch 2048; no download) and
measures, in this order: MF-BPR epoch (the default lazy Adam; on the CPU the fused native
step), full-ranking evaluation of every test user (with the default top-k -- on the CPU
the native kernel -- and with XLA's two-level top-k) against the bare score matmul of the
same shapes, the MF-BPR epoch again with XLA's row-sparse step (when the default was the
native one), MF-BPR epoch with plain SGD (`--optimizer=sgd --learning_rate=20`,
implicit's update rule), LightGCN epoch, fixed-weight and meta-learning epochs of the default method, and implicit's C++ BPR on
the same data when `implicit` is installed (`pip install -e '.[bench]'`). Peak RSS is read
after the MF run and its evaluation. Times are medians over epochs after compilation,
which is timed apart; the meta-learning epoch is a mean, because its meta steps come every
N steps and fall in some epochs and not in others.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments.config_flags import config_from_flags, define_config_flags, parse_flags

define_config_flags()
flags.DEFINE_enum("scale", "default", ["default", "gowalla"], "Problem size.")
flags.DEFINE_list("only", [], "Subset of: mf, eval, lightgcn, fixed, meta, implicit.")
flags.DEFINE_integer(
  "timed_epochs",
  None,
  "Epochs timed per LightGCN/fixed/meta measurement (3 at Gowalla size, else 6).",
)
flags.DEFINE_integer("mf_timed_epochs", 9, "Epochs timed for the (sub-second) MF epoch.")
flags.DEFINE_string("out", None, "Write the figures to this JSON file.")

GOWALLA = dict(
  synth_users=29858,
  synth_items=40981,
  synth_interactions=1_000_000,
  split_ratios=(0.81, 0.09, 0.1),  # the training share of the Gowalla split
  batch_size=2048,
  embedding_dim=64,
)
PEERS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "peers", "results")


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_epochs(cfg, ds, timed: int) -> dict:
  """Epoch time of a `Trainer` after compiling its step (and its first meta step): the
  median, or with meta-learning the mean, since meta steps come every N steps and so fall
  in some epochs and not others (a median would pick one kind of epoch)."""
  from maxrec.trainer import Trainer

  trainer = Trainer(cfg, ds)
  g, w = trainer.graph, trainer.weights
  batches = trainer.sample(0)
  t0 = time.perf_counter()
  state, _ = trainer.run_steps(trainer.state, g, w, batches, jnp.int32(0), jnp.int32(1))
  jax.block_until_ready(state.params)
  compile_s = time.perf_counter() - t0  # compilation + one step
  trainer.state = state
  warm = 0
  if trainer.meta is not None:  # run past the first meta step, which compiles the meta step
    first_meta = max(trainer.meta.warmup, trainer.meta.every)
    while int(trainer.state.step) <= first_meta:
      trainer.epoch()
      warm += 1
  times, meta_s = [], 0.0
  meta_before = trainer.meta.count if trainer.meta is not None else 0
  for _ in range(timed):
    _, t = trainer.epoch()
    times.append(t["epoch_s"])
    meta_s += t["meta_s"]
  out = {
    "epoch_s": float(np.mean(times) if trainer.meta is not None else np.median(times)),
    "epoch_s_all": [round(x, 4) for x in times],
    "compile_s": compile_s,
    "warmup_epochs": warm,
    "steps_per_epoch": trainer.n_batches,
    "compilations": trainer.run_steps._cache_size(),
    "sparse_kernel": trainer.sparse_kernel,
  }
  if trainer.meta is not None:
    out["meta_steps_timed"] = trainer.meta.count - meta_before
    out["meta_s_per_epoch"] = meta_s / timed
    out["meta_summary"] = trainer.meta.summary()
  return out, trainer


def time_eval(trainer, ds, repeats: int = 3) -> dict:
  """Full-ranking evaluation of every test user with the default top-k (on the CPU the
  native kernel), with XLA's two-level top-k, and the bare blocked matmul, interleaved."""
  from maxrec import metrics

  es = trainer.eval_set(ds.test, ds.observed)
  users, items = trainer.embeddings()
  method = metrics.top_k_method(users, items, es.users)

  @jax.jit
  def bare(users, items, blocks):
    def one(acc, b):  # the same [block, items] products; a sum keeps them from being elided
      return acc + jnp.sum(users[b] @ items.T), None

    return jax.lax.scan(one, jnp.zeros(()), blocks)[0]

  runs = {
    "eval_s": lambda: metrics.evaluate(users, items, es, top_k=method),
    "matmul_s": lambda: jax.block_until_ready(bare(users, items, es.users)),
  }
  if method != "two_level":
    runs["eval_two_level_s"] = lambda: metrics.evaluate(users, items, es, top_k="two_level")
  compile_s, times = {}, {k: [] for k in runs}
  for key, run in runs.items():
    t0 = time.perf_counter()
    run()
    compile_s[key] = time.perf_counter() - t0
  for _ in range(repeats):  # interleaved, so that a slow spell of the machine hits all
    for key, run in runs.items():
      t0 = time.perf_counter()
      run()
      times[key].append(time.perf_counter() - t0)
  out = {k: float(np.median(v)) for k, v in times.items()}
  return {
    **out,
    "eval_top_k": method,
    "eval_compile_s": compile_s["eval_s"],
    "eval_users": es.n_users,
    "eval_block": int(es.users.shape[1]),
  }


def time_implicit(ds, repeats: int = 3, iterations: int = 20) -> dict | None:
  """implicit's BPR (C++, Hogwild SGD, 2 threads) on the same training pairs."""
  try:
    import scipy.sparse as sp
    from implicit.cpu.bpr import BayesianPersonalizedRanking
  except ImportError:
    return None
  ui = sp.csr_matrix(
    (np.ones(len(ds.train), np.float32), (ds.train[:, 0], ds.train[:, 1])),
    shape=(ds.n_users, ds.n_items),
  )
  times = []
  for r in range(repeats + 1):
    model = BayesianPersonalizedRanking(
      factors=64, iterations=iterations, num_threads=2, random_state=r
    )
    t0 = time.perf_counter()
    model.fit(ui, show_progress=False)
    times.append((time.perf_counter() - t0) / iterations)
  return {"implicit_epoch_s": float(np.median(times[1:])), "implicit_iterations": iterations}


def _peer(name: str, key: str):
  path = os.path.join(PEERS, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get(key)


def main(argv):
  del argv
  from maxrec import data

  fv = flags.FLAGS
  known = {"mf", "eval", "lightgcn", "fixed", "meta", "implicit"}
  only = set(fv.only) or (known if fv.scale == "gowalla" else {"fixed", "meta"})
  try:
    if only - known:
      raise ValueError(
        f"--only: unknown {', '.join(sorted(only - known))}; use {', '.join(sorted(known))}."
      )
    base = config_from_flags(**(GOWALLA if fv.scale == "gowalla" else {}))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  timed = fv.timed_epochs or (3 if fv.scale == "gowalla" else 6)
  t0 = time.perf_counter()
  raw = data.load_raw(base.data)
  ds = data.build_dataset(raw, base.data, seed=base.train.seed)
  ratio = base.replace(weighting="meta").meta_ratio
  meta_ds = data.build_dataset(raw, base.data, seed=base.train.seed, meta_ratio=ratio)
  del raw
  logging.info("%s", data.describe(ds))
  logging.info("fixed and meta epochs use this data with a meta split:\n%s", data.describe(meta_ds))
  r = {
    "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), {jax.devices()[0].device_kind}",
    "jax": jax.__version__,
    "command": "python -m experiments.bench " + " ".join(sys.argv[1:]),
    "data": {k: ds.summary[k] for k in ("n_users", "n_items", "n_train", "n_test")},
    "data_s": time.perf_counter() - t0,
    "rss_after_data_mib": _rss_mib(),
  }
  if "mf" in only or "eval" in only:
    res, trainer = time_epochs(base.replace(model="mf", weighting="none"), ds, fv.mf_timed_epochs)
    r["mf"], r["mf_epoch_s"] = res, res["epoch_s"]
    if "eval" in only:
      r.update(time_eval(trainer, ds))
    r["peak_rss_mib"] = _rss_mib()  # the MF run and its evaluation, before anything else
    del trainer
  if "mf" in only and r["mf"]["sparse_kernel"] == "native":  # the XLA step, for the gain
    xla = base.replace(model="mf", weighting="none", sparse_kernel="xla")
    res, _ = time_epochs(xla, ds, fv.mf_timed_epochs)
    r["mf_xla"], r["mf_xla_epoch_s"] = res, res["epoch_s"]
  if "mf" in only:  # the same with plain SGD: implicit's update rule
    sgd = base.replace(model="mf", weighting="none", optimizer="sgd", learning_rate=20.0)
    res, _ = time_epochs(sgd, ds, fv.mf_timed_epochs)
    r["mf_sgd"], r["mf_sgd_epoch_s"] = res, res["epoch_s"]
  if "lightgcn" in only:
    res, _ = time_epochs(base.replace(model="lightgcn", weighting="none"), ds, 1)
    r["lightgcn"], r["lightgcn_epoch_s"] = res, res["epoch_s"]
  if "fixed" in only:
    res, _ = time_epochs(base.replace(weighting="fixed"), meta_ds, timed)
    r["fixed"], r["fixed_epoch_s"] = res, res["epoch_s"]
  if "meta" in only:
    res, _ = time_epochs(base.replace(weighting="meta"), meta_ds, timed)
    r["meta"], r["meta_epoch_s"] = res, res["epoch_s"]
  if "implicit" in only:
    imp = time_implicit(ds)
    if imp is None:
      logging.warning("implicit is not installed (pip install -e '.[bench]'): no side-by-side peer")
    else:
      r.update(imp)
  _report(r, fv.scale)
  if fv.out:
    with open(fv.out, "w") as f:
      json.dump(r, f, indent=2)
    print(f"wrote {fv.out}")
  return 0


def _report(r: dict, scale: str) -> None:
  rows = [
    ("mf_epoch_s", "MF-BPR epoch (lazy Adam)"),
    ("mf_xla_epoch_s", "  the same, XLA row-sparse step"),
    ("mf_sgd_epoch_s", "MF-BPR epoch (SGD)"),
    ("lightgcn_epoch_s", "LightGCN (3 layers) epoch"),
    ("eval_s", "full-ranking evaluation, all users"),
    ("eval_two_level_s", "  the same, XLA two-level top-k"),
    ("matmul_s", "bare score matmul, same shapes"),
    ("fixed_epoch_s", "fixed-weight epoch (MF + 2 tasks)"),
    ("meta_epoch_s", "meta-learning epoch (CG)"),
    ("implicit_epoch_s", "implicit BPR epoch (C++)"),
  ]
  print(f"\n{'measurement':<40}{'seconds':>10}")
  for key, label in rows:
    if key in r:
      print(f"{label:<40}{r[key]:>10.3f}")
  if "peak_rss_mib" in r:
    print(f"{'peak RSS after MF + evaluation (MiB)':<40}{r['peak_rss_mib']:>10.0f}")
  print("\nratios (targets in brackets)")
  ratio = lambda a, b: r[a] / r[b] if a in r and b in r else None  # noqa: E731
  checks = [
    ("eval / bare matmul", ratio("eval_s", "matmul_s"), "<= 1.2"),
    ("meta / fixed epoch", ratio("meta_epoch_s", "fixed_epoch_s"), "<= 1.3"),
    ("MF epoch / implicit epoch", ratio("mf_epoch_s", "implicit_epoch_s"), "<= 2 (same run)"),
    ("MF SGD epoch / implicit epoch", ratio("mf_sgd_epoch_s", "implicit_epoch_s"), "same rule"),
  ]
  if scale == "gowalla":
    rb_mf = _peer("recbole_bpr_gowalla.json", "s_per_epoch_median")
    if rb_mf and "mf_epoch_s" in r:
      checks.append(("RecBole MF epoch / ours (recorded)", rb_mf / r["mf_epoch_s"], ">= 10"))
    if "lightgcn_epoch_s" in r:  # RecBole's LightGCN epoch: 1.83 s/batch x 396 (RESULTS.md)
      checks.append(
        ("RecBole LightGCN epoch / ours (recorded)", 725.0 / r["lightgcn_epoch_s"], ">= 5")
      )
  for label, value, target in checks:
    if value is not None:
      print(f"{label:<40}{value:>10.2f}x   ({target})")
  for key in ("mf", "mf_xla", "mf_sgd", "lightgcn", "fixed", "meta"):
    if key in r:
      print(f"{key}: compile {r[key]['compile_s']:.1f}s, compilations {r[key]['compilations']}")


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
