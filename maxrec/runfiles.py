"""The files a run writes to its work directory, written atomically, and the log lines
that describe an epoch, a meta step and the final result."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np


class RunFiles:
  """config.json, data_summary.json, metrics.jsonl, meta.jsonl, final_metrics.json.

  On several processes (a multi-host run) only process 0 writes; the others read.

  Args:
    workdir: the run's folder (created).
    resume: continue the logs of an interrupted run instead of starting new ones.
  Raises:
    ValueError: the folder is not writable, or already holds a run and `resume` is off.
  """

  def __init__(self, workdir: str, resume: bool = False):
    self.workdir, self.resume = workdir, resume
    try:
      os.makedirs(workdir, exist_ok=True)
      probe = os.path.join(workdir, f".write_test{os.getpid()}")
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      raise ValueError(f"--workdir={workdir} is not writable: {e.strerror}.") from None
    if not resume and (self.exists("metrics.jsonl") or self.exists("checkpoints")):
      raise ValueError(
        f"--workdir={workdir} already holds a run; pass --resume to continue it, or choose "
        "another --workdir."
      )
    self._logs = {}
    self.writes = jax.process_index() == 0

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def exists(self, name: str) -> bool:
    return os.path.exists(self.path(name))

  def free_bytes(self) -> int:
    return shutil.disk_usage(self.workdir).free

  def read_json(self, name: str):
    with open(self.path(name)) as f:
      return json.load(f)

  def write_json(self, name: str, obj) -> None:
    if not self.writes:
      return
    tmp = self.path(name + ".tmp")
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, self.path(name))

  def truncate(self, name: str, last_epoch: int) -> None:
    """Keeps only the records of epochs <= last_epoch (what a checkpoint covers)."""
    if not self.writes or not self.exists(name):
      return
    with open(self.path(name)) as f:
      keep = [line for line in f if line.strip() and json.loads(line).get("epoch", 0) <= last_epoch]
    tmp = self.path(name + ".tmp")
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path(name))

  def append(self, name: str, record: dict) -> None:
    """Appends one JSON line to `name` (e.g. metrics.jsonl), flushed at once."""
    if not self.writes:
      return
    if name not in self._logs:
      self._logs[name] = open(self.path(name), "a" if self.resume else "w")
    self._logs[name].write(json.dumps(record, default=_json_default) + "\n")
    self._logs[name].flush()

  def close(self) -> None:
    for f in self._logs.values():
      f.close()
    self._logs = {}


def _fmt(d: dict, keys) -> str:
  return " ".join(f"{k}={d[k]:.4f}" for k in keys if k in d)


def format_epoch(record: dict, task_names: tuple[str, ...]) -> str:
  """The log line of one epoch's `metrics.jsonl` record."""
  msg = f"epoch {record['epoch']:3d} | {_fmt(record, ('loss', 'bpr', 'l2', *task_names))}"
  if task_names:
    msg += " | w " + " ".join(f"{k}={record['weight_' + k]:.3g}" for k in task_names)
  msg += f" | {record['epoch_s']:.2f}s ({record['interactions_per_s']:,.0f} interactions/s)"
  if "valid" in record:
    msg += f" | valid {_fmt(record['valid'], ('recall@20', 'ndcg@20'))}"
  return f"{msg} | elapsed {record['elapsed_s']:.1f}s"


def format_final(final: dict) -> str:
  """The log line of `final_metrics.json`."""
  weights = "".join(f" | w {k}={v:.3g}" for k, v in final.get("aux_weights", {}).items())
  return (
    f"best epoch {final['best_epoch']} | test {_fmt(final['test'], ('recall@20', 'ndcg@20'))}"
    f" | popularity {_fmt(final['popularity'], ('recall@20', 'ndcg@20'))}{weights}"
  )


def format_meta_step(r: dict, hypergrad: str, max_residual: float) -> str:
  """The log line of one meta step's `meta.jsonl` record (--hypergrad, --max_residual)."""
  msg = f"meta {r['meta_step']} (step {r['step']})"
  msg += "".join(f" w_{k}={v:.4g}" for k, v in r.get("weights", {}).items())
  if "hypergrad" in r:
    msg += " | hypergrad " + " ".join(f"{v:+.3g}" for v in r["hypergrad"].values())
  else:
    msg += f" | hypergrad norm {r['hypergrad_norm']:.3g}"
  if hypergrad == "cg":
    curvature = ", negative curvature" if r["negative_curvature"] else ""
    msg += f" | CG {r['num_steps']} steps, residual {r['relative_residual']:.2g}{curvature}"
  elif hypergrad == "neumann":
    msg += f" | Neumann {r['num_steps']} terms, residual {r['relative_residual']:.2g}"
  elif hypergrad == "unrolled":
    msg += f" | unrolled {r['num_steps']} steps"
  msg += f" | λ̂max {r['lambda_max']:.3g}"
  msg += f" | {r['meta_step_s']:.3f}s ({r['meta_over_inner']:.1f}x an inner step)"
  if r["skipped"]:
    if r.get("hypergrad_nonfinite"):
      why = "non-finite hypergradient"
    elif r.get("negative_curvature") and r.get("num_steps") == 0:
      why = "negative curvature before the first CG step"
    elif r.get("relative_residual", 0) > max_residual:
      why = f"relative residual above --max_residual={max_residual:g}"
    else:
      why = "non-finite solve"
    msg += f" | SKIPPED ({why})"
  return msg


def _json_default(x):
  if isinstance(x, (np.generic, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")
