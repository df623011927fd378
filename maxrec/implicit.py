"""Implicit differentiation of a training objective's hyper-parameters (docs/method.md §2.6–2.8).

For an inner problem θ*(h) = argmin_θ L_in(θ, h) and an outer loss L_meta(θ), the implicit
function theorem gives, at a stationary point,

    dL_meta/dh = -(∂²L_in/∂h∂θ)ᵀ (∇²_θ L_in + δI)⁻¹ ∇_θ L_meta          (δ: damping)

`hypergradient` evaluates this at given `params`, for any pytrees of parameters and
hyper-parameters, with the inverse-Hessian-vector product from conjugate gradients
(default), a truncated Neumann series, the first-order (gradient-alignment) estimate, or a
dense solve. The pieces are public and pure:

  hvp, linearize_hvp        Hessian-vector products by forward-over-reverse
  cg_solve -> CGResult      damped CG with its diagnostics (steps, residual, success,
                            a negative-curvature stop); zeros, not NaN, for b = 0
  neumann_solve             α Σ_{j<=J} (I - αA)^j b
  power_iteration           the largest |eigenvalue| of a symmetric operator
  unrolled_hypergradient    reverse mode through T inner SGD steps (the baseline)

Everything that defines the linear system (batches, negatives, the augmentation key) must
be fixed for one call: it is passed in `inner_args` / `meta_args`, never drawn inside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from optax import tree as otree

PyTree = Any
METHODS = ("cg", "neumann", "first_order", "exact")


def _axpy(a, x, y):
  """a * x + y on pytrees."""
  return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


def _norm(x) -> jax.Array:
  return jnp.sqrt(otree.vdot(x, x).real)


def hvp(fn: Callable, params: PyTree, vector: PyTree, *args) -> PyTree:
  """∇²_θ fn(θ, *args) · vector at θ = params, by forward-over-reverse (`jax.jvp` of
  `jax.grad`). Costs about two gradients."""
  return jax.jvp(lambda p: jax.grad(fn)(p, *args), (params,), (vector,))[1]


def linearize_hvp(fn: Callable, params: PyTree, *args) -> tuple[PyTree, Callable]:
  """Linearises ∇_θ fn once: returns (∇_θ fn(params), matvec) with matvec(v) = H v.

  Each later `matvec` costs about one JVP of the gradient; the linearisation stores the
  residuals of one gradient evaluation.
  """
  return jax.linearize(lambda p: jax.grad(fn)(p, *args), params)


class CGResult(NamedTuple):
  """Outcome of `cg_solve`; failure is data, not an exception.

  Attributes:
    x: the approximate solution, shaped like b.
    num_steps: iterations taken (int32).
    residual_norm: ‖b - (A + δI) x‖ by the CG recursion.
    converged: residual_norm <= tol · ‖b‖.
    negative_curvature: stopped because pᵀ(A + δI)p <= curvature_eps · ‖p‖².
  """

  x: PyTree
  num_steps: jax.Array
  residual_norm: jax.Array
  converged: jax.Array
  negative_curvature: jax.Array


def cg_solve(
  matvec: Callable,
  b: PyTree,
  *,
  maxiter: int,
  tol: float = 1e-6,
  damping: float | jax.Array = 0.0,
  curvature_eps: float = 0.0,
) -> CGResult:
  """Solves (A + damping · I) x = b by conjugate gradients from x0 = 0.

  A must be symmetric (CG is run on the system itself, not on the normal equations). The
  loop is a `lax.while_loop` bounded by `maxiter` (static), so it compiles once inside
  `jit`; it stops early on convergence or on non-positive curvature, keeping the last
  iterate (x = 0 if that happens on the first step). `damping` may be traced.

  Args:
    matvec: v -> A v on pytrees shaped like b.
    b: right-hand side.
    maxiter: maximum iterations J.
    tol: relative tolerance on the residual norm.
    damping: δ >= 0 added to the diagonal.
    curvature_eps: stop when pᵀ(A + δI)p <= curvature_eps · ‖p‖².
  Returns:
    A `CGResult`.
  """
  damped = lambda v: _axpy(damping, v, matvec(v))  # noqa: E731
  zeros = jax.tree.map(jnp.zeros_like, b)
  rs0 = otree.vdot(b, b).real
  target = (tol**2) * rs0

  def cond(state):
    k, _, _, _, rs, _, stop = state
    return (k < maxiter) & (rs > target) & ~stop

  def body(state):
    k, x, r, p, rs, neg, _ = state
    ap = damped(p)
    pap = otree.vdot(p, ap).real
    bad = pap <= curvature_eps * otree.vdot(p, p).real
    alpha = jnp.where(bad, 0.0, rs / jnp.where(bad, 1.0, pap))
    x = _axpy(alpha, p, x)
    r = _axpy(-alpha, ap, r)
    rs_new = otree.vdot(r, r).real
    beta = jnp.where(bad, 0.0, rs_new / jnp.where(rs > 0, rs, 1.0))
    p = _axpy(beta, p, r)
    return k + jnp.where(bad, 0, 1), x, r, p, rs_new, neg | bad, bad

  init = (jnp.int32(0), zeros, b, b, rs0, jnp.array(False), jnp.array(False))
  k, x, _, _, rs, neg, _ = jax.lax.while_loop(cond, body, init)
  return CGResult(x, k, jnp.sqrt(rs), rs <= target, neg)


class NeumannResult(NamedTuple):
  """Outcome of `neumann_solve`: x and the norm of the last series term α(I-αA)^J b."""

  x: PyTree
  last_term_norm: jax.Array


def neumann_solve(
  matvec: Callable, b: PyTree, *, num_terms: int, alpha: float | jax.Array, damping=0.0
) -> NeumannResult:
  """x = α Σ_{j=0..J} (I - α(A + δI))^j b ≈ (A + δI)⁻¹ b.

  Converges for A + δI ≻ 0 and 0 < α < 2 / λ_max; with α <= 1/λ_max the relative error is
  at most (1 - α λ_min)^(J+1). J = 0 gives α b, the first-order estimate.
  """

  def body(_, state):
    term, total = state
    term = jax.tree.map(lambda t, h: t - alpha * h, term, _axpy(damping, term, matvec(term)))
    return term, jax.tree.map(jnp.add, total, term)

  term, total = jax.lax.fori_loop(0, num_terms, body, (b, b))
  return NeumannResult(jax.tree.map(lambda t: alpha * t, total), alpha * _norm(term))


def power_iteration(matvec: Callable, v0: PyTree, *, num_iters: int) -> tuple[jax.Array, PyTree]:
  """Estimates the largest |eigenvalue| of a symmetric operator from a start vector v0.

  Returns:
    (|λ̂|, the last unit vector). |λ̂| is the Rayleigh quotient's magnitude.
  """

  def unit(v):
    scale = 1.0 / jnp.maximum(_norm(v), 1e-30)
    return jax.tree.map(lambda a: a * scale, v)

  def body(_, v):
    return unit(matvec(v))

  v = jax.lax.fori_loop(0, num_iters, body, unit(v0))
  return jnp.abs(otree.vdot(v, matvec(v)).real), v


class HypergradInfo(NamedTuple):
  """Diagnostics of one hypergradient.

  Attributes:
    meta_loss: L_meta at params.
    meta_grad_norm: ‖∇_θ L_meta‖ (= ‖g‖).
    inner_grad_norm: ‖∇_θ L_in‖, the stationarity the theorem assumes.
    solution_norm: ‖v‖, v ≈ (H + δI)⁻¹ g.
    num_steps: solver iterations (CG steps, Neumann terms, 0 otherwise).
    relative_residual: ‖(H + δI)v - g‖ / ‖g‖ (CG and exact; NaN-free, 0 when g = 0).
    converged: the solver's convergence flag (True for non-iterative methods).
    negative_curvature: CG stopped on non-positive curvature.
    alignment: (∂²L_in/∂h∂θ)ᵀ g, the first-order (gradient-alignment) direction, shaped
      like h; for a weight w_k = f(h_k), alignment_k = f'(h_k) ⟨∇L_k, ∇L_meta⟩.
    column_norms: ‖∂_{h_k} ∇_θ L_in‖ shaped like h with mixed="jvp" (0 with "vjp").
  """

  meta_loss: jax.Array
  meta_grad_norm: jax.Array
  inner_grad_norm: jax.Array
  solution_norm: jax.Array
  num_steps: jax.Array
  relative_residual: jax.Array
  converged: jax.Array
  negative_curvature: jax.Array
  alignment: PyTree
  column_norms: PyTree


def mixed_partial(
  inner_loss_fn: Callable, params, hparams, vectors: tuple, inner_args=(), mode: str = "vjp"
) -> tuple[tuple, PyTree | None]:
  """(∂²L_in/∂h∂θ)ᵀ v = ∂_h ⟨∇_θ L_in(θ, h), v⟩ for each v in `vectors`, shaped like h.

  mode "vjp": reverse-over-reverse: one `jax.vjp`, applied to every vector.
  mode "jvp": one forward-over-reverse pass per scalar in h gives the columns
    ∂_{h_k} ∇_θ L_in, dotted with every vector; cheaper when h is a handful of weights and
    the model has hand-written VJPs (whose transposes JAX would otherwise derive).

  Returns:
    (one result per vector, the column norms ‖∂_{h_k} ∇_θ L_in‖ shaped like h for mode
    "jvp", else None).
  """
  grad_in = lambda p, h: jax.grad(inner_loss_fn)(p, h, *inner_args)  # noqa: E731
  if mode == "vjp":
    _, vjp_h = jax.vjp(lambda h: grad_in(params, h), hparams)
    return tuple(vjp_h(v)[0] for v in vectors), None
  if mode == "jvp":
    flat, unravel = ravel_pytree(hparams)
    cols = [
      jax.jvp(lambda h: grad_in(params, h), (hparams,), (unravel(e),))[1]
      for e in jnp.eye(flat.shape[0], dtype=flat.dtype)
    ]
    out = tuple(
      unravel(jnp.stack([otree.vdot(c, v) for c in cols]).astype(flat.dtype)) for v in vectors
    )
    return out, unravel(jnp.stack([_norm(c) for c in cols]).astype(flat.dtype))
  raise ValueError(f"mixed partial mode must be 'vjp' or 'jvp', got {mode!r}")


def _exact_solve(inner_loss_fn, params, hparams, inner_args, g, damping):
  flat, unravel = ravel_pytree(params)
  h = jax.hessian(lambda x: inner_loss_fn(unravel(x), hparams, *inner_args))(flat)
  g_flat = ravel_pytree(g)[0]
  return unravel(jnp.linalg.solve(h + damping * jnp.eye(flat.shape[0], dtype=h.dtype), g_flat))


def hypergradient(
  inner_loss_fn: Callable,
  meta_loss_fn: Callable,
  params: PyTree,
  hparams: PyTree,
  *,
  inner_args: tuple = (),
  meta_args: tuple = (),
  method: str = "cg",
  maxiter: int = 5,
  tol: float = 1e-10,
  damping: float | jax.Array = 0.0,
  alpha: float | jax.Array = 1.0,
  mixed: str = "vjp",
) -> tuple[PyTree, HypergradInfo]:
  """The implicit-function-theorem hypergradient dL_meta/dh at `params`.

  Args:
    inner_loss_fn: (params, hparams, *inner_args) -> scalar L_in.
    meta_loss_fn: (params, *meta_args) -> scalar L_meta (no dependence on hparams).
    params: θ, any pytree, treated as θ*(h).
    hparams: h, any pytree.
    inner_args, meta_args: fixed data of the two losses (batches, keys).
    method: "cg" (damped CG, `maxiter` steps), "neumann" (`maxiter` terms, step `alpha`),
      "first_order" (v = alpha · g), "exact" (dense Hessian solve; small problems only).
    maxiter: CG iterations or Neumann terms J.
    tol: CG relative tolerance.
    damping: δ >= 0 (may be traced).
    alpha: Neumann step / first-order scale; use 1/λ_max (docs/method.md [A8]).
    mixed: how the mixed partial is taken, "vjp" (default) or "jvp" (see `mixed_partial`).
  Returns:
    (hypergradient shaped like hparams, `HypergradInfo`).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
  meta_loss, g = jax.value_and_grad(meta_loss_fn)(params, *meta_args)
  g_norm = _norm(g)
  inner_grad, matvec = linearize_hvp(inner_loss_fn, params, hparams, *inner_args)
  steps, converged, negative = jnp.int32(0), jnp.array(True), jnp.array(False)
  if method == "cg":
    res = cg_solve(matvec, g, maxiter=maxiter, tol=tol, damping=damping)
    v, steps, converged, negative = res.x, res.num_steps, res.converged, res.negative_curvature
  elif method == "neumann":
    v = neumann_solve(matvec, g, num_terms=maxiter, alpha=alpha, damping=damping).x
    steps = jnp.int32(maxiter)
  elif method == "first_order":
    v = jax.tree.map(lambda a: alpha * a, g)
  else:
    v = _exact_solve(inner_loss_fn, params, hparams, inner_args, g, damping)
  if method == "cg":
    residual = res.residual_norm  # the CG recursion's residual: no extra product
  else:
    residual = _norm(jax.tree.map(jnp.subtract, _axpy(damping, v, matvec(v)), g))
  rel = jnp.where(g_norm > 0, residual / jnp.where(g_norm > 0, g_norm, 1.0), 0.0)
  (m, alignment), col_norms = mixed_partial(
    inner_loss_fn, params, hparams, (v, g), inner_args, mixed
  )
  if col_norms is None:
    col_norms = jax.tree.map(jnp.zeros_like, hparams)
  info = HypergradInfo(
    meta_loss=meta_loss,
    meta_grad_norm=g_norm,
    inner_grad_norm=_norm(inner_grad),
    solution_norm=_norm(v),
    num_steps=steps,
    relative_residual=rel,
    converged=converged,
    negative_curvature=negative,
    alignment=alignment,
    column_norms=col_norms,
  )
  return jax.tree.map(jnp.negative, m), info


