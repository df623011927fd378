"""Runs methods x seeds on one data set and writes a comparison table.

  python -m experiments.compare --data_path=../shared/datasets/ml-100k/u.data \
      --methods=mf,lightgcn,lightgcn_fixed --seeds=0,1,2 --out=results/ml100k

Every (method, seed) run lives in OUT/runs/<method>/seed<k>/, and a run whose
final_metrics.json exists is skipped, so an interrupted comparison resumes where it stopped.
A method family with a grid (e.g. `lightgcn_fixed`: one run per weight in --fixed_grid)
is reduced to the grid value with the best mean validation score, the selection the table
reports; every grid value is listed below it. Outputs: OUT/results.csv (one row per run),
OUT/results.md (mean ± std) and PNG plots. Any config flag (e.g. --epochs) applies to
every run.

Methods, for each backbone B in {mf, lightgcn}:
  B                       the backbone alone
  B_fixed                 fixed weights of the SGL tasks (user_sgl, item_sgl), one run per
                          --fixed_grid value (x --temperature_grid value, when given)
  B_fixed_noise           the same grid for the noise-view tasks (user_simgcl, item_simgcl)
  B_uncertainty           uncertainty weighting (Kendall et al. 2018)
  B_meta                  meta-learned weights, CG hypergradient (the paper's method)
  B_meta_neumann, B_meta_unrolled, B_meta_first_order    other hypergradients
  B_meta_user, B_meta_item                               one auxiliary task only
  B_meta_bpr              the meta loss BPR instead of softmax (--meta_loss=bpr)
  B_meta_heldout          the meta loss on R_meta, carved from training (--meta_data=heldout)
  B_meta_net              [A6] per-anchor weights from the degree-conditioned network
Ablations of B_meta (docs/method.md §3.2):
  B_meta_cg_iters         one run per --cg_iters_grid value (J)
  B_meta_every            one run per --meta_every_grid value (N)
  B_meta_split            one run per --meta_split_grid value (the meta split's share)
  B_meta_replay           [A9] retrain on R_in ∪ R_meta replaying B_meta_heldout's logged
                          weights (B_meta_heldout of the same seed must be in --methods,
                          before it)
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging

from experiments.config_flags import config_from_flags, define_config_flags, parse_flags

define_config_flags()
flags.DEFINE_list("methods", ["mf", "lightgcn", "lightgcn_fixed"], "Methods to compare.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (each sets --seed).")
flags.DEFINE_string("out", "results/compare", "Output folder (resumable).")
flags.DEFINE_list("fixed_grid", ["0.001", "0.01", "0.1"], "Weights tried by *_fixed methods.")
flags.DEFINE_list(
  "temperature_grid", [], "InfoNCE temperatures tried by *_fixed methods (x --fixed_grid)."
)
flags.DEFINE_list("cg_iters_grid", ["1", "3", "5", "10", "20"], "J of *_meta_cg_iters.")
flags.DEFINE_list("meta_every_grid", ["10", "50", "200"], "N of *_meta_every.")
flags.DEFINE_list("meta_split_grid", ["0.05", "0.1", "0.2"], "--meta_ratio of *_meta_split.")
flags.DEFINE_list("report", ["recall@20", "ndcg@20"], "Metrics in the table.")


# A method is a set of config overrides; a family with "grid" expands to one run per value.
def _methods() -> dict[str, dict]:
  out = {}
  for b in ("mf", "lightgcn"):
    out[b] = dict(model=b, weighting="none")
    out[f"{b}_fixed"] = dict(model=b, weighting="fixed", grid="aux_weights")
    noise = ("user_simgcl", "item_simgcl")
    out[f"{b}_fixed_noise"] = dict(model=b, weighting="fixed", aux_tasks=noise, grid="aux_weights")
    out[f"{b}_uncertainty"] = dict(model=b, weighting="uncertainty")
    out[f"{b}_meta"] = dict(model=b, weighting="meta", hypergrad="cg")
    for h in ("neumann", "unrolled", "first_order"):
      out[f"{b}_meta_{h}"] = dict(model=b, weighting="meta", hypergrad=h)
    out[f"{b}_meta_bpr"] = dict(model=b, weighting="meta", meta_loss="bpr")
    out[f"{b}_meta_heldout"] = dict(model=b, weighting="meta", meta_data="heldout")
    out[f"{b}_meta_net"] = dict(model=b, weighting="meta", weight_net=True)
    out[f"{b}_meta_user"] = dict(model=b, weighting="meta", aux_tasks=("user_sgl",))
    out[f"{b}_meta_item"] = dict(model=b, weighting="meta", aux_tasks=("item_sgl",))
    out[f"{b}_meta_cg_iters"] = dict(model=b, weighting="meta", grid="cg_iters")
    out[f"{b}_meta_every"] = dict(model=b, weighting="meta", grid="meta_every")
    out[f"{b}_meta_split"] = dict(model=b, weighting="meta", meta_data="heldout", grid="meta_ratio")
    out[f"{b}_meta_replay"] = dict(model=b, weighting="replay", replay_of=f"{b}_meta_heldout")
  return out


# The flag holding each grid's values, and how a value is parsed.
GRIDS = {
  "aux_weights": ("fixed_grid", lambda v: (float(v),)),
  "cg_iters": ("cg_iters_grid", int),
  "meta_every": ("meta_every_grid", int),
  "meta_ratio": ("meta_split_grid", float),
  "ssl_temperature": ("temperature_grid", float),
}


METHODS = _methods()
BASELINE_WEIGHTINGS = ("none", "fixed", "uncertainty")


def expand(method: str, grids: dict[str, list[str]]) -> list[tuple[str, dict]]:
  """(run name, overrides) of a method; grid families give one run per value.

  Args:
    grids: values of each grid flag (e.g. {"fixed_grid": ["0.01", "0.1"]}).
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}.")
  spec = dict(METHODS[method])
  field = spec.pop("grid", None)
  if field is None:
    return [(method, spec)]
  flag, parse = GRIDS[field]
  try:
    runs = [(f"{method}@{v}", {**spec, field: parse(v)}) for v in grids[flag]]
    if field == "aux_weights" and grids.get("temperature_grid"):  # weight x temperature
      flag, parse = GRIDS["ssl_temperature"]
      runs = [
        (f"{name},tau{t}", {**o, "ssl_temperature": parse(t)})
        for name, o in runs
        for t in grids[flag]
      ]
  except ValueError:
    raise ValueError(f"--{flag}={','.join(grids[flag])}: every value must be a number.") from None
  return runs


