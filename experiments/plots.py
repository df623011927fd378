"""Plots of runs (the `plots` extra, matplotlib): validation curves, weight trajectories.

  python -m experiments.plots --runs=label=runs/a,label2=runs/b --out=plots/

Library use: `plot_validation({label: workdir}, path)` and `plot_weights({label: workdir},
path)`; both read the files a run writes (metrics.jsonl, meta.jsonl) and save one PNG.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags


def _pyplot():
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise ImportError("plots need matplotlib: pip install -e '.[plots]'") from None
  return plt


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _colors(n: int) -> list:
  """One distinct colour per run (tab10, then tab20 for more than 10 runs)."""
  import matplotlib

  cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]


def _legend_outside(ax, fig) -> None:
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
  fig.tight_layout()


def plot_validation(runs: dict[str, str], path: str, metric: str = "recall@20") -> str:
  """Validation `metric` per epoch of each run; returns the PNG path."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8.4, 4.2))
  for color, (label, workdir) in zip(_colors(len(runs)), runs.items()):
    recs = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "valid" in r]
    ax.plot(
      [r["epoch"] for r in recs], [r["valid"][metric] for r in recs], label=label, color=color
    )
  ax.set_xlabel("epoch")
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.set_ylabel(f"validation {metric}")
  ax.grid(alpha=0.3)
  _legend_outside(ax, fig)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_weights(runs: dict[str, str], path: str) -> str:
  """Auxiliary weights against the inner step, one colour per run and one line style per
  task: meta steps (meta.jsonl) as lines, else per-epoch means (metrics.jsonl) dotted."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8.4, 4.2))
  styles = ("-", "--", "-.", ":")
  for color, (label, workdir) in zip(_colors(len(runs)), runs.items()):
    meta = read_jsonl(os.path.join(workdir, "meta.jsonl"))
    if meta and "weights" in meta[0]:
      for k, task in enumerate(meta[0]["weights"]):
        marker = "." if len(meta) < 30 else None
        steps, weights = [r["step"] for r in meta], [r["weights"][task] for r in meta]
        ax.plot(steps, weights, styles[k % 4], marker=marker, color=color, label=f"{label}: {task}")
      continue
    recs = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    tasks = [k[len("weight_") :] for k in (recs[0] if recs else {}) if k.startswith("weight_")]
    steps = [r["step"] for r in recs]
    for k, task in enumerate(tasks):
      ax.plot(
        steps,
        [r[f"weight_{task}"] for r in recs],
        styles[k % 4],
        color=color,
        alpha=0.6,
        linewidth=2.5,
        label=f"{label}: {task} (epoch mean)",
      )
  ax.set_xlabel("inner step")
  ax.set_ylabel("auxiliary weight")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  _legend_outside(ax, fig)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv):
  del argv
  fv = flags.FLAGS
  runs = {}
  for item in fv.runs:
    label, sep, workdir = item.partition("=")
    if not sep or not os.path.isdir(workdir):
      print(f"error: --runs entry {item!r} must be label=existing_workdir", file=sys.stderr)
      return 2
    runs[label] = workdir
  os.makedirs(fv.out, exist_ok=True)
  print(plot_validation(runs, os.path.join(fv.out, "validation.png"), fv.metric))
  print(plot_weights(runs, os.path.join(fv.out, "weights.png")))
  return 0


if __name__ == "__main__":
  # Flags are defined here, not at import, so that other scripts can import the plots.
  flags.DEFINE_list("runs", [], "label=workdir pairs to plot.")
  flags.DEFINE_string("out", "plots", "Output folder for the PNG files.")
  flags.DEFINE_string("metric", "recall@20", "Validation metric to plot.")
  app.run(lambda argv: sys.exit(main(argv)))
