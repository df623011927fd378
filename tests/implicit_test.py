"""Implicit hypergradients against closed forms, finite differences and dense solves.

Oracles T1–T6 and T9 of docs/method.md §4. Every expected value is computed independently of
`maxrec.implicit` (NumPy closed forms, `jnp.linalg.solve`, `jax.hessian`, central finite
differences), in float64. To keep the file fast, each test evaluates the code under test inside
one jitted function where it can (one compilation per test); `test_t9_jit_equals_no_jit`
checks that jitting changes nothing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from maxrec import implicit

# Every program here is tiny: LLVM's optimisation passes only cost compile time (about half of
# this file's runtime at the default level); XLA's own HLO passes still run.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# ---------------------------------------------------------------------------------------------
# The T1 problem: ridge with per-loss weights, closed-form θ*(w).
# ---------------------------------------------------------------------------------------------

P = 8
LAM = 0.1
W0 = np.array([0.3, 0.3])


def make_ridge(seed=0):
  """Primary (n=15, noisy), aux1 (n=100, same θ_true), aux2 (n=100, pure noise), meta (n=200)."""
  rng = np.random.default_rng(seed)
  theta_true = rng.normal(size=P)

  def task(n, noise, informative=True):
    x = rng.normal(size=(n, P))
    y = (x @ theta_true if informative else 0.0) + noise * rng.normal(size=n)
    return x, y

  x0, y0 = task(15, 1.0)
  x1, y1 = task(100, 0.5)
  x2, y2 = task(100, 2.0, informative=False)
  xv, yv = task(200, 0.5)
  return dict(inner=(x0, y0, x1, y1, x2, y2), meta=(xv, yv))


RIDGE = make_ridge()


def np_ridge(w, prob=RIDGE, lam=LAM):
  """NumPy closed form: θ*, A, g_v, G = [∇L_k(θ*)]_k, the exact ∂F/∂w = -G A⁻¹ g_v, F(w)."""
  x0, y0, *aux = prob["inner"]
  xv, yv = prob["meta"]
  tasks = list(zip(aux[::2], aux[1::2]))
  a = x0.T @ x0 / len(y0) + lam * np.eye(P)
  b = x0.T @ y0 / len(y0)
  for wk, (xk, yk) in zip(w, tasks):
    a = a + wk * xk.T @ xk / len(yk)
    b = b + wk * xk.T @ yk / len(yk)
  theta = np.linalg.solve(a, b)
  g_v = xv.T @ (xv @ theta - yv) / len(yv)
  grads_k = np.stack([xk.T @ (xk @ theta - yk) / len(yk) for xk, yk in tasks])
  v = np.linalg.solve(a, g_v)
  meta = np.sum((xv @ theta - yv) ** 2) / (2 * len(yv))
  return dict(theta=theta, a=a, g_v=g_v, grads_k=grads_k, v=v, hg=-grads_k @ v, meta=meta)


def sq_loss(theta, x, y):
  r = x @ theta - y
  return r @ r / (2 * y.shape[0])


def ridge_inner(theta, w, data, lam=LAM):
  """L_0 + w_1 L_1 + w_2 L_2 + (λ/2)‖θ‖², θ a flat vector and w a length-2 vector."""
  x0, y0, x1, y1, x2, y2 = data
  return (
    sq_loss(theta, x0, y0)
    + w[0] * sq_loss(theta, x1, y1)
    + w[1] * sq_loss(theta, x2, y2)
    + 0.5 * lam * theta @ theta
  )


def ridge_meta(theta, xv, yv):
  return sq_loss(theta, xv, yv)


def to_tree(theta):
  """A dict layout of the flat θ, with leaves of different shapes."""
  return {"head": theta[:3], "tail": theta[3:].reshape(1, P - 3)}


def from_tree(params):
  return jnp.concatenate([params["head"], params["tail"].reshape(-1)])


def ridge_inner_tree(params, hparams, data):
  w = jnp.stack([hparams["aligned"], hparams["noise"]])
  return ridge_inner(from_tree(params), w, data)


def ridge_meta_tree(params, xv, yv):
  return ridge_meta(from_tree(params), xv, yv)


def jax_ridge(ref):
  """(θ*, w, inner data, meta data) as float64 JAX arrays (call inside an x64 test)."""
  data = tuple(map(jnp.asarray, RIDGE["inner"]))
  meta = tuple(map(jnp.asarray, RIDGE["meta"]))
  return jnp.asarray(ref["theta"]), jnp.asarray(W0), data, meta


def ridge_hg(theta, w, data, meta, method, **kw):
  return implicit.hypergradient(
    ridge_inner, ridge_meta, theta, w, inner_args=(data,), meta_args=meta, method=method, **kw
  )


def rel_err(got, want):
  got, want = np.asarray(got), np.asarray(want)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def lam_range(a):
  eig = np.linalg.eigvalsh(a)
  return eig[0], eig[-1]


# ---------------------------------------------------------------------------------------------
# T1
# ---------------------------------------------------------------------------------------------


def test_t1_closed_form_matches_finite_differences_and_autodiff_through_solve(x64):
  """T1: the closed-form ∂F/∂w equals central differences and jax.grad through a dense solve."""
  ref = np_ridge(W0)
  h = 1e-6
  fd = np.array(
    [(np_ridge(W0 + h * e)["meta"] - np_ridge(W0 - h * e)["meta"]) / (2 * h) for e in np.eye(2)]
  )
  np.testing.assert_allclose(ref["hg"], fd, rtol=1e-8, atol=0)

  _, w, data, (xv, yv) = jax_ridge(ref)
  x0, y0, x1, y1, x2, y2 = data

  def f(w):
    a = x0.T @ x0 / 15 + w[0] * x1.T @ x1 / 100 + w[1] * x2.T @ x2 / 100 + LAM * jnp.eye(P)
    b = x0.T @ y0 / 15 + w[0] * x1.T @ y1 / 100 + w[1] * x2.T @ y2 / 100
    return ridge_meta(jnp.linalg.solve(a, b), xv, yv)

  np.testing.assert_allclose(fast_jit(jax.grad(f))(w), ref["hg"], rtol=1e-11)
  # The aligned auxiliary task is up-weighted, the pure-noise one down-weighted.
  assert ref["hg"][0] < 0 < ref["hg"][1]


def test_t1_exact_cg_neumann_match_closed_form(x64):
  """T1: method exact, CG with J = p, Neumann (α = 1/λ_max) with J = 500 and J = 50."""
  ref = np_ridge(W0)
  lmin, lmax = lam_range(ref["a"])
  alpha = 1.0 / lmax

  @fast_jit
  def run(theta, w, data, meta):
    return {
      "exact": ridge_hg(theta, w, data, meta, "exact"),
      "cg": ridge_hg(theta, w, data, meta, "cg", maxiter=P),
      "neumann500": ridge_hg(theta, w, data, meta, "neumann", maxiter=500, alpha=alpha),
      "neumann50": ridge_hg(theta, w, data, meta, "neumann", maxiter=50, alpha=alpha),
    }

  out = run(*jax_ridge(ref))
  hg, info = out["exact"]
  np.testing.assert_allclose(hg, ref["hg"], rtol=1e-11)
  assert bool(info.converged) and float(info.relative_residual) < 1e-12
  assert int(info.num_steps) == 0 and not bool(info.negative_curvature)
  assert float(info.inner_grad_norm) < 1e-12  # θ* is stationary
  assert float(info.meta_loss) == pytest.approx(ref["meta"], rel=1e-12)
  # alignment = (∂²L_in/∂w∂θ)ᵀ g = G g_v (the same for every method); no column norms with vjp.
  for key in out:
    np.testing.assert_allclose(out[key][1].alignment, ref["grads_k"] @ ref["g_v"], rtol=1e-12)
    np.testing.assert_array_equal(out[key][1].column_norms, np.zeros(2))

  hg, info = out["cg"]
  np.testing.assert_allclose(hg, ref["hg"], rtol=1e-8)
  assert bool(info.converged) and not bool(info.negative_curvature)
  assert 1 <= int(info.num_steps) <= P

  hg, info = out["neumann500"]
  np.testing.assert_allclose(hg, ref["hg"], rtol=1e-8)
  assert int(info.num_steps) == 500

  # J = 50: looser, and within ‖G‖·(1 - αλ_min)^{J+1}·‖A⁻¹g‖ of the exact value.
  hg50, _ = out["neumann50"]
  bound = np.linalg.norm(ref["grads_k"], 2) * (1 - alpha * lmin) ** 51 * np.linalg.norm(ref["v"])
  assert np.linalg.norm(np.asarray(hg50) - ref["hg"]) <= bound
  assert 1e-14 < rel_err(hg50, ref["hg"]) < 1e-6  # METHOD: within 1e-6 at κ ≈ 4.5


def test_t1_pytree_params_and_hparams_and_jvp_mixed_partial(x64):
  """T1 with dict params / dict hparams (CG, exact, Neumann); mixed="jvp" equals mixed="vjp"."""
  ref = np_ridge(W0)
  alpha = 1.0 / lam_range(ref["a"])[1]

  @fast_jit
  def run(theta, w, data, meta):
    params = to_tree(theta)
    hparams = {"aligned": w[0], "noise": w[1]}

    def tree_hg(method, mixed="vjp", maxiter=P):
      return implicit.hypergradient(
        ridge_inner_tree,
        ridge_meta_tree,
        params,
        hparams,
        inner_args=(data,),
        meta_args=meta,
        method=method,
        maxiter=maxiter,
        alpha=alpha,
        mixed=mixed,
      )

    return {
      "tree_cg": tree_hg("cg"),
      "tree_exact_jvp": tree_hg("exact", "jvp"),
      "tree_neumann": tree_hg("neumann", maxiter=300),
      "flat_vjp": ridge_hg(theta, w, data, meta, "cg", maxiter=3),
      "flat_jvp": ridge_hg(theta, w, data, meta, "cg", maxiter=3, mixed="jvp"),
    }

  out = run(*jax_ridge(ref))
  alignment = ref["grads_k"] @ ref["g_v"]
  col_norms = np.linalg.norm(ref["grads_k"], axis=1)  # ‖∂_{w_k} ∇_θ L_in‖ = ‖∇L_k(θ*)‖
  for key in ("tree_cg", "tree_exact_jvp", "tree_neumann"):
    hg, info = out[key]
    for tree in (hg, info.alignment, info.column_norms):
      assert set(tree) == {"aligned", "noise"} and jnp.shape(tree["aligned"]) == ()
    np.testing.assert_allclose([hg["aligned"], hg["noise"]], ref["hg"], rtol=1e-8, err_msg=key)
    got = [info.alignment["aligned"], info.alignment["noise"]]
    np.testing.assert_allclose(got, alignment, rtol=1e-12, err_msg=key)
    got = [info.column_norms["aligned"], info.column_norms["noise"]]
    np.testing.assert_allclose(got, col_norms if key.endswith("jvp") else 0.0, rtol=1e-12)
  (by_vjp, vjp_info), (by_jvp, jvp_info) = out["flat_vjp"], out["flat_jvp"]
  assert rel_err(by_vjp, ref["hg"]) > 1e-6  # J = 3 is inexact ...
  np.testing.assert_allclose(by_jvp, by_vjp, rtol=1e-13)  # ... but the same
  np.testing.assert_allclose(jvp_info.alignment, vjp_info.alignment, rtol=1e-13)
  np.testing.assert_allclose(jvp_info.column_norms, col_norms, rtol=1e-12)
  np.testing.assert_array_equal(vjp_info.column_norms, np.zeros(2))


def test_t1_cg_error_non_increasing_and_exact_at_p(x64):
  """T1: CG error non-increasing in J = 1..p (2-norm and A-norm of v); exact at J = p; the
  hypergradient is -G v_J at every J and within ‖A^{-1/2}Gᵀ‖·‖e_J‖_A of the exact value."""
  ref = np_ridge(W0)

  @fast_jit
  def run(theta, w, data, meta):
    _, matvec = implicit.linearize_hvp(ridge_inner, theta, w, data)
    g = jax.grad(ridge_meta)(theta, *meta)
    xs = [implicit.cg_solve(matvec, g, maxiter=j, tol=1e-14).x for j in range(1, P + 1)]
    hgs = [ridge_hg(theta, w, data, meta, "cg", maxiter=j) for j in (1, 3, P)]
    return jnp.stack(xs), hgs

  xs, hgs = run(*jax_ridge(ref))
  errs = np.asarray(xs) - ref["v"]
  err_2 = np.linalg.norm(errs, axis=1)
  err_a = np.sqrt(np.einsum("ji,ik,jk->j", errs, ref["a"], errs))
  slack = 1e-13
  assert all(b <= a + slack for a, b in zip(err_2, err_2[1:])), err_2
  assert all(b <= a + slack for a, b in zip(err_a, err_a[1:])), err_a
  assert err_2[0] > 1e-2 * np.linalg.norm(ref["v"])  # one step is visibly inexact
  assert err_2[-1] <= 1e-10 * np.linalg.norm(ref["v"])

  # sqrt(A)⁻¹: ‖G e‖ <= ‖G A^{-1/2}‖ ‖e‖_A.
  eig, q = np.linalg.eigh(ref["a"])
  c = np.linalg.norm(ref["grads_k"] @ q @ np.diag(eig**-0.5), 2)
  for j, (hg, info) in zip((1, 3, P), hgs):
    assert int(info.num_steps) == j and bool(info.converged) == (j == P)
    np.testing.assert_allclose(hg, -ref["grads_k"] @ np.asarray(xs[j - 1]), rtol=1e-10)
    assert np.linalg.norm(np.asarray(hg) - ref["hg"]) <= c * err_a[j - 1] * (1 + 1e-9) + 1e-15
  np.testing.assert_allclose(hgs[-1][0], ref["hg"], rtol=1e-8)


def test_t1_neumann_error_decreases_monotonically(x64):
  """T1: for α <= 1/λ_max the Neumann error ‖v_J - A⁻¹g‖ decreases monotonically in J, within
  (1 - αλ_min)^{J+1}‖A⁻¹g‖; last_term_norm = α‖(I - αA)^J g‖; hypergradient = -G v_J."""
  ref = np_ridge(W0)
  lmin, lmax = lam_range(ref["a"])
  js = (0, 1, 2, 3, 5, 10, 20, 40)
  alphas = (1.0 / lmax, 0.5 / lmax)

  @fast_jit
  def run(theta, w, data, meta):
    _, matvec = implicit.linearize_hvp(ridge_inner, theta, w, data)
    g = jax.grad(ridge_meta)(theta, *meta)
    sols = [[implicit.neumann_solve(matvec, g, num_terms=j, alpha=a) for j in js] for a in alphas]
    hgs = [
      ridge_hg(theta, w, data, meta, "neumann", maxiter=j, alpha=alphas[0])[0] for j in (2, 20)
    ]
    return sols, hgs

  sols, hgs = run(*jax_ridge(ref))
  for alpha, row in zip(alphas, sols):
    errs = [np.linalg.norm(np.asarray(res.x) - ref["v"]) for res in row]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    m = np.eye(P) - alpha * ref["a"]
    for j, err, res in zip(js, errs, row):
      assert err <= (1 - alpha * lmin) ** (j + 1) * np.linalg.norm(ref["v"]) * (1 + 1e-12)
      want_last = alpha * np.linalg.norm(np.linalg.matrix_power(m, j) @ ref["g_v"])
      np.testing.assert_allclose(res.last_term_norm, want_last, rtol=1e-10)
  for j, hg in zip((2, 20), hgs):
    np.testing.assert_allclose(hg, -ref["grads_k"] @ np.asarray(sols[0][js.index(j)].x), rtol=1e-12)


def test_t1_unrolled_from_zero_truncation_bias(x64):
  """T1: unrolled GD from θ0 = 0, η = 1/λ_max: T = 100 reaches the exact value, T = 10 does not."""
  ref = np_ridge(W0)
  eta = 1.0 / lam_range(ref["a"])[1]

  @fast_jit
  def run(w, data, meta):
    def unrolled(t):
      steps = jax.tree.map(lambda a: jnp.broadcast_to(a, (t, *a.shape)), data)
      return implicit.unrolled_hypergradient(
        ridge_inner,
        ridge_meta,
        jnp.zeros(P),
        w,
        step_args=(steps,),
        meta_args=meta,
        learning_rate=eta,
      )

    return unrolled(100), unrolled(10)

  _, w, data, meta = jax_ridge(ref)
  (hg100, loss100), (hg10, _) = run(w, data, meta)
  np.testing.assert_allclose(hg100, ref["hg"], rtol=1e-8)
  assert float(loss100) == pytest.approx(ref["meta"], rel=1e-9)
  assert rel_err(hg10, ref["hg"]) > 1e-2


# ---------------------------------------------------------------------------------------------
# T2–T6
# ---------------------------------------------------------------------------------------------


def test_t2_per_feature_l2_exp_parametrisation(x64):
  """T2: ∂F/∂φ_j = -(A⁻¹g_v)_j e^{φ_j} θ*_j vs finite differences and the hypergradient."""
  x, y = RIDGE["inner"][0], RIDGE["inner"][1]
  xv, yv = RIDGE["meta"]
  n = len(y)
  phi = np.linspace(-2.0, 0.5, P)

  def solve(phi):
    a = x.T @ x / n + np.diag(np.exp(phi))
    return a, np.linalg.solve(a, x.T @ y / n)

  def f(phi):
    return np.sum((xv @ solve(phi)[1] - yv) ** 2) / (2 * len(yv))

  a, theta = solve(phi)
  g_v = xv.T @ (xv @ theta - yv) / len(yv)
  want = -np.linalg.solve(a, g_v) * np.exp(phi) * theta
  h = 1e-6
  fd = np.array([(f(phi + h * e) - f(phi - h * e)) / (2 * h) for e in np.eye(P)])
  np.testing.assert_allclose(want, fd, rtol=1e-7, atol=1e-9 * np.abs(want).max())

  def inner(theta, phi, x, y):
    return sq_loss(theta, x, y) + 0.5 * jnp.sum(jnp.exp(phi) * theta**2)

  @fast_jit
  def run(theta, phi, x, y, xv, yv):
    return [
      implicit.hypergradient(
        inner,
        ridge_meta,
        theta,
        phi,
        inner_args=(x, y),
        meta_args=(xv, yv),
        method=method,
        maxiter=P,
      )[0]
      for method in ("exact", "cg")
    ]

  for hg in run(*map(jnp.asarray, (theta, phi, x, y, xv, yv))):
    np.testing.assert_allclose(hg, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


def test_t3_unrolled_from_fixed_point_equals_neumann(x64):
  """T3: T unrolled steps of size η from θ*(w) equal Neumann with α = η and J = T - 1."""
  ref = np_ridge(W0)
  lmax = lam_range(ref["a"])[1]
  cases = ((7, 1.0 / lmax), (4, 0.6 / lmax))

  @fast_jit
  def run(theta, w, data, meta):
    out = []
    for t, eta in cases:
      steps = jax.tree.map(lambda a, t=t: jnp.broadcast_to(a, (t, *a.shape)), data)
      unrolled, _ = implicit.unrolled_hypergradient(
        ridge_inner, ridge_meta, theta, w, step_args=(steps,), meta_args=meta, learning_rate=eta
      )
      neumann, _ = ridge_hg(theta, w, data, meta, "neumann", maxiter=t - 1, alpha=eta)
      out.append((unrolled, neumann))
    return out

  for (t, eta), (unrolled, neumann) in zip(cases, run(*jax_ridge(ref))):
    np.testing.assert_allclose(unrolled, neumann, rtol=1e-12)
    # Both equal the truncated series -G η Σ_{j<T} (I - ηA)^j g_v.
    s = sum(np.linalg.matrix_power(np.eye(P) - eta * ref["a"], j) for j in range(t))
    np.testing.assert_allclose(neumann, -ref["grads_k"] @ (eta * s @ ref["g_v"]), rtol=1e-12)


def test_t4_neumann_j0_equals_first_order(x64):
  """T4: Neumann J = 0 = first_order = -α w'(φ)⟨∇L_meta, ∇L_k⟩, with w = softplus(φ)."""
  ref = np_ridge(W0)
  phi = np.log(np.expm1(W0))  # softplus⁻¹(w)
  alpha = 0.37

  def inner_phi(theta, phi, data):
    return ridge_inner(theta, jax.nn.softplus(phi), data)

  @fast_jit
  def run(theta, phi, data, meta):
    return [
      implicit.hypergradient(
        inner_phi,
        ridge_meta,
        theta,
        phi,
        inner_args=(data,),
        meta_args=meta,
        method=method,
        maxiter=0,
        alpha=alpha,
      )
      for method in ("neumann", "first_order")
    ]

  theta, _, data, meta = jax_ridge(ref)
  (neumann, info_n), (first, info_f) = run(theta, jnp.asarray(phi), data, meta)
  want = -alpha * (1 / (1 + np.exp(-phi))) * (ref["grads_k"] @ ref["g_v"])
  np.testing.assert_allclose(neumann, first, rtol=1e-14)
  np.testing.assert_allclose(first, want, rtol=1e-12)
  assert int(info_n.num_steps) == 0 and int(info_f.num_steps) == 0
  # alignment_k = w'(φ_k)⟨∇L_k, ∇L_meta⟩, and first_order = -α · alignment.
  for info in (info_n, info_f):
    np.testing.assert_allclose(info.alignment, want / -alpha, rtol=1e-12)


