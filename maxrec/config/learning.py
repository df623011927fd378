"""The configuration of the auxiliary tasks and of the meta-learner that weights them
(docs/method.md §2.4–2.5, §3): one frozen dataclass per flag group."""

from __future__ import annotations

import dataclasses

from maxrec.config.fields import (
  HYPERGRADS,
  META_DATA,
  META_LOSSES,
  WEIGHTINGS,
  check,
  check_choice,
  check_declared_choices,
  field,
)


@dataclasses.dataclass(frozen=True)
class AuxConfig:
  """The auxiliary tasks and how they are weighted (docs/method.md §2.4, §2.5)."""

  weighting: str = field(
    "meta",
    "How auxiliary tasks are weighted: none (backbone alone), fixed (--aux_weights), "
    "uncertainty (learned log-variances, Kendall et al. 2018), meta (hypergradient) or "
    "replay (the weight trajectory of the --weighting=meta run in --replay_from, on all "
    "training data [A9]).",
    WEIGHTINGS,
  )
  aux_tasks: tuple[str, ...] = field(
    ("user_sgl", "item_sgl"),
    "Auxiliary tasks by registered name: user_sgl, item_sgl, user_simgcl, item_simgcl, item_cooc.",
  )
  aux_weights: tuple[float, ...] = field(
    (0.01,),
    "Fixed weights (or initial weights), one for all tasks or one per task. 0.01: where "
    "the tasks hurt (MovieLens, the built-in set) a start at 0.1 does its harm before "
    "the meta-learner can lower it; where they help it raises 0.01 tenfold in six meta "
    "steps (RESULTS.md).",
  )
  ssl_temperature: float = field(0.2, "InfoNCE temperature τ.")
  ssl_anchors: int = field(
    4096,
    "InfoNCE anchors per side: the distinct users and positive items of the first this "
    "many triples of each (shuffled) batch; the in-batch cost is quadratic in it. 0: the "
    "whole batch.",
  )
  edge_drop: float = field(0.1, "Edge-dropout ratio ρ of the SGL views.")
  view_layers: int | None = field(
    None, "Propagation layers of the views. Empty: L for LightGCN, 1 for MF [A2]."
  )
  simgcl_eps: float = field(0.1, "SimGCL noise magnitude ε.")
  replay_from: str = field(
    "",
    "[A9] With --weighting=replay: the work directory of a finished --weighting=meta run "
    "whose logged weights (meta.jsonl) are replayed epoch by epoch.",
  )

  def __post_init__(self):
    check_declared_choices(self)
    check_choice("weighting", self.weighting, WEIGHTINGS)
    check(len(set(self.aux_tasks)) == len(self.aux_tasks), "--aux_tasks lists a task twice.")
    check(
      self.weighting == "none" or len(self.aux_tasks) > 0,
      f"--weighting={self.weighting} needs at least one task in --aux_tasks.",
    )
    check(
      len(self.aux_weights) in (1, len(self.aux_tasks)),
      f"--aux_weights has {len(self.aux_weights)} values; give 1 or one per task "
      f"({len(self.aux_tasks)}).",
    )
    check(all(w > 0 for w in self.aux_weights), "--aux_weights must be positive.")
    check(self.ssl_temperature > 0, f"--ssl_temperature={self.ssl_temperature} must be > 0.")
    check(self.ssl_anchors >= 0, f"--ssl_anchors={self.ssl_anchors} must be >= 0.")
    check(0 <= self.edge_drop < 1, f"--edge_drop={self.edge_drop} must be in [0, 1).")
    check(self.view_layers is None or self.view_layers >= 0, "--view_layers must be >= 0.")
    check(self.simgcl_eps >= 0, f"--simgcl_eps={self.simgcl_eps} must be >= 0.")
    check(
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

  hypergrad: str = field(
    "cg",
    "Hypergradient: implicit with damped CG, implicit with a Neumann series, unrolled "
    "differentiation through --unroll_steps SGD steps, or first-order alignment.",
    HYPERGRADS,
  )
  cg_iters: int = field(5, "CG iterations J (also the Neumann series' terms).")
  cg_tol: float = field(1e-6, "CG stops early once the relative residual is below this.")
  damping_rel: float = field(0.1, "[A7] Damping δ = damping_rel x λ̂_max.")
  power_iters: int = field(5, "Power iterations for λ̂_max.")
  power_every: int = field(10, "Refresh λ̂_max every this many meta steps.")
  meta_loss: str = field(
    "softmax",
    "[A5] The primary loss the hypergradient descends: BPR with one uniform negative per "
    "held-out pair, or softmax cross-entropy of each held-out item against every item "
    "(the user's training items masked), which rewards what top-K ranking rewards.",
    META_LOSSES,
  )
  meta_data: str = field(
    "valid",
    "[A1] The pairs of the meta loss: heldout (R_meta, --meta_ratio of each user's training "
    "items, never trained on) or valid (the validation pairs: the inner problem trains on "
    "every training pair, and validation tunes the weights as it selects the epoch).",
    META_DATA,
  )
  meta_every: int | None = field(
    None,
    "N: one meta step every this many inner steps. Empty: 50 for MF; three epochs' steps "
    "for LightGCN, whose meta step costs 5-10 of its full-graph inner steps (keeps the "
    "meta-learning overhead near 20%).",
  )
  warmup_epochs: int = field(1, "W: inner epochs before the first meta step.")
  meta_lr: float = field(
    0.5,
    "Adam learning rate on φ. Adam's steps are about this size whatever the "
    "hypergradient's scale, and for small weights φ ≈ log w: each meta step can scale a "
    "weight by up to e^0.5 = 1.65, so a few dozen meta steps span 0.001 to 1.",
  )
  meta_clip: float = field(10.0, "Global-norm clip of the hypergradient.")
  meta_batch_size: int | None = field(
    None,
    "|B_m|: held-out pairs per meta step. Empty: 1024 with the softmax meta loss (each "
    "scored against every item), 4096 triples with BPR.",
  )
  hyper_batch_size: int = field(2048, "|B_h|: inner triples defining the Hessian per meta step.")
  w_max: float = field(10.0, "Upper bound on each learned weight.")
  unroll_steps: int = field(5, "T: SGD steps differentiated through by --hypergrad=unrolled.")
  max_residual: float = field(
    1.0,
    "A solve whose relative residual exceeds this (without a negative-curvature stop) "
    "counts as failed; its update is skipped.",
  )
  mixed_partial: str = field(
    "auto",
    "How ∂²L_in/∂φ∂θ · v is taken: vjp (reverse-over-reverse), jvp (one forward pass per "
    "weight), or auto (jvp for <= 8 weights).",
    ("auto", "vjp", "jvp"),
  )
  weight_net: bool = field(False, "[A6] Per-entity weights from a small MLP instead of scalars.")

  def __post_init__(self):
    check_declared_choices(self)
    check_choice("hypergrad", self.hypergrad, HYPERGRADS)
    check_choice("meta_loss", self.meta_loss, META_LOSSES)
    check_choice("meta_data", self.meta_data, META_DATA)
    check(
      self.meta_batch_size is None or self.meta_batch_size >= 1,
      f"--meta_batch_size={self.meta_batch_size} must be >= 1.",
    )
    for name in ("power_iters", "power_every", "hyper_batch_size"):
      check(getattr(self, name) >= 1, f"--{name}={getattr(self, name)} must be >= 1.")
    check(
      self.meta_every is None or self.meta_every >= 1,
      f"--meta_every={self.meta_every} must be >= 1.",
    )
    check(self.cg_iters >= 0, f"--cg_iters={self.cg_iters} must be >= 0.")
    check(self.unroll_steps >= 1, f"--unroll_steps={self.unroll_steps} must be >= 1.")
    check(self.warmup_epochs >= 0, f"--warmup_epochs={self.warmup_epochs} must be >= 0.")
    check(self.damping_rel >= 0, f"--damping_rel={self.damping_rel} must be >= 0.")
    check(self.meta_lr > 0 and self.meta_clip > 0, "--meta_lr and --meta_clip must be > 0.")
    check(self.w_max > 0, f"--w_max={self.w_max} must be > 0.")
