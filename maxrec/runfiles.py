"""The files a run writes to its work directory, written atomically."""

from __future__ import annotations

import json
import os

import jax
import numpy as np


class RunFiles:
  """config.json, data_summary.json, metrics.jsonl, meta.jsonl and final_metrics.json."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    try:
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      raise ValueError(f"--workdir={workdir} is not writable: {e.strerror}.") from None
    self._logs = {}

  def write_json(self, name: str, obj) -> None:
    tmp = os.path.join(self.workdir, name + ".tmp")
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, os.path.join(self.workdir, name))

  def append(self, name: str, record: dict) -> None:
    """Appends one JSON line to `name` (e.g. metrics.jsonl), flushed at once."""
    if name not in self._logs:
      self._logs[name] = open(os.path.join(self.workdir, name), "w")
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