def test_t5_damping_limit_is_gradient_alignment(x64):
  """T5: δ·hypergrad_CG(δ) → -⟨g, ∇L_k⟩ as δ → ∞ (δ = 1e6·λ_max); at moderate δ the damped
  CG and dense solves equal -G (A + δI)⁻¹ g. A traced δ compiles once for all values."""
  ref = np_ridge(W0)
  big = 1e6 * lam_range(ref["a"])[1]
  traces = []

  @fast_jit
  def run(theta, w, data, meta, d):
    traces.append(d)
    cg = ridge_hg(theta, w, data, meta, "cg", maxiter=P, damping=d)
    return cg, ridge_hg(theta, w, data, meta, "exact", damping=d)[0]

  args = jax_ridge(ref)
  (hg, info), _ = run(*args, np.float64(big))
  np.testing.assert_allclose(big * np.asarray(hg), -ref["grads_k"] @ ref["g_v"], rtol=1e-5)
  assert bool(info.converged)
  for delta in (0.05, 3.0):
    (hg, _), exact = run(*args, np.float64(delta))
    want = -ref["grads_k"] @ np.linalg.solve(ref["a"] + delta * np.eye(P), ref["g_v"])
    np.testing.assert_allclose(hg, want, rtol=1e-8)
    np.testing.assert_allclose(exact, want, rtol=1e-11)
  assert len(traces) == 1


