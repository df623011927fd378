"""Time to accuracy: validation Recall@20 / NDCG@20 against wall-clock seconds.

  python -m experiments.time_to_accuracy --data_path=../shared/datasets/gowalla \
      --recipes=lightgcn_published,lightgcn --out=results/tta_gowalla

Each recipe is one `python -m experiments.train` run in OUT/runs/<recipe>/, started in a
child process so that its peak memory is its own; a run that was interrupted resumes from
its checkpoint (its clock continues from the checkpoint's), and a finished one is read
back, so the comparison resumes where it stopped. The time axis is the run's own clock
(`elapsed_s` of metrics.jsonl): data loading, the graph, any spectral warm start,
compilation, training and every validation, not the interpreter's start-up.

Outputs: OUT/tta.json (per recipe: the command, the curve, the best validation Recall@20,
the time at which the run first reached 99% of its own best, and peak RSS), OUT/tta.md
and OUT/tta.png (one curve per recipe). Each recipe R is compared with its reference
(--reference; by default R_published when it is listed): what the reference had reached
within --reference_factor times R's t99.

Recipes (a config flag given with --set applies to all of them, after the recipe's own):
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import subprocess
import sys
import time

from absl import app, flags

# A recipe: config flags for experiments.train, and what it is.
_PUBLISHED = dict(
  batch_size=2048,
  learning_rate=0.001,
  lr_schedule="constant",
  init="normal",
  init_std=0.1,
  eval_every=1,
)
_LONG = dict(epochs=1000, patience=1000)
_AUX = dict(weighting="fixed", aux_tasks="user_sgl,item_sgl")
RECIPES = {
  "lightgcn_published": dict(
    doc="LightGCN as published: batch 2048, Adam lr 1e-3, N(0, 0.1^2) init, 1000 epochs.",
    flags=dict(model="lightgcn", weighting="none", **_PUBLISHED, **_LONG),
  ),
  "lightgcn": dict(
    doc="LightGCN at MAXRec's defaults (--model=lightgcn --weighting=none).",
    flags=dict(model="lightgcn", weighting="none"),
  ),
  "lightgcn_aux_published": dict(
    doc="LightGCN + user_sgl, item_sgl at a fixed weight, published recipe.",
    flags=dict(model="lightgcn", **_AUX, **_PUBLISHED, **_LONG),
  ),
  "lightgcn_aux": dict(
    doc="LightGCN + user_sgl, item_sgl at a fixed weight, MAXRec's defaults.",
    flags=dict(model="lightgcn", **_AUX),
  ),
}
__doc__ = __doc__.rstrip() + "\n" + "\n".join(f"  {k:24s} {v['doc']}" for k, v in RECIPES.items())

flags.DEFINE_list("recipes", ["lightgcn_published", "lightgcn"], "Recipes to run, in order.")
flags.DEFINE_string("out", "results/tta", "Output folder (resumable).")
flags.DEFINE_string(
  "reference",
  "auto",
  "The recipe every other one is compared with; auto: each recipe R with R_published, "
  "when listed; empty: no comparison.",
)
flags.DEFINE_float("reference_factor", 10.0, "Compare with the reference at this x a run's t99.")
flags.DEFINE_float("fraction", 0.99, "t99 is when a run first reaches this share of its best.")
flags.DEFINE_multi_string(
  "set", [], "A config flag for every recipe, e.g. --set=data_path=../shared/datasets/gowalla."
)
flags.DEFINE_string("data_path", None, "The data set (shorthand for --set=data_path=...).")
flags.DEFINE_list(
  "budgets",
  [],
  "recipe=seconds pairs: that recipe's --time_budget_s (the published recipes run 1000 "
  "epochs otherwise), e.g. lightgcn_published=9000.",
)


def recipe_flags(name: str, common: dict, budget_s: float | None = None) -> list[str]:
  """The experiments.train flags of a recipe, the common ones last (they win)."""
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}.")
  merged = {**RECIPES[name]["flags"], **common}
  if budget_s is not None:
    merged["time_budget_s"] = f"{budget_s:g}"
  return [f"--{k}={v}" for k, v in merged.items()]


def curve(workdir: str) -> list[dict]:
  """(epoch, elapsed_s, recall@20, ndcg@20) of every validated epoch of a run."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  return [
    {
      "epoch": r["epoch"],
      "elapsed_s": r["elapsed_s"],
      "recall@20": r["valid"]["recall@20"],
      "ndcg@20": r["valid"]["ndcg@20"],
    }
    for r in recs
    if "valid" in r
  ]