def run_one(base, name, overrides, seed, out):
  from maxrec.train import train_and_evaluate

  workdir = os.path.join(out, "runs", name, f"seed{seed}")
  overrides = dict(overrides)
  source = overrides.pop("replay_of", None)
  if source is not None:  # [A9]: replay the meta run of the same seed
    overrides["replay_from"] = os.path.join(out, "runs", source, f"seed{seed}")
    if not os.path.exists(os.path.join(overrides["replay_from"], "final_metrics.json")):
      raise ValueError(
        f"{name} replays {source} seed {seed}, which has not finished: list {source} "
        f"before {name} in --methods."
      )
  done = os.path.join(workdir, "final_metrics.json")
  if os.path.exists(done):
    logging.info("skip %s seed %d (done)", name, seed)
    with open(done) as f:
      return json.load(f), workdir
  resume = os.path.exists(os.path.join(workdir, "config.json"))  # interrupted earlier
  logging.info("%s %s seed %d -> %s", "resume" if resume else "run", name, seed, workdir)
  config = base.replace(**overrides, seed=seed)
  return train_and_evaluate(config, workdir, resume=resume), workdir


def mean_std(values) -> str:
  """'mean ± sample std' over seeds, or the single value with one seed."""
  v = np.asarray(values, float)
  return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v[0]:.4f} (1 seed)"


def summarise(rows, families, select):
  """Per family: the selected grid run (best mean validation `select`) and its rows."""
  out = {}
  for method, runs in families.items():
    best = max(runs, key=lambda run: np.mean([r["valid"][select] for r in rows if r["run"] == run]))
    out[method] = (best, [r for r in rows if r["run"] == best])
  return out


def improvement(summary, method, metric) -> str:
  """Relative change of `method`'s mean test metric over the best baseline of its backbone
  (backbone alone, fixed or uncertainty weighting), as the paper reports gains."""
  spec = METHODS[method]
  if spec["weighting"] in BASELINE_WEIGHTINGS:
    return ""
  base = [
    np.mean([r["test"][metric] for r in runs])
    for m, (_, runs) in summary.items()
    if METHODS[m]["weighting"] in BASELINE_WEIGHTINGS and METHODS[m]["model"] == spec["model"]
  ]
  if not base:
    return ""
  ours = np.mean([r["test"][metric] for r in summary[method][1]])
  return f"{100 * (ours / max(base) - 1):+.1f}%"


def _portable(arg: str) -> str:
  """A `--flag=/absolute/path` inside the working directory, as a relative path (the
  command written to results.md is one a reader can type in a clone)."""
  name, sep, value = arg.partition("=")
  here = os.getcwd()
  if sep and os.path.isabs(value) and os.path.commonpath([here, value]) == here:
    return f"{name}={os.path.relpath(value)}"
  return arg


