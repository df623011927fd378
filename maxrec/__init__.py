"""MAXRec: meta auxiliary learning for top-K recommendation, in JAX.

Reimplements X. Li, C. Ma et al., "Meta Auxiliary Learning for Top-K Recommendation",
IEEE TKDE 35(10), 2023; the equations it follows are in the repository's docs/method.md (its
section, oracle and [A#] labels appear in the code).
"""

from maxrec.config import Config, DataConfig, ModelConfig, TrainConfig
from maxrec.data import Dataset, load_dataset
from maxrec.metrics import build_eval_set, evaluate
from maxrec.readers import DataError, read_interactions
from maxrec.train import train_and_evaluate

__version__ = "0.1.0"

__all__ = [
  "Config",
  "DataConfig",
  "DataError",
  "Dataset",
  "ModelConfig",
  "TrainConfig",
  "build_eval_set",
  "evaluate",
  "load_dataset",
  "read_interactions",
  "train_and_evaluate",
]
