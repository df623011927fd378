"""Frozen, validated configuration: the only configuration MAXRec reads.

Every experiment flag in `experiments/` is generated from these dataclasses: a flag's
name is the field's name and its default is the field's default, so each default has
exactly one home. Leaf field names are therefore unique across the groups.

The groups live in `maxrec.config.groups` (data, model, train) and
`maxrec.config.learning` (aux, meta); `Config` composes them and resolves the defaults
that depend on more than one group.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from maxrec.config.fields import check
from maxrec.config.groups import DataConfig, ModelConfig, TrainConfig
from maxrec.config.learning import AuxConfig, MetaConfig

__all__ = ["AuxConfig", "Config", "DataConfig", "MetaConfig", "ModelConfig", "TrainConfig"]


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs. Build it with `Config.from_flat(**overrides)`."""

  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  aux: AuxConfig = dataclasses.field(default_factory=AuxConfig)
  meta: MetaConfig = dataclasses.field(default_factory=MetaConfig)

  def __post_init__(self):
    heldout = self.meta.meta_data == "heldout"
    check(
      not (self.aux.weighting == "meta" and heldout and self.data.meta_ratio == 0),
      "--weighting=meta needs a meta split: --meta_ratio must be > 0 (empty means 0.1), "
      "or --meta_data=valid.",
    )
    check(
      heldout or self.aux.weighting != "meta" or not self.data.meta_ratio,
      f"--meta_ratio={self.data.meta_ratio} carves R_meta for --meta_data=heldout; with "
      "--meta_data=valid the meta loss reads the validation pairs: leave --meta_ratio empty.",
    )
    check(
      not (self.aux.weighting == "uncertainty" and self.train.optimizer == "sgd"),
      "--weighting=uncertainty learns its log-variances with Adam at --learning_rate: "
      "use --optimizer=adam.",
    )
    check(
      self.train.sparse_kernel != "native" or self.sparse_mf,
      "--sparse_kernel=native is the row-sparse MF step: it needs --model=mf, "
      "--weighting=none and --sparse_updates (use auto or xla otherwise).",
    )

    check(
      self.lr_schedule == "constant" or not self.sparse_mf,
      f"--lr_schedule={self.lr_schedule}: the row-sparse MF step has a constant "
      "learning rate; add --nosparse_updates for a schedule.",
    )

  @property
  def sparse_mf(self) -> bool:
    """MF without auxiliary tasks has a row-sparse gradient: with --sparse_updates it is
    trained on the touched rows only (`maxrec.sparse`)."""
    return self.train.sparse_updates and self.model.model == "mf" and not self.aux.tasks

  # LightGCN's fast recipe (RESULTS.md, "Time to accuracy"): every step propagates the
  # whole graph, so a step costs nearly the same at any batch size; large batches with a
  # scaled learning rate reach the published recipe's accuracy in a fraction of the time.
  def batch_size_for(self, n_train: int) -> int:
    """--batch_size, else 2048 for MF and, for LightGCN, about a tenth of the `n_train`
    training pairs (ten steps an epoch) in whole 1024s, within [2048, 65536]."""
    if self.train.batch_size is not None:
      return self.train.batch_size
    if self.model.model != "lightgcn":
      return 2048
    return int(min(65536, max(2048, 1024 * -(-n_train // 10240))))

  @property
  def learning_rate(self) -> float:
    """--learning_rate, else 5e-2 for LightGCN and 1e-3 for MF."""
    if self.train.learning_rate is not None:
      return self.train.learning_rate
    return 5e-2 if self.model.model == "lightgcn" else 1e-3

  @property
  def lr_schedule(self) -> str:
    """--lr_schedule, else cosine for LightGCN and constant for MF."""
    if self.train.lr_schedule is not None:
      return self.train.lr_schedule
    return "cosine" if self.model.model == "lightgcn" else "constant"

  @property
  def eval_every(self) -> int:
    """--eval_every, else 4 for LightGCN and 1 for MF."""
    if self.train.eval_every is not None:
      return self.train.eval_every
    return 4 if self.model.model == "lightgcn" else 1

  def validates_after(self, epoch: int) -> bool:
    """Whether epoch `epoch` (1-based) ends with a validation: every --eval_every epochs
    and after the last; with the default schedule also after each epoch before the first
    (on small data LightGCN's fast recipe can peak at epoch 2 and fall by epoch 4)."""
    if epoch % self.eval_every == 0 or epoch == self.epochs:
      return True
    return self.train.eval_every is None and epoch < self.eval_every

  @property
  def epochs(self) -> int:
    """--epochs, else 100, or 20 for LightGCN with auxiliary tasks."""
    if self.train.epochs is not None:
      return self.train.epochs
    return 20 if self.model.model == "lightgcn" and self.aux.tasks else 100

  def meta_every_for(self, steps_per_epoch: int) -> int:
    """--meta_every, else 50 for MF and 3 epochs of `steps_per_epoch` for LightGCN."""
    if self.meta.meta_every is not None:
      return self.meta.meta_every
    return 3 * steps_per_epoch if self.model.model == "lightgcn" else 50

  @property
  def meta_batch_size(self) -> int:
    """--meta_batch_size, else 1024 (softmax meta loss) or 4096 (BPR)."""
    if self.meta.meta_batch_size is not None:
      return self.meta.meta_batch_size
    return 1024 if self.meta.meta_loss == "softmax" else 4096

  @property
  def meta_ratio(self) -> float:
    """[A1] The meta split's share: the flag, else 0.1 with --weighting=meta and
    --meta_data=heldout, else 0."""
    if self.data.meta_ratio is not None:
      return self.data.meta_ratio
    return 0.1 if self.aux.weighting == "meta" and self.meta.meta_data == "heldout" else 0.0

  @property
  def view_layers(self) -> int:
    """[A2] L_v: the explicit flag, else L for LightGCN and 1 for MF."""
    if self.aux.view_layers is not None:
      return self.aux.view_layers
    return self.model.num_layers if self.model.model == "lightgcn" else 1

  @classmethod
  def groups(cls) -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(cls)}

  @classmethod
  def from_flat(cls, **values: Any) -> Config:
    """Builds a config from leaf field names, e.g. `Config.from_flat(epochs=3)`.

    Raises:
      ValueError: for an unknown field name or an invalid value.
    """
    groups = cls.groups()
    owner = {f.name: g for g, k in groups.items() for f in dataclasses.fields(k)}
    unknown = sorted(set(values) - set(owner))
    if unknown:
      raise ValueError(f"Unknown config field(s): {', '.join(unknown)}.")
    parts = {g: {} for g in groups}
    for name, value in values.items():
      parts[owner[name]][name] = value
    return cls(**{g: groups[g](**parts[g]) for g in groups})

  def flat(self) -> dict[str, Any]:
    """The leaf fields as one dict (what `config.json` holds)."""
    out = {}
    for g in self.groups():
      out.update(dataclasses.asdict(getattr(self, g)))
    return out

  def replace(self, **values: Any) -> Config:
    """A copy with some leaf fields changed (validated again)."""
    return Config.from_flat(**{**self.flat(), **values})
