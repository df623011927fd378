"""Frozen, validated configuration: the only configuration MAXRec reads.

Every experiment flag in `experiments/` is generated from these dataclasses: a flag's
name is the field's name and its default is the field's default, so each default has
exactly one home. Leaf field names are therefore unique across the groups.
"""

from __future__ import annotations

import dataclasses
import math
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


def _f(default: Any, help: str, choices: tuple | None = None, flag: bool = True, **kw) -> Any:
  """A dataclass field carrying its flag help text (and choices) as metadata; `flag=False`
  keeps a field (a test hook) out of the command-line flags."""
  meta = {"help": help, "flag": flag}
  if choices is not None:
    meta["choices"] = choices
  if isinstance(default, (list, dict)):
    raise TypeError("use tuples for sequence defaults so configs stay hashable")
  return dataclasses.field(default=default, metadata=meta, **kw)


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(msg)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
  _check(value in choices, f"--{name}={value!r} is not one of {', '.join(map(str, choices))}.")


def _check_declared_choices(group) -> None:
  """Every field that declares choices holds one of them (None stays allowed where the
  field is optional; a tuple's entries are checked one by one)."""
  for f in dataclasses.fields(group):
    if "choices" not in f.metadata:
      continue
    value = getattr(group, f.name)
    for v in value if isinstance(value, tuple) else (value,):
      if v is not None:
        _check_choice(f.name, v, f.metadata["choices"])


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the interactions come from and how they are split (docs/method.md §2.1, §5.1)."""

  data_path: str | None = _f(
    None, "A data file or folder. Empty: the built-in synthetic data set (no download)."
  )
  data_format: str = _f(
    "auto", "Input format; 'auto' detects it from the file or folder name.", DATA_FORMATS
  )
  split: str = _f(
    "auto",
    "Per-user split: random by ratio, temporal by timestamp, leave-one-out, or presplit "
    "(LightGCN train/test files). 'auto': presplit for the LightGCN format, else random.",
    SPLITS,
  )
  split_ratios: tuple[float, ...] = _f(
    (0.8, 0.1, 0.1), "Train/valid/test ratios per user for the random and temporal splits."
  )
  valid_ratio: float = _f(
    0.1, "Share of each user's training items carved into validation (presplit)."
  )
  min_rating: float | None = _f(
    None, "Keep only ratings >= this as positives. Empty: every interaction is a positive."
  )
  user_core: int = _f(
    0, "k-core filtering: drop users with fewer interactions (iterated with item_core)."
  )
  item_core: int = _f(
    0, "k-core filtering: drop items with fewer interactions (iterated with user_core)."
  )
  meta_ratio: float | None = _f(
    None,
    "[A1] Share of each user's training items moved to the meta split R_meta, which the "
    "inner problem never sees. Empty: 0.1 with --weighting=meta, else no meta split.",
  )
  meta_min_interactions: int = _f(5, "[A1] Users with fewer training items keep them all in R_in.")
  split_seed: int | None = _f(None, "Seed of the split. Empty: use --seed.")
  user_column: str = _f("user_id", "CSV/TSV: the user id column.")
  item_column: str = _f("item_id", "CSV/TSV: the item id column.")
  rating_column: str | None = _f(None, "CSV/TSV: the rating column (optional).")
  timestamp_column: str | None = _f(None, "CSV/TSV: the timestamp column (optional).")
  delimiter: str | None = _f(None, "CSV/TSV delimiter. Empty: ',' for .csv, tab otherwise.")
  synth_users: int = _f(2000, "Built-in data set: number of users.")
  synth_items: int = _f(3000, "Built-in data set: number of items.")
  synth_interactions: int = _f(100_000, "Built-in data set: number of interactions.")
  synth_clusters: int = _f(8, "Built-in data set: number of latent taste clusters.")
  synth_seed: int = _f(0, "Built-in data set: generator seed.")

  def __post_init__(self):
    _check_declared_choices(self)
    _check_choice("data_format", self.data_format, DATA_FORMATS)
    _check_choice("split", self.split, SPLITS)
    r = self.split_ratios
    _check(
      len(r) == 3 and all(x >= 0 for x in r),
      f"--split_ratios={','.join(map(str, r))} must be three non-negative numbers "
      "(train, valid, test), e.g. 0.8,0.1,0.1.",
    )
    _check(
      math.isclose(sum(r), 1.0, abs_tol=1e-6),
      f"--split_ratios={','.join(map(str, r))} sums to {sum(r):g}, not 1; e.g. use 0.8,0.1,0.1.",
    )
    _check(r[0] > 0, "--split_ratios: the train ratio must be positive.")
    _check(0 <= self.valid_ratio < 1, f"--valid_ratio={self.valid_ratio} must be in [0, 1).")
    _check(
      self.meta_ratio is None or 0 <= self.meta_ratio < 1,
      f"--meta_ratio={self.meta_ratio} must be in [0, 1).",
    )
    _check(self.meta_min_interactions >= 1, "--meta_min_interactions must be >= 1.")
    _check(self.user_core >= 0 and self.item_core >= 0, "--user_core/--item_core must be >= 0.")
    for name in ("synth_users", "synth_items", "synth_interactions", "synth_clusters"):
      _check(getattr(self, name) >= 1, f"--{name}={getattr(self, name)} must be >= 1.")
    per_user_max = max(5, self.synth_items // 4)  # the generator's cap per user
    _check(
      5 * self.synth_users <= self.synth_interactions <= per_user_max * self.synth_users,
      f"--synth_interactions={self.synth_interactions} must be between 5 and "
      f"max(5, synth_items/4) = {per_user_max} per user, i.e. in "
      f"[{5 * self.synth_users}, {per_user_max * self.synth_users}] for "
      f"{self.synth_users} users.",
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The backbone (docs/method.md §2.2)."""

  model: str = _f("mf", "Backbone: matrix factorisation or LightGCN.", MODELS)
  embedding_dim: int = _f(64, "Embedding dimension d.")
  num_layers: int = _f(3, "LightGCN propagation layers L.")
  init_std: float | None = _f(
    None,
    "Embeddings start N(0, init_std^2). Empty: 0.1 for LightGCN (LightGCN-PyTorch) and "
    "0.02 for MF, the values that won on ML-100K validation (BUILD_NOTES.md).",
  )
  init: str | None = _f(
    None,
    "Initial ego embeddings: normal (N(0, init_std^2)) or spectral (the leading singular "
    "vectors of the normalised interaction matrix, scaled to an RMS of init_std: a warm "
    "start, maxrec/spectral.py). Empty: normal for MF, spectral for LightGCN.",
    ("normal", "spectral"),
  )
  propagation: str = _f(
    "bcsr",
    "Kernel of the graph product: 'bcsr' (JAX's CSR kernel, fastest) or 'segment' "
    "(gather + segment_sum, needed under sharding).",
    PROPAGATIONS,
  )

  def __post_init__(self):
    _check_declared_choices(self)
    _check_choice("model", self.model, MODELS)
    _check_choice("propagation", self.propagation, PROPAGATIONS)
    if self.init is not None:
      _check_choice("init", self.init, INITS)
    _check(self.embedding_dim >= 1, f"--embedding_dim={self.embedding_dim} must be >= 1.")
    _check(self.num_layers >= 0, f"--num_layers={self.num_layers} must be >= 0.")
    _check(self.init_std is None or self.init_std > 0, f"--init_std={self.init_std} must be > 0.")

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

  epochs: int | None = _f(
    None,
    "Maximum number of epochs (a cosine schedule ends at the last). Empty: 100, or 20 "
    "for LightGCN with auxiliary tasks, which converge five times sooner (RESULTS.md).",
  )
  batch_size: int | None = _f(
    None,
    "BPR triples per step. Empty: 2048 for MF (docs/method.md); for LightGCN a tenth of the "
    "training pairs, in [2048, 65536] (its fast recipe: a step propagates the whole graph "
    "whatever the batch, RESULTS.md).",
  )
  learning_rate: float | None = _f(
    None,
    "Learning rate of the embeddings' --optimizer. Empty: 1e-3 for MF, 5e-2 for LightGCN "
    "(with its larger batch and cosine schedule).",
  )
  lr_schedule: str | None = _f(
    None,
    "Learning rate over the run: constant, or cosine (from --learning_rate down to 1% of "
    "it at the end of --epochs; a run cut short by early stopping stops higher). Empty: "
    "constant for MF, cosine for LightGCN.",
    LR_SCHEDULES,
  )
  optimizer: str = _f(
    "adam",
    "Inner optimizer of the embeddings: adam (docs/method.md's) or sgd (plain SGD, the update "
    "rule of implicit's BPR, and the fastest MF path; the BPR loss is a batch mean, so SGD "
    "needs a far larger --learning_rate, e.g. 20 at batch 2048).",
    ("adam", "sgd"),
  )
  l2_reg: float = _f(1e-4, "lambda of the L2 term on the batch's ego embeddings.")
  seed: int = _f(0, "Seed of initialisation and sampling (and of the split unless --split_seed).")
  eval_every: int | None = _f(
    None,
    "Validate every this many epochs. Empty: 1 for MF; 4 for LightGCN (at batch 65536 a "
    "Gowalla-size validation costs about a third of an epoch), and after each of the first "
    "3 epochs (on small data its fast recipe can peak by epoch 2).",
  )
  patience: int = _f(
    10,
    "Early stopping: validations without improvement before stopping, counted only once "
    "the model's best validation score beats popularity's (it has started to learn).",
  )
  time_budget_s: float = _f(
    0.0,
    "Stop after the first epoch that ends more than this many seconds into the run "
    "(resumed time included; 0: no limit). The best validated epoch is then tested.",
  )
  early_stop_metric: str = _f("recall@20", "Validation metric for model selection, e.g. ndcg@20.")
  topk: tuple[int, ...] = _f((10, 20, 50), "Cut-offs K of the metrics.")
  sparse_updates: bool = _f(
    True,
    "MF without auxiliary tasks: update only the rows a batch touches, with lazy Adam or "
    "SGD (maxrec/sparse.py); --nosparse_updates for the dense update.",
  )
  sparse_kernel: str = _f(
    "auto",
    "Kernel of the row-sparse MF step: native (one fused C++ call, maxrec/bpr_step.cc, "
    "built on first use; one CPU device only), xla (XLA ops), or auto: native on one CPU "
    "device when it builds, else xla. The two agree up to float rounding (and on which "
    "steps are skipped as non-finite).",
    SPARSE_KERNELS,
  )
  mesh_devices: int = _f(
    0,
    "Devices of the data-parallel mesh: tables sharded by rows, batches split across them. "
    "0: every local device (one CPU here); 1: no sharding.",
  )
  checkpoint_every: int = _f(1, "Write a checkpoint every this many epochs.")
  keep_checkpoints: int = _f(2, "Checkpoints kept (the newest); older ones are deleted.")
  on_nonfinite: str = _f(
    "skip",
    "A step with a non-finite loss or gradient is always skipped (its update dropped) and "
    "reported with its step; 'stop' also ends the run after that epoch, leaving the last "
    "good checkpoint in place.",
    ("skip", "stop"),
  )
  inject_nan_at_step: int = _f(-1, "Test hook: make the loss NaN at this global step.", flag=False)
  eval_batch_size: int = _f(
    1024, "Users scored per evaluation block: bounds memory to about 12 x this x items bytes."
  )

  def __post_init__(self):
    _check_declared_choices(self)
    for name in (
      "epochs", "batch_size", "eval_every", "patience", "eval_batch_size", "checkpoint_every",
      "keep_checkpoints",
    ):  # fmt: skip
      value = getattr(self, name)
      _check(value is None or value >= 1, f"--{name}={value} must be >= 1.")
    _check(self.time_budget_s >= 0, f"--time_budget_s={self.time_budget_s} must be >= 0.")
    _check(
      self.learning_rate is None or self.learning_rate > 0,
      f"--learning_rate={self.learning_rate} must be > 0.",
    )
    _check(self.l2_reg >= 0, f"--l2_reg={self.l2_reg} must be >= 0.")
    _check(len(self.topk) >= 1 and all(k >= 1 for k in self.topk), "--topk needs positive K.")
    _check_choice("on_nonfinite", self.on_nonfinite, ("skip", "stop"))
    _check_choice("optimizer", self.optimizer, ("adam", "sgd"))
    if self.lr_schedule is not None:
      _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
    _check_choice("sparse_kernel", self.sparse_kernel, SPARSE_KERNELS)
    _check(self.mesh_devices >= 0, f"--mesh_devices={self.mesh_devices} must be >= 0.")
    name, _, k = self.early_stop_metric.partition("@")
    _check(
      name in METRIC_NAMES and k.isdigit() and int(k) in self.topk,
      f"--early_stop_metric={self.early_stop_metric!r} must be <metric>@<K> with metric in "
      f"{', '.join(METRIC_NAMES)} and K in --topk={','.join(map(str, self.topk))}.",
    )