def test_t6_sign_oracles(x64):
  """T6: L_k ≡ L_meta gives -g_vᵀA⁻¹g_v < 0; L_k = -c·L_meta gives +c·g_vᵀA⁻¹g_v > 0; an L_k
  independent of θ gives exactly 0."""
  x0, y0 = RIDGE["inner"][:2]
  xv, yv = RIDGE["meta"]
  a0 = x0.T @ x0 / len(y0) + LAM * np.eye(P)
  b0 = x0.T @ y0 / len(y0)
  cv, bv = xv.T @ xv / len(yv), xv.T @ yv / len(yv)
  w = 1.0
  cs = (1.0, -0.05)  # L_k = c·L_meta
  thetas, wants = [], []
  for c in cs:
    a = a0 + w * c * cv
    assert np.linalg.eigvalsh(a)[0] > 0  # A stays SPD
    theta = np.linalg.solve(a, b0 + w * c * bv)
    g_v = cv @ theta - bv
    thetas.append(theta)
    wants.append(-c * g_v @ np.linalg.solve(a, g_v))
  theta_free = np.linalg.solve(a0, b0)

  @fast_jit
  def run(thetas, theta_free, x0, y0, xv, yv):
    def prim(theta):
      return sq_loss(theta, x0, y0) + 0.5 * LAM * theta @ theta

    def hg(inner, theta, method):
      return implicit.hypergradient(
        inner, ridge_meta, theta, jnp.float64(w), meta_args=(xv, yv), method=method, maxiter=P
      )[0]

    signed = []
    for c, theta in zip(cs, thetas):

      def inner(theta, w, c=c):
        return prim(theta) + w * c * sq_loss(theta, xv, yv)

      signed.append([hg(inner, theta, m) for m in ("exact", "cg")])

    def inner_free(theta, w):  # the auxiliary term does not depend on θ
      return prim(theta) + w * jnp.sum(yv**2)

    free = [hg(inner_free, theta_free, m) for m in ("exact", "cg", "neumann", "first_order")]
    return signed, free

  signed, free = run(*map(jnp.asarray, (np.stack(thetas), theta_free, x0, y0, xv, yv)))
  for c, want, hgs in zip(cs, wants, signed):
    assert np.sign(want) == -np.sign(c)
    for hg in hgs:
      assert float(hg) == pytest.approx(want, rel=1e-8)
  for hg in free:
    assert float(hg) == 0.0


