"""Building blocks of the configuration groups: the choices, the dataclass field that
carries a flag's help text, and the checks that turn a bad value into a clear error."""

from __future__ import annotations

import dataclasses
from typing import Any

# Choices are module constants so that flags, validation and docs agree.
DATA_FORMATS = ("auto", "movielens", "lightgcn", "recbole", "csv")
SPLITS = ("auto", "random", "temporal", "loo", "presplit")
MODELS = ("mf", "lightgcn")
PROPAGATIONS = ("bcsr", "segment")
INITS = ("normal", "spectral")
LR_SCHEDULES = ("constant", "cosine")
WEIGHTINGS = ("none", "fixed", "uncertainty", "meta", "replay")
HYPERGRADS = ("cg", "neumann", "unrolled", "first_order")
META_LOSSES = ("bpr", "softmax")
META_DATA = ("heldout", "valid")
METRIC_NAMES = ("recall", "ndcg", "precision", "hit", "mrr")
SPARSE_KERNELS = ("auto", "native", "xla")


def field(default: Any, help: str, choices: tuple | None = None, flag: bool = True, **kw) -> Any:
  """A dataclass field carrying its flag help text (and choices) as metadata; `flag=False`
  keeps a field (a test hook) out of the command-line flags."""
  meta = {"help": help, "flag": flag}
  if choices is not None:
    meta["choices"] = choices
  if isinstance(default, (list, dict)):
    raise TypeError("use tuples for sequence defaults so configs stay hashable")
  return dataclasses.field(default=default, metadata=meta, **kw)


def check(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(msg)


def check_choice(name: str, value: Any, choices: tuple) -> None:
  check(value in choices, f"--{name}={value!r} is not one of {', '.join(map(str, choices))}.")


def check_declared_choices(group) -> None:
  """Every field that declares choices holds one of them (None stays allowed where the
  field is optional; a tuple's entries are checked one by one)."""
  for f in dataclasses.fields(group):
    if "choices" not in f.metadata:
      continue
    value = getattr(group, f.name)
    for v in value if isinstance(value, tuple) else (value,):
      if v is not None:
        check_choice(f.name, v, f.metadata["choices"])