@dataclasses.dataclass(frozen=True)
class AuxConfig:
  """The auxiliary tasks and how they are weighted (docs/method.md §2.4, §2.5)."""

  weighting: str = _f(
    "meta",
    "How auxiliary tasks are weighted: none (backbone alone), fixed (--aux_weights), "
    "uncertainty (learned log-variances, Kendall et al. 2018), meta (hypergradient) or "
    "replay (the weight trajectory of the --weighting=meta run in --replay_from, on all "
    "training data [A9]).",
    WEIGHTINGS,
  )
  aux_tasks: tuple[str, ...] = _f(
    ("user_sgl", "item_sgl"),
    "Auxiliary tasks by registered name: user_sgl, item_sgl, user_simgcl, item_simgcl, item_cooc.",
  )
  aux_weights: tuple[float, ...] = _f(
    (0.01,),
    "Fixed weights (or initial weights), one for all tasks or one per task. 0.01: where "
    "the tasks hurt (MovieLens, the built-in set) a start at 0.1 does its harm before "
    "the meta-learner can lower it; where they help it raises 0.01 tenfold in six meta "
    "steps (RESULTS.md).",
  )
  ssl_temperature: float = _f(0.2, "InfoNCE temperature τ.")
  ssl_anchors: int = _f(
    4096,
    "InfoNCE anchors per side: the distinct users and positive items of the first this "
    "many triples of each (shuffled) batch; the in-batch cost is quadratic in it. 0: the "
    "whole batch.",
  )
  edge_drop: float = _f(0.1, "Edge-dropout ratio ρ of the SGL views.")
  view_layers: int | None = _f(
    None, "Propagation layers of the views. Empty: L for LightGCN, 1 for MF [A2]."
  )
  simgcl_eps: float = _f(0.1, "SimGCL noise magnitude ε.")
  replay_from: str = _f(
    "",
    "[A9] With --weighting=replay: the work directory of a finished --weighting=meta run "
    "whose logged weights (meta.jsonl) are replayed epoch by epoch.",
  )

  def __post_init__(self):
    _check_declared_choices(self)
    _check_choice("weighting", self.weighting, WEIGHTINGS)
    _check(len(set(self.aux_tasks)) == len(self.aux_tasks), "--aux_tasks lists a task twice.")
    _check(
      self.weighting == "none" or len(self.aux_tasks) > 0,
      f"--weighting={self.weighting} needs at least one task in --aux_tasks.",
    )
    _check(
      len(self.aux_weights) in (1, len(self.aux_tasks)),
      f"--aux_weights has {len(self.aux_weights)} values; give 1 or one per task "
      f"({len(self.aux_tasks)}).",
    )
    _check(all(w > 0 for w in self.aux_weights), "--aux_weights must be positive.")
    _check(self.ssl_temperature > 0, f"--ssl_temperature={self.ssl_temperature} must be > 0.")
    _check(self.ssl_anchors >= 0, f"--ssl_anchors={self.ssl_anchors} must be >= 0.")
    _check(0 <= self.edge_drop < 1, f"--edge_drop={self.edge_drop} must be in [0, 1).")
    _check(self.view_layers is None or self.view_layers >= 0, "--view_layers must be >= 0.")
    _check(self.simgcl_eps >= 0, f"--simgcl_eps={self.simgcl_eps} must be >= 0.")
    _check(
      self.weighting != "replay" or bool(self.replay_from),
      "--weighting=replay needs --replay_from=<work directory of a --weighting=meta run>.",
    )

  @property
  def tasks(self) -> tuple[str, ...]:
    """The tasks in use: none with --weighting=none."""
    return () if self.weighting == "none" else self.aux_tasks

  @property
  def initial_weights(self) -> tuple[float, ...]:
    """One weight per task in use."""
    w = self.aux_weights
    return tuple(w * len(self.tasks) if len(w) == 1 else w)[: len(self.tasks)]


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """The outer loop of --weighting=meta (docs/method.md §3.1–3.2)."""

  hypergrad: str = _f(
    "cg",
    "Hypergradient: implicit with damped CG, implicit with a Neumann series, unrolled "
    "differentiation through --unroll_steps SGD steps, or first-order alignment.",
    HYPERGRADS,
  )
  cg_iters: int = _f(5, "CG iterations J (also the Neumann series' terms).")
  cg_tol: float = _f(1e-6, "CG stops early once the relative residual is below this.")
  damping_rel: float = _f(0.1, "[A7] Damping δ = damping_rel x λ̂_max.")
  power_iters: int = _f(5, "Power iterations for λ̂_max.")
  power_every: int = _f(10, "Refresh λ̂_max every this many meta steps.")
  meta_loss: str = _f(
    "softmax",
    "[A5] The primary loss the hypergradient descends: BPR with one uniform negative per "
    "held-out pair, or softmax cross-entropy of each held-out item against every item "
    "(the user's training items masked), which rewards what top-K ranking rewards.",
    META_LOSSES,
  )
  meta_data: str = _f(
    "valid",
    "[A1] The pairs of the meta loss: heldout (R_meta, --meta_ratio of each user's training "
    "items, never trained on) or valid (the validation pairs: the inner problem trains on "
    "every training pair, and validation tunes the weights as it selects the epoch).",
    META_DATA,
  )
  meta_every: int | None = _f(
    None,
    "N: one meta step every this many inner steps. Empty: 50 for MF; three epochs' steps "
    "for LightGCN, whose meta step costs 5-10 of its full-graph inner steps (keeps the "
    "meta-learning overhead near 20%).",
  )
  warmup_epochs: int = _f(1, "W: inner epochs before the first meta step.")
  meta_lr: float = _f(
    0.5,
    "Adam learning rate on φ. Adam's steps are about this size whatever the "
    "hypergradient's scale, and for small weights φ ≈ log w: each meta step can scale a "
    "weight by up to e^0.5 = 1.65, so a few dozen meta steps span 0.001 to 1.",
  )
  meta_clip: float = _f(10.0, "Global-norm clip of the hypergradient.")
  meta_batch_size: int | None = _f(
    None,
    "|B_m|: held-out pairs per meta step. Empty: 1024 with the softmax meta loss (each "
    "scored against every item), 4096 triples with BPR.",
  )
  hyper_batch_size: int = _f(2048, "|B_h|: inner triples defining the Hessian per meta step.")
  w_max: float = _f(10.0, "Upper bound on each learned weight.")
  unroll_steps: int = _f(5, "T: SGD steps differentiated through by --hypergrad=unrolled.")
  max_residual: float = _f(
    1.0,
    "A solve whose relative residual exceeds this (without a negative-curvature stop) "
    "counts as failed; its update is skipped.",
  )
  mixed_partial: str = _f(
    "auto",
    "How ∂²L_in/∂φ∂θ · v is taken: vjp (reverse-over-reverse), jvp (one forward pass per "
    "weight), or auto (jvp for <= 8 weights).",
    ("auto", "vjp", "jvp"),
  )
  weight_net: bool = _f(False, "[A6] Per-entity weights from a small MLP instead of scalars.")

  def __post_init__(self):
    _check_declared_choices(self)
    _check_choice("hypergrad", self.hypergrad, HYPERGRADS)
    _check_choice("meta_loss", self.meta_loss, META_LOSSES)
    _check_choice("meta_data", self.meta_data, META_DATA)
    _check(
      self.meta_batch_size is None or self.meta_batch_size >= 1,
      f"--meta_batch_size={self.meta_batch_size} must be >= 1.",
    )
    for name in ("power_iters", "power_every", "hyper_batch_size"):
      _check(getattr(self, name) >= 1, f"--{name}={getattr(self, name)} must be >= 1.")
    _check(
      self.meta_every is None or self.meta_every >= 1,
      f"--meta_every={self.meta_every} must be >= 1.",
    )
    _check(self.cg_iters >= 0, f"--cg_iters={self.cg_iters} must be >= 0.")
    _check(self.unroll_steps >= 1, f"--unroll_steps={self.unroll_steps} must be >= 1.")
    _check(self.warmup_epochs >= 0, f"--warmup_epochs={self.warmup_epochs} must be >= 0.")
    _check(self.damping_rel >= 0, f"--damping_rel={self.damping_rel} must be >= 0.")
    _check(self.meta_lr > 0 and self.meta_clip > 0, "--meta_lr and --meta_clip must be > 0.")
    _check(self.w_max > 0, f"--w_max={self.w_max} must be > 0.")


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
    _check(
      not (self.aux.weighting == "meta" and heldout and self.data.meta_ratio == 0),
      "--weighting=meta needs a meta split: --meta_ratio must be > 0 (empty means 0.1), "
      "or --meta_data=valid.",
    )
    _check(
      heldout or self.aux.weighting != "meta" or not self.data.meta_ratio,
      f"--meta_ratio={self.data.meta_ratio} carves R_meta for --meta_data=heldout; with "
      "--meta_data=valid the meta loss reads the validation pairs: leave --meta_ratio empty.",
    )
    _check(
      not (self.aux.weighting == "uncertainty" and self.train.optimizer == "sgd"),
      "--weighting=uncertainty learns its log-variances with Adam at --learning_rate: "
      "use --optimizer=adam.",
    )
    _check(
      self.train.sparse_kernel != "native" or self.sparse_mf,
      "--sparse_kernel=native is the row-sparse MF step: it needs --model=mf, "
      "--weighting=none and --sparse_updates (use auto or xla otherwise).",
    )

    _check(
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
