"""The CPU top-k kernel against `lax.top_k`, bit for bit, and the native kernels' build
and fallback (the fused MF step is tested in sparse_test.py)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxrec import metrics, native, sparse


@pytest.fixture(scope="module", autouse=True)
def kernel():
  """Where a C++ compiler exists (CI, this machine), the kernel must build: a failure is
  an error, not a skip."""
  if native._compiler() is None:
    pytest.skip("no C++ compiler: the kernel cannot be built here")
  assert native.available(), native.why()


def _same(got, want):
  """Equal values (as bits: NaNs, signed zeros) and equal ids."""
  np.testing.assert_array_equal(
    np.asarray(got[0]).view(np.int32), np.asarray(want[0]).view(np.int32)
  )
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize(
  "rows,cols,k",
  [
    (37, 40981, 50),
    (16, 1000, 1),
    (9, 192, 5),
    (7, 130, 50),
    (6, 128, 50),
    (5, 64, 64),
    (3, 50, 50),
    (4, 7, 3),
  ],  # fmt: skip
)
def test_equals_lax_top_k_on_masked_scores_with_ties(rows, cols, k):
  rng = np.random.default_rng(rows * cols + k)
  s = np.round(rng.normal(size=(rows, cols)) * 3).astype(np.float32)  # many ties
  s[:, ::11] = -np.inf  # masked items
  s[0] = 0.0  # a row of ties
  s[1, : max(cols - k + 2, 1)] = -np.inf  # fewer than k finite scores
  s = jnp.asarray(s)
  _same(jax.jit(lambda x: native.top_k(x, k))(s), jax.lax.top_k(s, k))


def test_orders_floats_totally_like_xla():
  bits = np.array([0xFFC00000, 0x7FC00000, 0x3F800000, 0xFF800000, 0x80000000, 0x00000000,
                   0x7F800000, 0xBF800000], np.uint32)  # fmt: skip  # -nan nan 1 -inf -0 0 inf -1
  s = jnp.asarray(np.tile(bits.view(np.float32), (3, 9)))
  for k in (1, 8, 40, 72):
    _same(native.top_k(s, k), jax.lax.top_k(s, k))


def test_leading_dimensions_and_vmap():
  s = jax.random.normal(jax.random.key(0), (2, 3, 300))
  _same(native.top_k(s, 10), jax.lax.top_k(s, 10))
  _same(jax.vmap(lambda x: native.top_k(x, 10))(s), jax.lax.top_k(s, 10))


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="k=9 must be between 1 and the 8 columns"):
    native.top_k(jnp.zeros((2, 8)), 9)
  with pytest.raises(TypeError, match="float32"):
    native.top_k(jnp.zeros((2, 8), jnp.int32), 2)


def test_other_float_types_evaluate_without_the_kernel():
  """The kernel takes float32 only: bfloat16 embeddings evaluate by the XLA path."""
  rng = np.random.default_rng(1)
  pairs = np.unique(np.stack([rng.integers(0, 40, 900), rng.integers(0, 300, 900)], 1), axis=0)
  es = metrics.build_eval_set(pairs[::4], np.delete(pairs, np.s_[::4], 0), 40)
  users = jnp.asarray(np.round(rng.normal(size=(40, 4)) * 2), jnp.bfloat16)
  items = jnp.asarray(np.round(rng.normal(size=(300, 4)) * 2), jnp.bfloat16)
  assert metrics.top_k_method(users, items, es.users) == "two_level"
  got = metrics.evaluate(users, items, es)
  assert got == metrics.evaluate(users.astype(jnp.float32), items.astype(jnp.float32), es)


def test_evaluation_is_the_same_with_every_top_k():
  rng = np.random.default_rng(0)
  n_users, n_items = 300, 2000
  pairs = np.unique(
    np.stack([rng.integers(0, n_users, 20000), rng.integers(0, n_items, 20000)], 1), axis=0
  )
  held = rng.random(len(pairs)) < 0.2
  es = metrics.build_eval_set(pairs[held], pairs[~held], n_users, batch_size=128)
  # Small integers: exact scores whatever the matmul's blocking, and many ties.
  users = jnp.asarray(np.round(rng.normal(size=(n_users, 8)) * 2), jnp.float32)
  items = jnp.asarray(np.round(rng.normal(size=(n_items, 8)) * 2), jnp.float32)
  assert metrics.top_k_method(users, items, es.users) == "native"
  results = {m: metrics.evaluate(users, items, es, top_k=m) for m in metrics.TOP_K_METHODS}
  assert results["native"] == results["lax"] == results["two_level"]
  assert results["native"]["recall@50"] > 0
  with pytest.raises(ValueError, match="top_k='heap'"):
    metrics.evaluate(users, items, es, top_k="heap")


def test_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
  broken = tmp_path / "broken-cxx"
  broken.write_text("#!/bin/sh\necho 'no such compiler today' >&2\nexit 1\n")
  broken.chmod(0o755)
  monkeypatch.setattr(native, "_state", {})
  monkeypatch.setenv("CXX", f"{broken} -v")  # a command with arguments
  monkeypatch.setenv("MAXREC_CACHE", str(tmp_path / "cache"))
  with caplog.at_level("WARNING"):
    assert not native.available()
  assert "no such compiler today" in native.why()
  assert "two-level top-k" in caplog.text
  users, items = jnp.ones((3, 2)), jnp.ones((10, 2))
  assert metrics.top_k_method(users, items) == "two_level"
  with pytest.raises(RuntimeError, match="no such compiler today"):
    native.top_k(items, 2)
  assert not list((tmp_path / "cache").iterdir())  # no partial library left behind
  assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700  # created private
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  monkeypatch.setattr(native, "_state", {})
  assert not native.available() and "no-such-compiler-here" in native.why()
  assert sparse.resolve_kernel("auto", sharded=False) == "xla"  # training falls back too
  with pytest.raises(RuntimeError, match="no-such-compiler-here"):
    sparse.resolve_kernel("native", sharded=False)
  monkeypatch.setenv("MAXREC_NATIVE", "0")
  monkeypatch.setattr(native, "_state", {})
  assert not native.available() and native.why() == "MAXREC_NATIVE=0"


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_a_cache_others_may_write_to_is_refused(monkeypatch, tmp_path, mode):
  """A library loaded from a folder that others can write to would run their code."""
  cache = tmp_path / "shared"
  cache.mkdir()
  cache.chmod(mode)
  monkeypatch.setattr(native, "_state", {})
  monkeypatch.setenv("MAXREC_CACHE", str(cache))
  assert not native.available()
  assert f"{cache} is writable by group or others (mode {oct(mode)})" in native.why()
  assert f"chmod 700 {cache}" in native.why() and not list(cache.iterdir())
  with pytest.raises(RuntimeError, match="writable by group or others"):
    sparse.resolve_kernel("native", sharded=False)


def test_a_cached_library_that_does_not_load_is_rebuilt(tmp_path):
  """(In a new process: a process registers the kernel once.)"""
  code = (
    "from maxrec import native\n"
    "path = native.library_path(native._compiler())\n"
    "path.parent.mkdir(parents=True)\n"
    "path.write_bytes(b'not a shared library')  # as after a crash mid-copy\n"
    "assert native.available(), native.why()\n"
    "assert path.stat().st_size > 1000 and path.stat().st_mode & 0o077 == 0\n"
    "print('rebuilt')\n"
  )
  env = {**os.environ, "MAXREC_CACHE": str(tmp_path / "cache")}
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert r.returncode == 0 and "rebuilt" in r.stdout, r.stderr[-2000:]
