"""[A9] Replaying a meta-learned weight trajectory on all training data.

A `--weighting=meta` run trains on R_in and keeps R_meta (10% of the training pairs) for
the hypergradient, so it sees less data than the baselines. [A9] retrains on R_in ∪ R_meta
with φ frozen, the weights following the trajectory that the meta run logged
(`meta.jsonl`). MAXRec replays it epoch by epoch: epoch e uses the weights in effect when
the meta run's epoch e began (the last meta step logged in an earlier epoch, or the initial
weights), and after the meta run's last logged step the final weights are held. Within an
epoch the meta run changed its weights at most every --meta_every steps, so the replay lags
it by less than one epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

# Fields of the data pipeline that must match for the replay to train on R_in ∪ R_meta of
# the same split (meta_ratio differs on purpose).
SPLIT_FIELDS = (
  "data_path", "data_format", "split", "split_ratios", "valid_ratio", "min_rating",
  "user_core", "item_core", "split_seed", "synth_users", "synth_items",
  "synth_interactions", "synth_clusters", "synth_seed",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Trajectory:
  """A meta run's weights over training.

  Attributes:
    tasks: task names, in the order of the weights.
    initial: [K] weights before the first meta step.
    epochs: [n] the (1-based) epoch of each logged meta step, non-decreasing.
    weights: [n, K] the weights after each logged meta step.
    source: the meta run's work directory.
  """

  tasks: tuple[str, ...]
  initial: np.ndarray
  epochs: np.ndarray
  weights: np.ndarray
  source: str

  def at_epoch(self, epoch: int) -> np.ndarray:
    """[K] weights for (1-based) `epoch`: those in effect when the meta run's epoch began."""
    n = int(np.searchsorted(self.epochs, epoch, side="left"))  # steps logged before it
    return self.initial if n == 0 else self.weights[n - 1]

  @property
  def last_epoch(self) -> int:
    return int(self.epochs[-1]) if len(self.epochs) else 0


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ValueError(
      f"--replay_from: {path} does not exist; give the work directory of a "
      "--weighting=meta run (train one with --weighting=meta --workdir=DIR)."
    ) from None


def load_trajectory(workdir: str, tasks: tuple[str, ...]) -> Trajectory:
  """Reads the weight trajectory of the meta run in `workdir` for `tasks`.

  Raises:
    ValueError: naming the file, when the run is missing, is not a scalar-weight meta run,
      used other tasks, or its `meta.jsonl` has a malformed line.
  """
  cfg = _read_json(os.path.join(workdir, "config.json"))
  if cfg.get("weighting") != "meta" or cfg.get("weight_net"):
    raise ValueError(
      f"--replay_from={workdir}: its config.json has --weighting={cfg.get('weighting')}"
      f"{' --weight_net' if cfg.get('weight_net') else ''}; replay needs a --weighting=meta "
      "run with scalar weights."
    )
  if tuple(cfg["aux_tasks"]) != tuple(tasks):
    raise ValueError(
      f"--replay_from={workdir} learned weights for --aux_tasks={','.join(cfg['aux_tasks'])}"
      f", but this run has --aux_tasks={','.join(tasks)}; use the same tasks."
    )
  init = np.broadcast_to(np.asarray(cfg["aux_weights"], np.float64), (len(tasks),)).copy()
  path = os.path.join(workdir, "meta.jsonl")
  epochs, weights = [], []
  if os.path.exists(path):
    with open(path) as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
          w = [float(rec["weights"][t]) for t in tasks]
          e = int(rec["epoch"])
        except (ValueError, KeyError, TypeError) as err:
          raise ValueError(
            f"{path}:{lineno}: not a meta-step record with 'epoch' and 'weights' of "
            f"{', '.join(tasks)} ({err}); was the file edited?"
          ) from None
        if epochs and e < epochs[-1]:
          raise ValueError(f"{path}:{lineno}: epoch {e} after epoch {epochs[-1]}.")
        epochs.append(e)
        weights.append(w)
  return Trajectory(
    tuple(tasks),
    init,
    np.asarray(epochs, np.int64),
    np.asarray(weights, np.float64).reshape(-1, len(tasks)),
    workdir,
  )


def split_mismatches(workdir: str, flat: dict) -> list[str]:
  """The data-split flags (and seed) in which this run differs from the meta run, whose
  R_in ∪ R_meta it should train on."""
  cfg = _read_json(os.path.join(workdir, "config.json"))
  out = []
  for name in (*SPLIT_FIELDS, "seed"):
    mine, theirs = flat.get(name), cfg.get(name)
    if isinstance(mine, tuple):
      mine = list(mine)
    if name in cfg and mine != theirs:
      out.append(f"--{name}={mine} (the meta run: {theirs})")
  return out