# ---------------------------------------------------------------------------------------------
# T9: JAX plumbing, on a non-quadratic (logistic + quartic) problem away from stationarity.
# ---------------------------------------------------------------------------------------------

N_FLAT = 15


def make_logistic(seed=1):
  rng = np.random.default_rng(seed)
  x0, x1, xv = (rng.normal(size=(n, N_FLAT)) for n in (30, 40, 50))
  y0, y1, yv = (np.sign(rng.normal(size=n)) for n in (30, 40, 50))
  theta = 0.3 * rng.normal(size=N_FLAT)
  return dict(inner=(x0, y0, x1, y1), meta=(xv, yv), theta=theta, h=np.array([0.7, -1.2]))


LOGISTIC = make_logistic()


def logistic(theta, x, y):
  return jnp.mean(jax.nn.softplus(-y * (x @ theta)))


def log_inner_flat(theta, h, data):
  """Logistic primary + h[0]·logistic aux + ½e^{h[1]}‖θ‖² + a quartic (nonzero 3rd derivatives)."""
  x0, y0, x1, y1 = data
  return (
    logistic(theta, x0, y0)
    + h[0] * logistic(theta, x1, y1)
    + 0.5 * jnp.exp(h[1]) * theta @ theta
    + 0.01 * jnp.sum(theta**4)
  )


