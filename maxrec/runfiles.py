"""The files a run writes to its work directory, written atomically."""

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


def _json_default(x):
  if isinstance(x, (np.generic, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")