def write_tables(rows, families, report, select, out, command):
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(
      ["method", "run", "seed", "best_epoch", "epochs_run", "wall_s"]
      + [f"valid_{m}" for m in report]
      + [f"test_{m}" for m in report]
      + ["aux_weights"]
    )
    for r in rows:
      w.writerow(
        [r["method"], r["run"], r["seed"], r["best_epoch"], r["epochs_run"], f"{r['wall_s']:.1f}"]
        + [f"{r['valid'][m]:.5f}" for m in report]
        + [f"{r['test'][m]:.5f}" for m in report]
        + [json.dumps(r.get("aux_weights", {}))]
      )
  summary = summarise(rows, families, select)
  head = report[0]
  lines = [
    f"Command: `{command}`",
    "",
    f"Mean ± std over seeds of the test metrics at the best validation epoch. Grid "
    f"families are reduced to the value with the best mean validation {select}. "
    f"'vs best baseline' is the relative change of mean test {head} over the best of the "
    "backbone alone, fixed and uncertainty weighting on the same backbone.",
    "",
    "| method | selected | "
    + " | ".join(f"test {m}" for m in report)
    + f" | vs best baseline | valid {select} | best epoch | wall s |",
    "|---" * (6 + len(report)) + "|",
  ]
  for method, (best, sel) in summary.items():
    lines.append(
      f"| {method} | {best.split('@')[1] if '@' in best else ''} | "
      + " | ".join(mean_std([r["test"][m] for r in sel]) for m in report)
      + f" | {improvement(summary, method, head)} | {mean_std([r['valid'][select] for r in sel])}"
      + f" | {np.mean([r['best_epoch'] for r in sel]):.0f} | {np.mean([r['wall_s'] for r in sel]):.0f} |"
    )
  grid_runs = [run for runs in families.values() if len(runs) > 1 for run in runs]
  if grid_runs:
    lines += ["", "Every grid value:", ""]
    lines.append("| run | " + " | ".join(f"test {m}" for m in report) + f" | valid {select} |")
    lines.append("|---" * (2 + len(report)) + "|")
    for run in grid_runs:
      sel = [r for r in rows if r["run"] == run]
      lines.append(
        f"| {run} | "
        + " | ".join(mean_std([r["test"][m] for r in sel]) for m in report)
        + f" | {mean_std([r['valid'][select] for r in sel])} |"
      )
  learned = [
    (m, sel)
    for m, (_, sel) in summary.items()
    if sel and sel[0].get("aux_weights") and METHODS[m]["weighting"] != "fixed"
  ]
  if learned:
    lines += ["", "Learned weights at the selected epoch (mean over seeds):", ""]
    for method, sel in learned:
      tasks = sel[0]["aux_weights"]
      lines.append(
        f"- {method}: "
        + ", ".join(f"{t} {np.mean([r['aux_weights'][t] for r in sel]):.4g}" for t in tasks)
      )
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  return text, summary


def write_plots(summary, out) -> list[str]:
  """Validation curves and weight trajectories of each family's selected run, first seed."""
  try:
    from experiments import plots
  except ImportError:
    return []
  runs = {m: sel[0]["workdir"] for m, (_, sel) in summary.items() if sel}
  try:
    paths = [plots.plot_validation(runs, os.path.join(out, "validation.png"))]
  except ImportError as e:
    logging.warning("no plots: %s", e)
    return []
  weighted = {m: d for m, d in runs.items() if METHODS[m]["weighting"] != "none"}
  if weighted:
    paths.append(plots.plot_weights(weighted, os.path.join(out, "weights.png")))
  return paths


def main(argv):
  del argv
  fv = flags.FLAGS
  try:
    base = config_from_flags()
    grids = {flag: fv[flag].value for flag, _ in GRIDS.values()}
    plan = {m: expand(m, grids) for m in fv.methods}
    seeds = [int(s) for s in fv.seeds]
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  os.makedirs(fv.out, exist_ok=True)
  select = base.train.early_stop_metric
  report = list(dict.fromkeys([*fv.report, select]))
  rows, failed, t0 = [], [], time.perf_counter()
  for method, runs in plan.items():
    for name, overrides in runs:
      for seed in seeds:
        try:
          final, workdir = run_one(base, name, overrides, seed, fv.out)
        except (ValueError, FloatingPointError) as e:  # one run's failure ends only that run
          logging.error("%s seed %d failed: %s", name, seed, e)
          failed.append(f"{name} seed {seed}: {e}")
          continue
        rows.append(dict(method=method, run=name, seed=seed, workdir=workdir, **final))
  if not rows:
    print("error: every run failed:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1
  plan = {
    m: [(n, o) for n, o in runs if any(r["run"] == n for r in rows)] for m, runs in plan.items()
  }
  plan = {m: runs for m, runs in plan.items() if runs}
  families = {m: [name for name, _ in runs] for m, runs in plan.items()}
  command = "python -m experiments.compare " + " ".join(map(_portable, sys.argv[1:]))
  text, summary = write_tables(rows, families, report, select, fv.out, command)
  print(text)
  for path in write_plots(summary, fv.out):
    print(f"plot: {path}")
  logging.info("compare finished in %.0f s", time.perf_counter() - t0)
  if failed:
    print(
      "error: some runs failed (rerun the same command to retry them):\n  " + "\n  ".join(failed),
      file=sys.stderr,
    )
    return 1
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
