"""The configuration of the data, the backbone and its training (docs/method.md §2.1–2.2,
§3.2, §5): one frozen dataclass per flag group."""

from __future__ import annotations

import dataclasses
import math

from maxrec.config.fields import (
  DATA_FORMATS,
  INITS,
  LR_SCHEDULES,
  METRIC_NAMES,
  MODELS,
  PROPAGATIONS,
  SPARSE_KERNELS,
  SPLITS,
  check,
  check_choice,
  check_declared_choices,
  field,
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the interactions come from and how they are split (docs/method.md §2.1, §5.1)."""

  data_path: str | None = field(
    None, "A data file or folder. Empty: the built-in synthetic data set (no download)."
  )
  data_format: str = field(
    "auto", "Input format; 'auto' detects it from the file or folder name.", DATA_FORMATS
  )
  split: str = field(
    "auto",
    "Per-user split: random by ratio, temporal by timestamp, leave-one-out, or presplit "
    "(LightGCN train/test files). 'auto': presplit for the LightGCN format, else random.",
    SPLITS,
  )
  split_ratios: tuple[float, ...] = field(
    (0.8, 0.1, 0.1), "Train/valid/test ratios per user for the random and temporal splits."
  )
  valid_ratio: float = field(
    0.1, "Share of each user's training items carved into validation (presplit)."
  )
  min_rating: float | None = field(
    None, "Keep only ratings >= this as positives. Empty: every interaction is a positive."
  )
  user_core: int = field(
    0, "k-core filtering: drop users with fewer interactions (iterated with item_core)."
  )
  item_core: int = field(
    0, "k-core filtering: drop items with fewer interactions (iterated with user_core)."
  )
  meta_ratio: float | None = field(
    None,
    "[A1] Share of each user's training items moved to the meta split R_meta, which the "
    "inner problem never sees. Empty: 0.1 with --weighting=meta, else no meta split.",
  )
  meta_min_interactions: int = field(
    5, "[A1] Users with fewer training items keep them all in R_in."
  )
  split_seed: int | None = field(None, "Seed of the split. Empty: use --seed.")
  user_column: str = field("user_id", "CSV/TSV: the user id column.")
  item_column: str = field("item_id", "CSV/TSV: the item id column.")
  rating_column: str | None = field(None, "CSV/TSV: the rating column (optional).")
  timestamp_column: str | None = field(None, "CSV/TSV: the timestamp column (optional).")
  delimiter: str | None = field(None, "CSV/TSV delimiter. Empty: ',' for .csv, tab otherwise.")
  synth_users: int = field(2000, "Built-in data set: number of users.")
  synth_items: int = field(3000, "Built-in data set: number of items.")
  synth_interactions: int = field(100_000, "Built-in data set: number of interactions.")
  synth_clusters: int = field(8, "Built-in data set: number of latent taste clusters.")
  synth_seed: int = field(0, "Built-in data set: generator seed.")

  def __post_init__(self):
    check_declared_choices(self)
    check_choice("data_format", self.data_format, DATA_FORMATS)
    check_choice("split", self.split, SPLITS)
    r = self.split_ratios
    check(
      len(r) == 3 and all(x >= 0 for x in r),
      f"--split_ratios={','.join(map(str, r))} must be three non-negative numbers "
      "(train, valid, test), e.g. 0.8,0.1,0.1.",
    )
    check(
      math.isclose(sum(r), 1.0, abs_tol=1e-6),
      f"--split_ratios={','.join(map(str, r))} sums to {sum(r):g}, not 1; e.g. use 0.8,0.1,0.1.",
    )
    check(r[0] > 0, "--split_ratios: the train ratio must be positive.")
    check(0 <= self.valid_ratio < 1, f"--valid_ratio={self.valid_ratio} must be in [0, 1).")
    check(
      self.meta_ratio is None or 0 <= self.meta_ratio < 1,
      f"--meta_ratio={self.meta_ratio} must be in [0, 1).",
    )
    check(self.meta_min_interactions >= 1, "--meta_min_interactions must be >= 1.")
    check(self.user_core >= 0 and self.item_core >= 0, "--user_core/--item_core must be >= 0.")
    for name in ("synth_users", "synth_items", "synth_interactions", "synth_clusters"):
      check(getattr(self, name) >= 1, f"--{name}={getattr(self, name)} must be >= 1.")
    per_user_max = max(5, self.synth_items // 4)  # the generator's cap per user
    check(
      5 * self.synth_users <= self.synth_interactions <= per_user_max * self.synth_users,
      f"--synth_interactions={self.synth_interactions} must be between 5 and "
      f"max(5, synth_items/4) = {per_user_max} per user, i.e. in "
      f"[{5 * self.synth_users}, {per_user_max * self.synth_users}] for "
      f"{self.synth_users} users.",
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The backbone (docs/method.md §2.2)."""

  model: str = field("mf", "Backbone: matrix factorisation or LightGCN.", MODELS)
  embedding_dim: int = field(64, "Embedding dimension d.")
  num_layers: int = field(3, "LightGCN propagation layers L.")
  init_std: float | None = field(
    None,
    "Embeddings start N(0, init_std^2). Empty: 0.1 for LightGCN (LightGCN-PyTorch) and "
    "0.02 for MF, the values that won on ML-100K validation (BUILD_NOTES.md).",
  )
  init: str | None = field(
    None,
    "Initial ego embeddings: normal (N(0, init_std^2)) or spectral (the leading singular "
    "vectors of the normalised interaction matrix, scaled to an RMS of init_std: a warm "
    "start, maxrec/spectral.py). Empty: normal for MF, spectral for LightGCN.",
    ("normal", "spectral"),
  )
  propagation: str = field(
    "bcsr",
    "Kernel of the graph product: 'bcsr' (JAX's CSR kernel, fastest) or 'segment' "
    "(gather + segment_sum, needed under sharding).",
    PROPAGATIONS,
  )

  def __post_init__(self):
    check_declared_choices(self)
    check_choice("model", self.model, MODELS)
    check_choice("propagation", self.propagation, PROPAGATIONS)
    if self.init is not None:
      check_choice("init", self.init, INITS)
    check(self.embedding_dim >= 1, f"--embedding_dim={self.embedding_dim} must be >= 1.")
    check(self.num_layers >= 0, f"--num_layers={self.num_layers} must be >= 0.")
    check(self.init_std is None or self.init_std > 0, f"--init_std={self.init_std} must be > 0.")

  @property
  def resolved_init_std(self) -> float:
    if self.init_std is not None:
      return self.init_std
    return 0.1 if self.model == "lightgcn" else 0.02

  @property
  def resolved_init(self) -> str:
    if self.init is not None:
      return self.init
    return "spectral" if self.model == "lightgcn" else "normal"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Inner optimisation, evaluation and early stopping (docs/method.md §3.2, §5.2)."""

  epochs: int | None = field(
    None,
    "Maximum number of epochs (a cosine schedule ends at the last). Empty: 100, or 20 "
    "for LightGCN with auxiliary tasks, which converge five times sooner (RESULTS.md).",
  )
  batch_size: int | None = field(
    None,
    "BPR triples per step. Empty: 2048 for MF (docs/method.md); for LightGCN a tenth of the "
    "training pairs, in [2048, 65536] (its fast recipe: a step propagates the whole graph "
    "whatever the batch, RESULTS.md).",
  )
  learning_rate: float | None = field(
    None,
    "Learning rate of the embeddings' --optimizer. Empty: 1e-3 for MF, 5e-2 for LightGCN "
    "(with its larger batch and cosine schedule).",
  )
  lr_schedule: str | None = field(
    None,
    "Learning rate over the run: constant, or cosine (from --learning_rate down to 1% of "
    "it at the end of --epochs; a run cut short by early stopping stops higher). Empty: "
    "constant for MF, cosine for LightGCN.",
    LR_SCHEDULES,
  )
  optimizer: str = field(
    "adam",
    "Inner optimizer of the embeddings: adam (docs/method.md's) or sgd (plain SGD, the update "
    "rule of implicit's BPR, and the fastest MF path; the BPR loss is a batch mean, so SGD "
    "needs a far larger --learning_rate, e.g. 20 at batch 2048).",
    ("adam", "sgd"),
  )
  l2_reg: float = field(1e-4, "lambda of the L2 term on the batch's ego embeddings.")
  seed: int = field(
    0, "Seed of initialisation and sampling (and of the split unless --split_seed)."
  )
  eval_every: int | None = field(
    None,
    "Validate every this many epochs. Empty: 1 for MF; 4 for LightGCN (at batch 65536 a "
    "Gowalla-size validation costs about a third of an epoch), and after each of the first "
    "3 epochs (on small data its fast recipe can peak by epoch 2).",
  )
  patience: int = field(
    10,
    "Early stopping: validations without improvement before stopping, counted only once "
    "the model's best validation score beats popularity's (it has started to learn).",
  )
  time_budget_s: float = field(
    0.0,
    "Stop after the first epoch that ends more than this many seconds into the run "
    "(resumed time included; 0: no limit). The best validated epoch is then tested.",
  )
  early_stop_metric: str = field(
    "recall@20", "Validation metric for model selection, e.g. ndcg@20."
  )
  topk: tuple[int, ...] = field((10, 20, 50), "Cut-offs K of the metrics.")
  sparse_updates: bool = field(
    True,
    "MF without auxiliary tasks: update only the rows a batch touches, with lazy Adam or "
    "SGD (maxrec/sparse.py); --nosparse_updates for the dense update.",
  )
  sparse_kernel: str = field(
    "auto",
    "Kernel of the row-sparse MF step: native (one fused C++ call, maxrec/bpr_step.cc, "
    "built on first use; one CPU device only), xla (XLA ops), or auto: native on one CPU "
    "device when it builds, else xla. The two agree up to float rounding (and on which "
    "steps are skipped as non-finite).",
    SPARSE_KERNELS,
  )
  mesh_devices: int = field(
    0,
    "Devices of the data-parallel mesh: tables sharded by rows, batches split across them. "
    "0: every local device (one CPU here); 1: no sharding.",
  )
  checkpoint_every: int = field(1, "Write a checkpoint every this many epochs.")
  keep_checkpoints: int = field(2, "Checkpoints kept (the newest); older ones are deleted.")
  on_nonfinite: str = field(
    "skip",
    "A step with a non-finite loss or gradient is always skipped (its update dropped) and "
    "reported with its step; 'stop' also ends the run after that epoch, leaving the last "
    "good checkpoint in place.",
    ("skip", "stop"),
  )
  inject_nan_at_step: int = field(
    -1, "Test hook: make the loss NaN at this global step.", flag=False
  )
  eval_batch_size: int = field(
    1024, "Users scored per evaluation block: bounds memory to about 12 x this x items bytes."
  )

  def __post_init__(self):
    check_declared_choices(self)
    for name in (
      "epochs", "batch_size", "eval_every", "patience", "eval_batch_size", "checkpoint_every",
      "keep_checkpoints",
    ):  # fmt: skip
      value = getattr(self, name)
      check(value is None or value >= 1, f"--{name}={value} must be >= 1.")
    check(self.time_budget_s >= 0, f"--time_budget_s={self.time_budget_s} must be >= 0.")
    check(
      self.learning_rate is None or self.learning_rate > 0,
      f"--learning_rate={self.learning_rate} must be > 0.",
    )
    check(self.l2_reg >= 0, f"--l2_reg={self.l2_reg} must be >= 0.")
    check(len(self.topk) >= 1 and all(k >= 1 for k in self.topk), "--topk needs positive K.")
    check_choice("on_nonfinite", self.on_nonfinite, ("skip", "stop"))
    check_choice("optimizer", self.optimizer, ("adam", "sgd"))
    if self.lr_schedule is not None:
      check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
    check_choice("sparse_kernel", self.sparse_kernel, SPARSE_KERNELS)
    check(self.mesh_devices >= 0, f"--mesh_devices={self.mesh_devices} must be >= 0.")
    name, _, k = self.early_stop_metric.partition("@")
    check(
      name in METRIC_NAMES and k.isdigit() and int(k) in self.topk,
      f"--early_stop_metric={self.early_stop_metric!r} must be <metric>@<K> with metric in "
      f"{', '.join(METRIC_NAMES)} and K in --topk={','.join(map(str, self.topk))}.",
    )
