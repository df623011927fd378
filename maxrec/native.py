"""The CPU top-k kernel (`maxrec/top_k.cc`): built on first use, called through XLA's FFI.

Full-ranking evaluation on the CPU spends most of its time selecting the top K of every
user's 41k scores, where XLA's `lax.top_k` is slow. `top_k.cc` does that selection in two
passes over each row (the second from cache) and returns exactly `lax.top_k`'s values and
ids, ties and NaNs included. It is compiled once per machine and jaxlib version with the
system's C++ compiler against the FFI headers that ship in jaxlib, cached, and registered
as the XLA custom call `maxrec_top_k`.

Nothing depends on it: without a compiler (or with `MAXREC_NATIVE_TOP_K=0`) `available()`
is False, a warning says why once, and evaluation uses the pure-XLA two-level top-k.

Environment:
  MAXREC_NATIVE_TOP_K: "0" never builds or uses the kernel.
  MAXREC_CACHE: where the built library is kept, beside downloaded data sets (default
    ~/.cache/maxrec).
  CXX: the C++ compiler, possibly with arguments ("ccache g++"; default g++, then c++,
    then clang++).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

from maxrec.datasets import default_cache_dir

TARGET = "maxrec_top_k"
SOURCE = pathlib.Path(__file__).with_name("top_k.cc")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-march=native")

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "why": str, "path": str (set once, under _lock)


def _compiler() -> list[str] | None:
  """The compiler command: $CXX when set (an error if it is not found), else the first
  of g++, c++, clang++ on the PATH."""
  if os.environ.get("CXX"):
    cmd = shlex.split(os.environ["CXX"])
    if not cmd or shutil.which(cmd[0]) is None:
      raise FileNotFoundError(f"CXX={os.environ['CXX']!r}: no such compiler on the PATH")
    return [shutil.which(cmd[0]), *cmd[1:]]
  for name in ("g++", "c++", "clang++"):
    if shutil.which(name):
      return [shutil.which(name)]
  return None


def _cpu_id() -> str:
  """What -march=native depends on: the machine and its CPU's feature flags."""
  flags = ""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        flags = line
        break
  except OSError:
    pass
  return platform.machine() + flags


def library_path(cxx: list[str]) -> pathlib.Path:
  """Where the library built by `cxx` from the current source for this machine lives."""
  h = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), " ".join(cxx).encode(),
               " ".join(FLAGS).encode(), _cpu_id().encode()):  # fmt: skip
    h.update(part)
  return pathlib.Path(default_cache_dir()).expanduser() / f"top_k-{h.hexdigest()[:16]}.so"


def _build(cxx: list[str], out: pathlib.Path) -> None:
  """Compiles the kernel to `out` (atomically: concurrent builds cannot tear it)."""
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out.parent)
  os.close(fd)
  cmd = [*cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
      raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
    os.chmod(tmp, 0o755)  # mkstemp's 0600 would hide it from other users of the cache
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _load() -> None:
  if os.environ.get("MAXREC_NATIVE_TOP_K", "1") == "0":
    _state.update(ok=False, why="MAXREC_NATIVE_TOP_K=0")
    return
  try:
    cxx = _compiler()
    if cxx is None:
      _state.update(ok=False, why="no C++ compiler found (set CXX, or install g++)")
      return
    path = library_path(cxx)
    for attempt in range(2):
      if attempt or not path.exists():  # a cached library that does not load is rebuilt
        t0 = time.perf_counter()
        _build(cxx, path)
        logging.info("built the CPU top-k kernel in %.1f s: %s", time.perf_counter() - t0, path)
      try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        break
      except OSError:
        if attempt:
          raise
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MaxrecTopK), platform="cpu")
  except Exception as e:  # noqa: BLE001 -- any failure means: use the XLA path
    _state.update(ok=False, why=f"{type(e).__name__}: {e}")
    return
  _state.update(ok=True, why="", path=str(path))


def available() -> bool:
  """Whether the CPU top-k kernel is built and registered (builds it on the first call).

  When it cannot be, a warning gives the reason once and the answer stays False.
  """
  with _lock:
    if "ok" not in _state:
      _load()
      if not _state["ok"]:
        logging.warning(
          "CPU top-k kernel unavailable (%s); evaluation uses the XLA two-level top-k, "
          "which is slower on the CPU (the same results for NaN-free scores).",
          _state["why"],
        )
    return _state["ok"]


def why() -> str:
  """Why the kernel is unavailable ("" when it is available or not yet tried)."""
  return _state.get("why", "")


def top_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k(scores, k)` on the CPU by the native kernel.

  The same values and ids as `lax.top_k`: ties go to the lower id, and floats are ordered
  totally (-NaN < -inf < -0 < +0 < +inf < +NaN), as XLA orders them.

  Args:
    scores: [..., n] float32, n >= k.
    k: how many to return per row.
  Returns:
    (values [..., k] float32, ids [..., k] int32), best first.
  """
  if jax.default_backend() != "cpu":
    raise RuntimeError(
      f"the native top-k runs on the CPU only (backend: {jax.default_backend()}); "
      "use jax.lax.top_k there."
    )
  if not available():
    raise RuntimeError(f"the CPU top-k kernel is unavailable: {why()}")
  if scores.dtype != jnp.float32 or scores.ndim < 1:
    raise TypeError(f"native top_k takes float32 scores [..., n], got {scores.dtype}{scores.shape}")
  if not 1 <= k <= scores.shape[-1]:
    raise ValueError(f"k={k} must be between 1 and the {scores.shape[-1]} columns")
  out = scores.shape[:-1] + (k,)
  call = jax.ffi.ffi_call(
    TARGET,
    (jax.ShapeDtypeStruct(out, jnp.float32), jax.ShapeDtypeStruct(out, jnp.int32)),
    vmap_method="broadcast_all",  # the kernel takes any leading dimensions as rows
  )
  return tuple(call(scores, k=np.int64(k)))
