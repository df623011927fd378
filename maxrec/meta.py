"""Meta-learning the auxiliary weights by implicit differentiation (docs/method.md §2.5–2.8, §3).

The alternating schedule of §3.1: the inner optimizer trains θ on L_in(θ, φ); after a
warm-up, every N inner steps one meta step updates φ along the hypergradient of the primary
loss on the held-out meta split R_meta [A5]:

    g_φ = -(∂²L_in/∂φ∂θ)ᵀ (∇²_θ L_in + δI)⁻¹ ∇_θ L_meta     at the current θ (≈ θ*(φ)),
    δ   = δ_rel · λ̂_max                                     [A7], λ̂_max by power iteration,
    φ  <- φ + clip+Adam(g_φ),  w = softplus(φ) <= w_max.

The hyper-batch B_h, its negatives and views ξ_h, and the meta batch B_m are fixed for one
meta step. A non-finite hypergradient or a failed solve (non-finite, or residual larger
than ‖g‖) skips the update; the skip is counted and logged and training goes on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct
from optax import tree as otree

from maxrec import implicit, runfiles
from maxrec.objective import Objective, aux_weights, host_aux_params


@struct.dataclass
class MetaState:
  """State of the outer loop.

  Attributes:
    opt_state: the meta optimizer's state on φ.
    lambda_max: the current estimate λ̂_max of the inner Hessian's largest |eigenvalue|.
    num_updates: meta steps applied.
    num_skipped: meta steps skipped (non-finite hypergradient or failed solve).
  """

  opt_state: Any
  lambda_max: jax.Array
  num_updates: jax.Array
  num_skipped: jax.Array


def _failed_solve(info: implicit.HypergradInfo, cfg) -> jax.Array:
  """A solve is unusable when it is non-finite, when CG stopped on negative curvature
  before taking a step (v = 0: no information), or when, without a curvature stop, its
  relative residual exceeds `max_residual`. A curvature stop after k >= 1 steps keeps the
  truncated iterate (truncated Newton), whose residual may legitimately exceed 1."""
  nonfinite = ~jnp.isfinite(info.relative_residual) | ~jnp.isfinite(info.solution_norm)
  no_step = info.negative_curvature & (info.num_steps == 0) & (info.meta_grad_norm > 0)
  diverged = ~info.negative_curvature & (info.relative_residual > cfg.max_residual)
  return nonfinite | no_step | diverged


def clip_phi(phi, w_max: float):
  """Caps scalar weights at w_max (φ <= softplus⁻¹(w_max)); pytrees (networks) pass."""
  if isinstance(phi, jax.Array) and phi.ndim == 1:
    return jnp.minimum(phi, float(host_aux_params("meta", (w_max,))[0]))
  return phi


class MetaLearner:
  """Builds the jitted meta step for an `Objective` and a `MetaConfig`.

  Args:
    objective: the inner/meta objectives.
    cfg: `maxrec.config.MetaConfig`.
    num_aux_params: size of φ (decides the mixed-partial mode under "auto").
  """

  def __init__(self, objective: Objective, cfg, num_aux_params: int):
    self.objective, self.cfg = objective, cfg
    self.tx = optax.chain(optax.clip_by_global_norm(cfg.meta_clip), optax.adam(cfg.meta_lr))
    mixed = cfg.mixed_partial
    if mixed == "auto":
      mixed = "jvp" if num_aux_params <= 8 else "vjp"
    self.mixed = mixed
    self.step = jax.jit(self._step, donate_argnums=(1,))

  def init(self, aux_params) -> MetaState:
    return MetaState(
      opt_state=self.tx.init(aux_params),
      lambda_max=jnp.ones((), jnp.float32),
      num_updates=jnp.zeros((), jnp.int32),
      num_skipped=jnp.zeros((), jnp.int32),
    )

  def _losses(self, graph, weights):
    obj = self.objective
    inner = lambda p, h, b, k: obj.inner_loss(p, h, b, k, graph, weights)[0]  # noqa: E731
    meta = lambda p, b: obj.meta_loss(p, b, graph, weights)  # noqa: E731
    return inner, meta

  def _lambda_max(self, inner, params, phi, batch, key):
    _, matvec = implicit.linearize_hvp(inner, params, phi, batch, key)
    v0 = otree.random_like(jax.random.fold_in(key, 17), params)
    return implicit.power_iteration(matvec, v0, num_iters=self.cfg.power_iters)[0]

  def _step(self, params, meta_state: MetaState, phi, batches, key, refresh, graph, weights):
    """One meta step. `batches` = {"hyper": B_h (or T stacked), "meta": B_m}."""
    cfg = self.cfg
    inner, meta = self._losses(graph, weights)
    hyper = batches["hyper"]
    first = jax.tree.map(lambda x: x[0], hyper) if cfg.hypergrad == "unrolled" else hyper
    lam = jax.lax.cond(
      refresh,
      lambda: self._lambda_max(inner, params, phi, first, key).astype(jnp.float32),
      lambda: meta_state.lambda_max,
    )
    lam = jnp.maximum(lam, 1e-12)
    damping = cfg.damping_rel * lam
    if cfg.hypergrad == "unrolled":
      keys = jax.random.split(key, cfg.unroll_steps)
      hg, meta_loss = implicit.unrolled_hypergradient(
        inner, meta, params, phi, step_args=(hyper, keys), meta_args=(batches["meta"],),
        learning_rate=1.0 / lam,
      )  # fmt: skip
      info = {"meta_loss": meta_loss, "num_steps": jnp.int32(cfg.unroll_steps)}
      failed = jnp.array(False)
    else:
      method = {"cg": "cg", "neumann": "neumann", "first_order": "first_order"}[cfg.hypergrad]
      hg, hinfo = implicit.hypergradient(
        inner, meta, params, phi, inner_args=(hyper, key), meta_args=(batches["meta"],),
        method=method, maxiter=cfg.cg_iters, tol=cfg.cg_tol, damping=damping, alpha=1.0 / lam,
        mixed=self.mixed,
      )  # fmt: skip
      info = hinfo._asdict()
      failed = _failed_solve(hinfo, cfg)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(hg)]))
    skip = failed | ~finite
    info["solve_failed"], info["hypergrad_nonfinite"] = failed, ~finite
    safe_hg = jax.tree.map(lambda x: jnp.where(skip, 0.0, x), hg)
    updates, opt_state = self.tx.update(safe_hg, meta_state.opt_state, phi)
    new_phi = clip_phi(optax.apply_updates(phi, updates), cfg.w_max)
    new_phi = jax.tree.map(lambda a, b: jnp.where(skip, a, b), phi, new_phi)
    opt_state = jax.tree.map(lambda a, b: jnp.where(skip, a, b), meta_state.opt_state, opt_state)
    new_state = MetaState(
      opt_state=opt_state,
      lambda_max=lam,
      num_updates=meta_state.num_updates + jnp.where(skip, 0, 1),
      num_skipped=meta_state.num_skipped + jnp.where(skip, 1, 0),
    )
    info.update(
      hypergrad=hg,
      lambda_max=lam,
      damping=damping,
      skipped=skip,
      predicted_change=otree.vdot(hg, otree.sub(new_phi, phi)),
    )
    if "alignment" in info and isinstance(phi, jax.Array) and phi.ndim == 1:
      # alignment_k = w'_k <∇L_k, g>, column norm_k = w'_k ‖∇L_k‖, w'_k = dw_k/dφ_k
      weights = lambda p: aux_weights("meta", p)[0]  # noqa: E731
      slope = jax.jvp(weights, (phi,), (jnp.ones_like(phi),))[1]
      info["alignment"] = info["alignment"] / slope
      if self.mixed == "jvp":
        denom = jnp.maximum(info["column_norms"] * info["meta_grad_norm"], 1e-30)
        info["cosine"] = slope * info["alignment"] / denom
    info.pop("column_norms", None)
    return new_phi, new_state, info


def info_to_record(info: dict, task_names: tuple[str, ...], phi) -> dict:
  """Host-side JSON record of one meta step."""
  info = jax.device_get(info)
  rec = {}
  for k, v in info.items():
    if k == "hypergrad":
      continue
    v = np.asarray(v)
    rec[k] = v.tolist() if v.ndim else v.item()
  hg = info["hypergrad"]
  phi = np.asarray(jax.device_get(phi)) if isinstance(phi, jax.Array) else None
  if phi is not None and phi.ndim == 1:
    rec["hypergrad"] = dict(zip(task_names, np.asarray(hg).tolist()))
    rec["phi"] = dict(zip(task_names, phi.tolist()))
    weights = np.asarray(aux_weights("meta", jnp.asarray(phi))[0])
    rec["weights"] = dict(zip(task_names, weights.tolist()))
  else:
    leaves = jax.tree.leaves(hg)
    rec["hypergrad_norm"] = float(np.sqrt(sum(np.sum(np.square(x)) for x in leaves)))
  for k in ("alignment", "cosine"):
    if k in rec:
      rec[k] = dict(zip(task_names, rec[k]))
  return rec


class MetaRunner:
  """Host side of the outer loop: the schedule, the batches, timings and the records.

  Args:
    objective: the inner/meta objectives.
    config: the run's `Config`.
    inner_sampler: draws hyper-batches B_h from R_in.
    ds: the data set (its meta split R_meta feeds B_m).
    aux_params: φ at the start.
    seed: B_h and B_m of meta step k are drawn from `default_rng([seed, 1, k])`, so they
      depend on (seed, k) only, not on how the run was interrupted or resumed.
    steps_per_epoch: inner steps per epoch (the warm-up is counted in epochs).
    place: puts a batch on the device(s) (the Trainer's, which shards it on a mesh).
  """

  def __init__(
    self, objective, config, inner_sampler, ds, aux_params, seed, steps_per_epoch, place=None
  ):
    from maxrec.sampling import Sampler, SeenItems

    self.cfg = config.meta
    self.meta_batch_size = config.meta_batch_size
    pairs = ds.meta if self.cfg.meta_data == "heldout" else ds.valid
    if len(pairs) == 0 and self.cfg.meta_data == "valid":
      raise ValueError(
        "--meta_data=valid: the split has no validation pairs; raise the "
        "validation share of --split_ratios or use --meta_data=heldout."
      )
    if len(pairs) == 0:
      raise ValueError(
        "the meta split is empty: no user has --meta_min_interactions="
        f"{config.data.meta_min_interactions} training items; lower it or raise --meta_ratio."
      )
    n_phi = sum(x.size for x in jax.tree.leaves(aux_params))
    self.learner = MetaLearner(objective, self.cfg, n_phi)
    self.state = self.learner.init(aux_params)
    self.inner_sampler = inner_sampler
    # negatives avoid every training pair and the meta pairs themselves
    avoid = np.concatenate([ds.observed, pairs]) if self.cfg.meta_data == "valid" else ds.observed
    self.meta_sampler = Sampler(pairs, avoid, ds.n_users, ds.n_items)
    # softmax meta loss: the inner problem's training items leave each user's softmax
    self.seen = (
      SeenItems(ds.train, ds.n_users, ds.n_items) if self.cfg.meta_loss == "softmax" else None
    )
    self.seed, self.key = seed, jax.random.key(config.train.seed + 2)
    self.place = jax.device_put if place is None else place
    self.warmup = self.cfg.warmup_epochs * steps_per_epoch
    self.every = config.meta_every_for(steps_per_epoch)
    self.task_names = objective.task_names
    self.count, self.inner_s, self.inner_steps, self.meta_s = 0, 0.0, 0, []
    self._seen_inner = False
    # global step from which meta steps may run; None holds them until the driver sets it
    # (`train_and_evaluate` does once validation beats popularity)
    self.active_at: int | None = 0

  def describe(self) -> str:
    c = self.cfg
    return (
      f"meta-learning {', '.join(self.task_names)} weights: {c.hypergrad} hypergradient "
      f"(J={c.cg_iters}, δ={c.damping_rel}·λ̂max, mixed partial by {self.learner.mixed}), "
      f"every {self.every} steps after {self.warmup} warm-up steps; {c.meta_loss} meta "
      f"loss on {len(self.meta_sampler.pairs):,} "
      + ("held-out training pairs (R_meta)" if c.meta_data == "heldout" else "validation pairs")
    )

  def cut_points(self, step0: int, n: int) -> list[int]:
    """Local step counts p in 1..n after which a meta step runs (global t = step0 + p)."""
    every = self.every
    if self.active_at is None:
      return []
    first = max(self.warmup, every, self.active_at)
    first = -(-first // every) * every
    return [t - step0 for t in range(first, step0 + n + 1, every) if t > step0]

  def observe_inner(self, seconds: float, steps: int) -> None:
    """Accumulates inner-step timings; the first segment (which compiles) is left out."""
    if self._seen_inner:
      self.inner_s += seconds
      self.inner_steps += steps
    self._seen_inner = True

  def _batches(self):
    c, rng = self.cfg, np.random.default_rng([self.seed, 1, self.count])
    if c.hypergrad == "unrolled":
      parts = [self.inner_sampler.sample(rng, c.hyper_batch_size) for _ in range(c.unroll_steps)]
      hyper = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    else:
      hyper = self.inner_sampler.sample(rng, c.hyper_batch_size)
    meta = self.meta_sampler.sample(rng, self.meta_batch_size)
    if self.seen is not None:
      meta = {"user": meta["user"], "pos": meta["pos"], "seen": self.seen.rows(meta["user"])}
    return {"hyper": self.place(hyper), "meta": self.place(meta)}

  def step(self, train_state, graph, weights):
    """One meta step on the train state; returns (new train state, JSON record)."""
    import time

    batches = self._batches()
    key = jax.random.fold_in(self.key, self.count)
    refresh = jnp.asarray(self.count % self.cfg.power_every == 0)
    t0 = time.perf_counter()
    phi, self.state, info = self.learner.step(
      train_state.params, self.state, train_state.aux_params, batches, key, refresh, graph, weights
    )
    jax.block_until_ready(phi)
    seconds = time.perf_counter() - t0
    self.meta_s.append(seconds)
    record = {"meta_step": self.count, "step": int(train_state.step)}
    record.update(info_to_record(info, self.task_names, phi))
    inner = self.inner_s / max(self.inner_steps, 1)
    record.update(
      meta_step_s=seconds, inner_step_s=inner, meta_over_inner=seconds / max(inner, 1e-9)
    )
    self.count += 1
    logging.info("%s", runfiles.format_meta_step(record, self.cfg.hypergrad, self.cfg.max_residual))
    return train_state.replace(aux_params=phi), record

  def host_state(self) -> dict:
    """Counters that a checkpoint must carry (the batches of meta step k depend on k)."""
    return {
      "count": self.count,
      "inner_s": self.inner_s,
      "inner_steps": self.inner_steps,
      "meta_s": self.meta_s,
      "seen_inner": self._seen_inner,
      "active_at": self.active_at,
    }

  def load_host_state(self, host: dict) -> None:
    self.count, self.inner_s, self.inner_steps = host["count"], host["inner_s"], host["inner_steps"]
    self.meta_s, self._seen_inner = list(host["meta_s"]), host["seen_inner"]
    self.active_at = host.get("active_at", 0)  # older checkpoints: active from the start

  def summary(self) -> dict:
    s = jax.device_get(self.state)
    return {
      "meta_steps": self.count,
      "active_at": self.active_at,  # the step from which meta steps could run
      "updates": int(s.num_updates),
      "skipped": int(s.num_skipped),
      "lambda_max": float(s.lambda_max),
      # the first meta step compiles: left out of the median
      "meta_step_s_median": float(np.median(self.meta_s[1:])) if len(self.meta_s) > 1 else None,
      "inner_step_s_mean": self.inner_s / max(self.inner_steps, 1),
    }