def unrolled_hypergradient(
  inner_loss_fn: Callable,
  meta_loss_fn: Callable,
  params: PyTree,
  hparams: PyTree,
  *,
  step_args: tuple,
  meta_args: tuple = (),
  learning_rate: float | jax.Array,
) -> tuple[PyTree, jax.Array]:
  """Conventional meta-learning: reverse mode through T inner SGD steps.

  θ_{t+1} = θ_t - η ∇_θ L_in(θ_t, h, *step_args[t]) from θ_0 = params, then
  dL_meta(θ_T)/dh. Steps are a `lax.scan` with per-step rematerialisation
  (`jax.checkpoint`), so memory is O(T |θ|) for the carries, not O(T · activations).

  Args:
    step_args: per-step inner arguments, each stacked with a leading axis of length T.
    learning_rate: η of the unrolled SGD.
  Returns:
    (hypergradient shaped like hparams, L_meta(θ_T)).
  """

  def unrolled_loss(h):
    def step(theta, args):
      g = jax.grad(inner_loss_fn)(theta, h, *args)
      return jax.tree.map(lambda t, gt: t - learning_rate * gt, theta, g), None

    theta_t, _ = jax.lax.scan(jax.checkpoint(step), params, step_args)
    return meta_loss_fn(theta_t, *meta_args)

  loss, grad = jax.value_and_grad(unrolled_loss)(hparams)
  return grad, loss