def log_meta_flat(theta, xv, yv):
  return logistic(theta, xv, yv)


def log_tree(theta):
  return {"emb": theta[:12].reshape(4, 3), "bias": theta[12:]}


def log_untree(params):
  return jnp.concatenate([params["emb"].reshape(-1), params["bias"]])


def h_tree(h):
  return {"aux": h[0], "log_l2": h[1]}


def log_inner_tree(params, h, data):
  return log_inner_flat(log_untree(params), jnp.stack([h["aux"], h["log_l2"]]), data)


def log_meta_tree(params, xv, yv):
  return log_meta_flat(log_untree(params), xv, yv)


def jax_logistic():
  """(θ, h, inner data, meta data) as float64 JAX arrays."""
  data = tuple(map(jnp.asarray, LOGISTIC["inner"]))
  meta = tuple(map(jnp.asarray, LOGISTIC["meta"]))
  return jnp.asarray(LOGISTIC["theta"]), jnp.asarray(LOGISTIC["h"]), data, meta


def dense_ift(theta, h, data, meta, damping=0.0):
  """-(∂²L_in/∂h∂θ)ᵀ (H + δI)⁻¹ g from jax.hessian / jax.jacobian and a dense solve."""
  hess = jax.hessian(log_inner_flat)(theta, h, data)
  cross = jax.jacobian(jax.grad(log_inner_flat, 0), 1)(theta, h, data)  # (n, |h|)
  g = jax.grad(log_meta_flat)(theta, *meta)
  v = jnp.linalg.solve(hess + damping * jnp.eye(theta.shape[0]), g)
  return dict(hg=-cross.T @ v, hess=hess, g=g, v=v, alignment=cross.T @ g)


