"""The saved models of a comparison's runs that share one data split.

`experiments.compare` keeps each run in OUT/runs/<run>/seed<k>/. The analysis scripts
(`meta_objectives`, `buckets`) score those runs' saved models on the split they were
trained on; this module finds them.
"""

from __future__ import annotations

import glob
import json
import os


def _split_seed(cfg: dict) -> int:
  """The seed that drew a run's split: --split_seed, else --seed."""
  return cfg["seed"] if cfg.get("split_seed") is None else cfg["split_seed"]


def runs_on_split(folder: str, config, ds) -> list[tuple[str, str, object]]:
  """(name "<run>/seed<k>", directory, `recommend.SavedModel`) of every finished run under
  `folder`/runs/ that was trained on the split of `config` (a `Config`) and on all of
  its training pairs (a --meta_data=heldout meta run trained on R_in only is left out).

  Raises:
    ValueError: when no run has finished, or a run's tables do not fit `ds`.
  """
  from maxrec import recommend

  dirs = sorted(glob.glob(os.path.join(folder, "runs", "*", "seed*")))
  dirs = [d for d in dirs if os.path.exists(os.path.join(d, "final_metrics.json"))]
  if not dirs:
    raise ValueError(f"no finished run under {folder}/runs/*/seed*/")
  seed = config.train.seed if config.data.split_seed is None else config.data.split_seed
  out = []
  for d in dirs:
    with open(os.path.join(d, "config.json")) as f:
      cfg = json.load(f)
    if cfg.get("meta_data", "heldout") == "heldout" and cfg.get("weighting") == "meta":
      continue
    if _split_seed(cfg) != seed:
      continue
    model = recommend.load_model(d)
    if model.user_emb.shape[0] != ds.n_users or model.item_emb.shape[0] != ds.n_items:
      raise ValueError(f"{d} was trained on another data set or split")
    out.append((os.path.relpath(d, os.path.join(folder, "runs")), d, model))
  return out