def time_to_fraction(points: list[dict], fraction: float) -> dict:
  """The best validation Recall@20 and the first time a run reached `fraction` of it."""
  if not points:
    return {"best_recall@20": None, "t_best_s": None, "t99_s": None, "epoch99": None}
  best = max(points, key=lambda p: p["recall@20"])
  first = next(p for p in points if p["recall@20"] >= fraction * best["recall@20"])
  return {
    "best_recall@20": best["recall@20"],
    "best_ndcg@20": best["ndcg@20"],
    "best_epoch": best["epoch"],
    "t_best_s": best["elapsed_s"],
    "t99_s": first["elapsed_s"],
    "epoch99": first["epoch"],
  }


def value_at(points: list[dict], seconds: float) -> float | None:
  """The best validation Recall@20 a run had reached by `seconds` (None: not validated yet)."""
  seen = [p["recall@20"] for p in points if p["elapsed_s"] <= seconds]
  return max(seen) if seen else None


def run_recipe(name: str, common: dict, out: str, budget_s: float | None = None) -> dict:
  """Runs (or resumes, or reads back) one recipe; returns its record."""
  workdir = os.path.join(out, "runs", name)
  args = recipe_flags(name, common, budget_s) + [f"--workdir={workdir}"]
  command = "python -m experiments.train " + " ".join(shlex.quote(a) for a in args)
  record_path = os.path.join(workdir, "tta_record.json")
  done = os.path.exists(os.path.join(workdir, "final_metrics.json"))
  peak = None
  if os.path.exists(record_path):
    with open(record_path) as f:
      peak = json.load(f).get("peak_rss_mib")
  if not done:
    resume = ["--resume"] if os.path.exists(os.path.join(workdir, "config.json")) else []
    print(f"[{name}] {command}{' (resuming)' if resume else ''}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *args, *resume])
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
      raise RuntimeError(f"{name}: experiments.train exited with {code}; see its log above.")
    peak = max(peak or 0.0, usage.ru_maxrss / 1024)  # KiB on Linux
    os.makedirs(workdir, exist_ok=True)
    with open(record_path, "w") as f:
      json.dump({"peak_rss_mib": peak}, f)
  points = curve(workdir)
  return {
    "recipe": name,
    "doc": RECIPES[name]["doc"],
    "command": command,
    "peak_rss_mib": peak,
    "points": points,
  }


def summarise(records: list[dict], fraction: float, reference: str, factor: float) -> None:
  """Adds t99 and, against the reference, the comparison at `factor` x t99 (in place).
  `reference` "auto" compares each recipe R with R_published."""
  by_name = {r["recipe"]: r for r in records}
  for r in records:
    r.update(time_to_fraction(r["points"], fraction))
  for r in records:
    name = f"{r['recipe']}_published" if reference == "auto" else reference
    ref = by_name.get(name)
    if ref is None or r is ref or r["t99_s"] is None:
      continue
    horizon = factor * r["t99_s"]
    ref_points = ref["points"]
    r["reference"] = {
      "recipe": name,
      "horizon_s": horizon,
      "reference_recall@20": value_at(ref_points, horizon),
      "reference_ran_s": ref_points[-1]["elapsed_s"] if ref_points else 0.0,
      "covered": bool(ref_points) and ref_points[-1]["elapsed_s"] >= horizon,
    }


def write_table(records: list[dict], fraction: float, factor: float, path: str) -> str:
  pct = f"{100 * fraction:g}%"
  lines = [
    f"| recipe | best valid Recall@20 (NDCG@20) | epoch | t to {pct} of best | t of best | "
    f"its reference at {factor:g}x that t | peak RSS |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in records:
    if r["best_recall@20"] is None:
      lines.append(f"| {r['recipe']} | not validated yet | | | | | |")
      continue
    ref = r.get("reference")
    if ref is None:
      cmp = "–"
    elif ref["reference_recall@20"] is None:
      cmp = "not validated by then"
    else:
      cmp = f"{ref['recipe']}: {ref['reference_recall@20']:.4f}"
      if not ref["covered"]:
        cmp += f" (ran {ref['reference_ran_s'] / 60:.0f} of {ref['horizon_s'] / 60:.0f} min)"
    rss = "–" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:,.0f} MiB"
    lines.append(
      f"| {r['recipe']} | {r['best_recall@20']:.4f} ({r['best_ndcg@20']:.4f}) | "
      f"{r['best_epoch']} | {r['t99_s'] / 60:.1f} min (epoch {r['epoch99']}) | "
      f"{r['t_best_s'] / 60:.1f} min | {cmp} | {rss} |"
    )
  text = "\n".join(lines) + "\n"
  with open(path, "w") as f:
    f.write(text)
  return text


def plot(records: list[dict], path: str) -> str | None:
  """Recall@20 and NDCG@20 against minutes, one curve per recipe, t99 marked."""
  try:
    from experiments.plots import _colors, _pyplot

    plt = _pyplot()
  except ImportError:
    print("no plot: matplotlib is not installed (pip install -e '.[plots]')")
    return None
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for color, r in zip(_colors(len(records)), records):
    t = [p["elapsed_s"] / 60 for p in r["points"]]
    for ax, metric in zip(axes, ("recall@20", "ndcg@20")):
      ax.plot(t, [p[metric] for p in r["points"]], color=color, label=r["recipe"])
      if r.get("t99_s") is not None and metric == "recall@20":
        ax.axvline(r["t99_s"] / 60, color=color, linestyle=":", alpha=0.7)
  for ax, metric in zip(axes, ("recall@20", "ndcg@20")):
    ax.set_xscale("log")  # minutes for the fast recipes, hours for the published ones
    ax.set_xlabel("wall-clock minutes, log scale (evaluation included)")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  fv = flags.FLAGS
  common = {}
  for item in fv.set:
    key, sep, value = item.partition("=")
    if not sep:
      print(f"error: --set={item!r} must be field=value", file=sys.stderr)
      return 2
    common[key] = value
  if fv.data_path:
    common["data_path"] = fv.data_path
  budgets = {}
  for item in fv.budgets:
    key, sep, value = item.partition("=")
    try:
      budgets[key] = float(value)
    except ValueError:
      sep = ""
    if not sep or key not in fv.recipes:
      print(f"error: --budgets entry {item!r} must be <listed recipe>=<seconds>", file=sys.stderr)
      return 2
  unknown = [r for r in fv.recipes if r not in RECIPES]
  if unknown or (fv.reference not in ("", "auto") and fv.reference not in fv.recipes):
    bad = unknown or [fv.reference]
    print(
      f"error: unknown or unlisted recipe {bad[0]!r}; known: {', '.join(RECIPES)}.", file=sys.stderr
    )
    return 2
  os.makedirs(fv.out, exist_ok=True)
  t0 = time.perf_counter()
  records = [run_recipe(name, common, fv.out, budgets.get(name)) for name in fv.recipes]
  summarise(records, fv.fraction, fv.reference, fv.reference_factor)
  with open(os.path.join(fv.out, "tta.json"), "w") as f:
    json.dump({"recipes": records, "fraction": fv.fraction}, f, indent=1)
  print(write_table(records, fv.fraction, fv.reference_factor, os.path.join(fv.out, "tta.md")))
  png = plot(records, os.path.join(fv.out, "tta.png"))
  if png:
    print(png)
  print(
    f"({time.perf_counter() - t0:.0f}s; peak RSS of this driver "
    f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)"
  )
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