def test_t9_hvp_equals_dense_hessian_and_is_linear_symmetric(x64):
  """T9: hvp = jax.hessian(f)(θ) @ v; linear and symmetric; linearize_hvp = hvp; dict layout."""
  rng = np.random.default_rng(5)
  u, v = (jnp.asarray(rng.normal(size=N_FLAT)) for _ in range(2))

  @fast_jit
  def run(theta, h, data, u, v):
    hvp = lambda x: implicit.hvp(log_inner_flat, theta, x, h, data)  # noqa: E731
    grad, matvec = implicit.linearize_hvp(log_inner_flat, theta, h, data)
    tree = implicit.hvp(log_inner_tree, log_tree(theta), log_tree(v), h_tree(h), data)
    return dict(
      hess=jax.hessian(log_inner_flat)(theta, h, data),
      grad_ref=jax.grad(log_inner_flat)(theta, h, data),
      hu=hvp(u),
      hv=hvp(v),
      combo=hvp(2.5 * u - 0.7 * v),
      grad=grad,
      lin_u=matvec(u),
      lin_v=matvec(v),
      tree=log_untree(tree),
    )

  theta, h, data, _ = jax_logistic()
  o = run(theta, h, data, u, v)
  tight = dict(rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(o["hv"], o["hess"] @ v, **tight)
  np.testing.assert_allclose(o["hu"], o["hess"] @ u, **tight)
  np.testing.assert_allclose(o["combo"], 2.5 * o["hu"] - 0.7 * o["hv"], **tight)
  assert float(u @ o["hv"]) == pytest.approx(float(v @ o["hu"]), rel=1e-12)
  np.testing.assert_allclose(o["grad"], o["grad_ref"], rtol=1e-13)
  np.testing.assert_allclose(o["lin_u"], o["hu"], **tight)
  np.testing.assert_allclose(o["lin_v"], o["hv"], **tight)
  np.testing.assert_allclose(o["tree"], o["hv"], **tight)


def test_t9_mixed_partial_equals_jacobian_contraction(x64):
  """T9: mixed_partial (vjp and jvp, flat and dict, several vectors at once) = the contraction
  of jax.jacobian(jax.grad(L_in, 0), 1) with each v; "jvp" column norms = that Jacobian's
  column norms, "vjp" gives None; unknown modes and methods raise ValueError."""
  rng = np.random.default_rng(6)
  u, v = (jnp.asarray(rng.normal(size=N_FLAT)) for _ in range(2))

  def stack(t):
    return jnp.stack([t["aux"], t["log_l2"]])

  @fast_jit
  def run(theta, h, data, u, v):
    cross = jax.jacobian(jax.grad(log_inner_flat, 0), 1)(theta, h, data)
    modes = ("vjp", "jvp")
    flat = [implicit.mixed_partial(log_inner_flat, theta, h, (v, u), (data,), m) for m in modes]
    tree = []
    for m in modes:
      outs, cols = implicit.mixed_partial(
        log_inner_tree, log_tree(theta), h_tree(h), (log_tree(v), log_tree(u)), (data,), m
      )
      tree.append((tuple(map(stack, outs)), None if cols is None else stack(cols)))
    return cross, flat, tree

  theta, h, data, _ = jax_logistic()
  cross, flat, tree = run(theta, h, data, u, v)
  cross_np = np.asarray(cross)  # (n, |h|)
  for (outs, cols), mode in zip(flat + tree, ("vjp", "jvp") * 2):
    assert len(outs) == 2
    np.testing.assert_allclose(outs[0], cross_np.T @ np.asarray(v), rtol=1e-12, err_msg=mode)
    np.testing.assert_allclose(outs[1], cross_np.T @ np.asarray(u), rtol=1e-12, err_msg=mode)
    if mode == "vjp":
      assert cols is None
    else:
      np.testing.assert_allclose(cols, np.linalg.norm(cross_np, axis=0), rtol=1e-12)
  with pytest.raises(ValueError, match="mixed partial mode"):
    implicit.mixed_partial(log_inner_flat, theta, h, (v,), (data,), "fwd")

  with pytest.raises(ValueError, match="method must be one of"):
    implicit.hypergradient(log_inner_flat, log_meta_flat, theta, h, method="lbfgs")


def test_t9_hypergradient_matches_dense_formula_with_diagnostics(x64):
  """T9: hypergradient = dense IFT formula (δ = 0 and 0.3) away from stationarity; every
  HypergradInfo field against its definition (CG, exact, Neumann)."""
  theta, h, data, meta = jax_logistic()
  hess0 = fast_jit(jax.hessian(log_inner_flat))(theta, h, data)
  alpha = 1.0 / lam_range(np.asarray(hess0))[1]
  cases = [("exact", 1, 0.0), ("cg", N_FLAT, 0.3)]

  @fast_jit
  def run(theta, h, data, meta):
    kw = dict(inner_args=(data,), meta_args=meta)
    out = [
      implicit.hypergradient(
        log_inner_flat, log_meta_flat, theta, h, method=m, maxiter=j, damping=d, **kw
      )
      for m, j, d in cases
    ]
    neumann = implicit.hypergradient(
      log_inner_flat, log_meta_flat, theta, h, method="neumann", maxiter=3, alpha=alpha, **kw
    )
    dense = [dense_ift(theta, h, data, meta, d) for d in (0.0, 0.3)]
    refs = dict(
      meta=log_meta_flat(theta, *meta),
      inner_grad=jnp.linalg.norm(jax.grad(log_inner_flat)(theta, h, data)),
    )
    return out, neumann, dense, refs

  out, (_, n_info), dense, refs = run(theta, h, data, meta)
  for (method, _, d), (hg, info) in zip(cases, out):
    ref = dense[0] if d == 0.0 else dense[1]
    msg = f"{method} δ={d}"
    np.testing.assert_allclose(
      hg, ref["hg"], rtol=1e-11 if method == "exact" else 1e-8, err_msg=msg
    )
    assert float(info.meta_loss) == pytest.approx(float(refs["meta"]), rel=1e-13)
    assert float(info.meta_grad_norm) == pytest.approx(float(jnp.linalg.norm(ref["g"])), rel=1e-12)
    assert float(info.inner_grad_norm) == pytest.approx(float(refs["inner_grad"]), rel=1e-12)
    assert float(info.inner_grad_norm) > 1e-2  # not stationary: the formula is still evaluated
    assert float(info.solution_norm) == pytest.approx(float(jnp.linalg.norm(ref["v"])), rel=1e-8)
    assert bool(info.converged) and not bool(info.negative_curvature), msg
    assert float(info.relative_residual) < 1e-9, msg
    np.testing.assert_allclose(info.alignment, ref["alignment"], rtol=1e-12, err_msg=msg)
    np.testing.assert_array_equal(info.column_norms, np.zeros(2))
    if method == "cg":
      assert 1 <= int(info.num_steps) <= N_FLAT

  # Neumann: relative_residual is the true ‖Hv - g‖ / ‖g‖ of its (inexact) v.
  hess, g = np.asarray(dense[0]["hess"]), np.asarray(dense[0]["g"])
  s = sum(np.linalg.matrix_power(np.eye(N_FLAT) - alpha * hess, j) for j in range(4))
  v = alpha * s @ g
  want_rel = np.linalg.norm(hess @ v - g) / np.linalg.norm(g)
  assert float(n_info.relative_residual) == pytest.approx(want_rel, rel=1e-10)
  assert float(n_info.solution_norm) == pytest.approx(np.linalg.norm(v), rel=1e-12)
  assert int(n_info.num_steps) == 3


def test_t9_zero_meta_gradient_gives_zero_not_nan(x64):
  """T9: g = 0 (meta loss flat in θ) gives a zero hypergradient and residual, no NaN."""
  methods = ("cg", "neumann", "first_order", "exact")

  @fast_jit
  def run(theta, h, data):
    return [
      implicit.hypergradient(
        log_inner_flat, lambda t: 0.0 * jnp.sum(t), theta, h, inner_args=(data,), method=m
      )
      for m in methods
    ]

  theta, h, data, _ = jax_logistic()
  for method, (hg, info) in zip(methods, run(theta, h, data)):
    np.testing.assert_array_equal(hg, np.zeros(2), err_msg=method)
    assert float(info.relative_residual) == 0.0 and float(info.solution_norm) == 0.0
    assert bool(info.converged) and not bool(info.negative_curvature)


def test_t9_float32_hypergradient_keeps_dtype():
  """T9: without x64 (the production setting), CG and exact run under jit in float32, keep
  float32 outputs, and stay close to the float64 closed form."""
  ref = np_ridge(W0)
  args = (
    jnp.asarray(ref["theta"], jnp.float32),
    jnp.asarray(W0, jnp.float32),
    tuple(jnp.asarray(a, jnp.float32) for a in RIDGE["inner"]),
    tuple(jnp.asarray(a, jnp.float32) for a in RIDGE["meta"]),
  )
  methods = ("cg", "exact")
  kw = dict(maxiter=P, tol=1e-5)
  out = fast_jit(lambda *a: [ridge_hg(*a, m, **kw) for m in methods])(*args)
  for m, (hg, info) in zip(methods, out):
    assert hg.dtype == jnp.float32, m
    assert all(x.dtype in (jnp.float32, jnp.int32, jnp.bool_) for x in info), m
    np.testing.assert_allclose(hg, ref["hg"], rtol=1e-3, err_msg=m)


def compare_infos(a, b, msg):
  """HypergradInfo fields equal; tree-shaped fields (alignment, column_norms) compared raveled."""
  for name, x, y in zip(a._fields, a, b):
    x, y = ravel_pytree(x)[0], ravel_pytree(y)[0]
    np.testing.assert_allclose(y, x, rtol=1e-10, atol=1e-15, err_msg=f"{msg}: {name}")


def test_t9_jit_equals_no_jit(x64):
  """T9: jit = no jit for cg, neumann and first_order ("exact" is only jax.hessian + solve),
  on the ridge problem with damping."""
  ref = np_ridge(W0)
  methods = ("cg", "neumann", "first_order")
  kw = dict(maxiter=4, alpha=0.2, damping=0.1)
  args = jax_ridge(ref)
  eager = [ridge_hg(*args, m, **kw) for m in methods]
  jitted = fast_jit(lambda *args: [ridge_hg(*args, m, **kw) for m in methods])(*args)
  for m, (e_hg, e_info), (j_hg, j_info) in zip(methods, eager, jitted):
    np.testing.assert_allclose(j_hg, e_hg, rtol=1e-12, err_msg=m)
    compare_infos(e_info, j_info, m)
  # And the damped CG value is right: -G (A + δI)⁻¹ g after 4 steps of CG.
  want = -ref["grads_k"] @ np_cg(ref["a"] + 0.1 * np.eye(P), ref["g_v"], 4)[0]
  np.testing.assert_allclose(eager[0][0], want, rtol=1e-10)


def test_t9_pytree_layout_invariance(x64):
  """T9: dict params / dict hparams give the same hypergradient and diagnostics as flat arrays,
  for every method, on the non-quadratic problem."""
  theta, h, data, meta = jax_logistic()
  methods = ("cg", "neumann", "first_order", "exact")

  @fast_jit
  def run(theta, h, data, meta):
    kw = dict(inner_args=(data,), meta_args=meta, maxiter=4, alpha=0.2, damping=0.1)
    flat = [
      implicit.hypergradient(log_inner_flat, log_meta_flat, theta, h, method=m, **kw)
      for m in methods
    ]
    tree = [
      implicit.hypergradient(
        log_inner_tree, log_meta_tree, log_tree(theta), h_tree(h), method=m, **kw
      )
      for m in methods
    ]
    return flat, tree

  flat, tree = run(theta, h, data, meta)
  for m, (f_hg, f_info), (t_hg, t_info) in zip(methods, flat, tree):
    assert set(t_hg) == {"aux", "log_l2"}
    np.testing.assert_allclose([t_hg["aux"], t_hg["log_l2"]], f_hg, rtol=1e-11, err_msg=m)
    compare_infos(f_info, t_info, m)


# ---------------------------------------------------------------------------------------------
# T9: cg_solve, neumann_solve, power_iteration on explicit matrices.
# ---------------------------------------------------------------------------------------------


def spd(n, cond, seed=0):
  """A random SPD matrix with eigenvalues geomspace(1, cond) and a random right-hand side."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return q @ np.diag(np.geomspace(1.0, cond, n)) @ q.T, rng.normal(size=n)


def np_cg(a, b, k):
  """Textbook CG from x0 = 0 for k iterations; returns x and the recursive residual norm."""
  x, r, p = np.zeros_like(b), b.copy(), b.copy()
  rs = r @ r
  for _ in range(k):
    ap = a @ p
    alpha = rs / (p @ ap)
    x = x + alpha * p
    r = r - alpha * ap
    rs_new = r @ r
    p = r + rs_new / rs * p
    rs = rs_new
  return x, np.sqrt(rs)


def test_t9_cg_equals_numpy_cg_iterate_by_iterate(x64):
  """T9: cg_solve with maxiter = k equals a NumPy CG after k iterations, k = 1..n (flat and
  dict right-hand sides)."""
  n = 7
  a, b = spd(n, 50.0)

  def split(v):
    return {"u": v[:3], "i": v[3:].reshape(2, 2)}

  def merge(t):
    return jnp.concatenate([t["u"], t["i"].reshape(-1)])

  @fast_jit
  def run(a, b):
    matvec = lambda v: a @ v  # noqa: E731
    flat = [implicit.cg_solve(matvec, b, maxiter=k, tol=0.0) for k in range(1, n + 1)]
    tree = implicit.cg_solve(lambda t: split(matvec(merge(t))), split(b), maxiter=3, tol=0.0)
    return flat, merge(tree.x)

  flat, tree_x = run(jnp.asarray(a), jnp.asarray(b))
  for k, res in zip(range(1, n + 1), flat):
    x, rn = np_cg(a, b, k)
    np.testing.assert_allclose(res.x, x, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.residual_norm, rn, rtol=1e-6, atol=1e-9 * np.linalg.norm(b))
    assert int(res.num_steps) == k and not bool(res.negative_curvature)
  np.testing.assert_allclose(flat[-1].x, np.linalg.solve(a, b), rtol=1e-9)
  np.testing.assert_allclose(tree_x, np_cg(a, b, 3)[0], rtol=1e-10)


INDEF = np.array([1.0, 1.0, -1.0])  # diag(A); b chosen so that p₀ᵀAp₀ > 0 but p₁ᵀAp₁ < 0
B_INDEF = np.array([1.0, 0.5, 0.5])


def test_t9_cg_edge_cases(x64):
  """T9: b = 0 → x = 0, converged, 0 steps; A = -I (or 0) → x = 0 with negative curvature;
  maxiter=1 on a hard system → not converged; damping solves (A + δI)x = b."""
  n = 6
  a, b = spd(n, 1e4, seed=3)
  deltas = (0.5, 10.0)

  @fast_jit
  def run(a, b):
    matvec = lambda v: a @ v  # noqa: E731
    return dict(
      zero_b=implicit.cg_solve(matvec, jnp.zeros(n), maxiter=5),
      neg=implicit.cg_solve(lambda v: -v, b, maxiter=5),
      flat=implicit.cg_solve(lambda v: 0.0 * v, b, maxiter=5),
      neg_damped=implicit.cg_solve(lambda v: -v, b, maxiter=5, damping=3.0),
      one=implicit.cg_solve(matvec, b, maxiter=1, tol=1e-8),
      loose=implicit.cg_solve(matvec, b, maxiter=n, tol=1e-4),
      damped=[implicit.cg_solve(matvec, b, maxiter=4 * n, tol=1e-13, damping=d) for d in deltas],
      indefinite=implicit.cg_solve(
        lambda v: jnp.asarray(INDEF) * v, jnp.asarray(B_INDEF), maxiter=5
      ),
      eps_hi=implicit.cg_solve(matvec, b, maxiter=5, curvature_eps=2e4),
      eps_lo=implicit.cg_solve(matvec, b, maxiter=2, tol=0.0, curvature_eps=0.5),
    )

  o = run(jnp.asarray(a), jnp.asarray(b))
  res = o["zero_b"]
  np.testing.assert_array_equal(res.x, np.zeros(n))
  assert bool(res.converged) and int(res.num_steps) == 0 and float(res.residual_norm) == 0.0
  assert not bool(res.negative_curvature)
  for key in ("neg", "flat"):  # first pᵀAp <= 0: freeze at x = 0, not NaN / inf
    res = o[key]
    np.testing.assert_array_equal(res.x, np.zeros(n), err_msg=key)
    assert bool(res.negative_curvature) and not bool(res.converged) and int(res.num_steps) == 0
  np.testing.assert_allclose(o["neg_damped"].x, b / 2.0, rtol=1e-13)  # (-I + 3I) x = b
  assert not bool(o["neg_damped"].negative_curvature)

  res = o["one"]
  assert not bool(res.converged) and int(res.num_steps) == 1
  np.testing.assert_allclose(res.x, np_cg(a, b, 1)[0], rtol=1e-12)
  res = o["loose"]  # stops early on the tolerance
  assert bool(res.converged) and float(res.residual_norm) <= 1e-4 * np.linalg.norm(b)

  # Indefinite A whose curvature turns negative on the second step: keep the first iterate.
  res = o["indefinite"]
  assert bool(res.negative_curvature) and not bool(res.converged) and int(res.num_steps) == 1
  np.testing.assert_allclose(res.x, np_cg(np.diag(INDEF), B_INDEF, 1)[0], rtol=1e-13)
  # The spectrum of A is [1, 1e4]: curvature_eps = 2e4 stops at once, 0.5 changes nothing.
  res = o["eps_hi"]
  assert bool(res.negative_curvature) and int(res.num_steps) == 0
  np.testing.assert_array_equal(res.x, np.zeros(n))
  np.testing.assert_allclose(o["eps_lo"].x, np_cg(a, b, 2)[0], rtol=1e-12)
  assert not bool(o["eps_lo"].negative_curvature)

  for delta, res in zip(deltas, o["damped"]):
    ad = a + delta * np.eye(n)
    np.testing.assert_allclose(res.x, np.linalg.solve(ad, b), rtol=1e-9)
    assert bool(res.converged)
    true_res = np.linalg.norm(b - ad @ np.asarray(res.x))
    assert float(res.residual_norm) == pytest.approx(true_res, abs=1e-10 * np.linalg.norm(b))


def test_t9_neumann_solve_matches_series_with_damping(x64):
  """T9: neumann_solve = α Σ_{j<=J} (I - α(A + δI))^j b; J = 0 gives α b."""
  n = 5
  a, b = spd(n, 5.0, seed=4)
  cases = ((0.0, 0.15, 0), (0.0, 0.15, 6), (0.4, 0.1, 9))

  @fast_jit
  def run(a, b):
    return [
      implicit.neumann_solve(lambda v: a @ v, b, num_terms=j, alpha=al, damping=d)
      for d, al, j in cases
    ]

  for (delta, alpha, j), res in zip(cases, run(jnp.asarray(a), jnp.asarray(b))):
    m = np.eye(n) - alpha * (a + delta * np.eye(n))
    want = alpha * sum(np.linalg.matrix_power(m, i) for i in range(j + 1)) @ b
    np.testing.assert_allclose(res.x, want, rtol=1e-12)
    want_last = alpha * np.linalg.norm(np.linalg.matrix_power(m, j) @ b)
    assert float(res.last_term_norm) == pytest.approx(want_last, rel=1e-12)


def test_t9_power_iteration_finds_largest_abs_eigenvalue(x64):
  """T9: power_iteration returns max |λ| of known symmetric matrices (also a negative dominant
  eigenvalue), and λ_max of the ridge Hessian through linearize_hvp with a dict start vector."""
  rng = np.random.default_rng(7)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  spectra = ([5.0, 2.0, 1.0, 0.5, -1.5, 0.1], [-7.0, 3.0, 1.0, -2.0, 0.5, 0.2])
  ref = np_ridge(W0)

  @fast_jit
  def run(mats, v0, theta, w, data):
    known = [implicit.power_iteration(lambda x, a=a: a @ x, v0, num_iters=100) for a in mats]
    hp = {"aligned": w[0], "noise": w[1]}
    _, matvec = implicit.linearize_hvp(ridge_inner_tree, to_tree(theta), hp, data)
    ridge, _ = implicit.power_iteration(matvec, to_tree(jnp.ones(P)), num_iters=200)
    return known, ridge

  mats = jnp.asarray(np.stack([q @ np.diag(e) @ q.T for e in spectra]))
  theta, w, data, _ = jax_ridge(ref)
  known, ridge = run(mats, jnp.asarray(rng.normal(size=6)), theta, w, data)
  for eigs, (lam, v) in zip(spectra, known):
    top = int(np.argmax(np.abs(eigs)))
    assert float(lam) == pytest.approx(abs(eigs[top]), rel=1e-10)
    assert float(jnp.linalg.norm(v)) == pytest.approx(1.0, rel=1e-12)
    assert abs(float(v @ q[:, top])) == pytest.approx(1.0, rel=1e-10)
  assert float(ridge) == pytest.approx(lam_range(ref["a"])[1], rel=1e-8)
