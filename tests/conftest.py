"""Shared fixtures. Tests run on the CPU; float64 is enabled per test where it matters."""

import os

import jax
import pytest

ML100K = os.path.normpath(
  os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "ml-100k", "u.data")
)


@pytest.fixture
def x64():
  """Runs a test with float64 enabled, restoring the previous setting afterwards."""
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", old)


@pytest.fixture
def ml100k_path():
  path = os.environ.get("MAXREC_ML100K", ML100K)
  if not os.path.exists(path):
    pytest.skip(f"ML-100K not found at {path} (set MAXREC_ML100K to its u.data)")
  return path


# The longest tests start first, so that the two workers share the rest around them
# instead of one of them finishing its queue on a minute-long test.
LONGEST_FIRST = (
  "sharding_test.py::test_eight_device_mesh_equals_single_device",
  "multihost_test.py::",
  "checkpoint_test.py::test_sigkill_then_resume",
  "notebook_test.py::",
  "experiments_test.py::test_bench_writes_every_figure",
)


def pytest_collection_modifyitems(items):
  def rank(item):
    return next((i for i, k in enumerate(LONGEST_FIRST) if k in item.nodeid), len(LONGEST_FIRST))

  items.sort(key=rank)
