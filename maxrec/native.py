"""MAXRec's native CPU kernels, built on first use and called through XLA's FFI.

Two hot spots of a CPU run are slow as XLA ops and are written in C++:

- `top_k.cc`: the top K of every user's scores in full-ranking evaluation, where XLA's
  `lax.top_k` is slow. Two passes over each row (the second from cache); exactly
  `lax.top_k`'s values and ids, ties and NaNs included.
- `bpr_step.cc`: one row-sparse MF-BPR step (lazy Adam or SGD): the gather, BPR gradient,
  sum over repeated rows and in-place update of the batch's rows, fused. The XLA version
  (`maxrec.sparse`) runs them as a dozen single-threaded passes over [3B, d] buffers.

Both are compiled into one library, once per machine and jaxlib version, with the
system's C++ compiler against the FFI headers that ship in jaxlib, cached, and registered
as the XLA custom calls `maxrec_top_k` and `maxrec_bpr_step`.

Nothing depends on them: without a compiler (or with `MAXREC_NATIVE=0`) `available()` is
False, a warning says why once, and evaluation and training use their pure-XLA paths.

Environment:
  MAXREC_NATIVE: "0" never builds or uses the kernels (MAXREC_NATIVE_TOP_K=0, its
    earlier name, too).
  MAXREC_CACHE: where the built library is kept, beside downloaded data sets (default
    ~/.cache/maxrec). It is created private (0700); a folder that group or others may
    write to, or that another user owns, is refused (the XLA path is used, with a warning
    naming the folder).
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

from maxrec.cache import check_private, default_cache_dir

# XLA custom-call target -> the handler symbol that the library exports.
TARGETS = {"maxrec_top_k": "MaxrecTopK", "maxrec_bpr_step": "MaxrecBprStep"}
SOURCES = tuple(pathlib.Path(__file__).with_name(f) for f in ("top_k.cc", "bpr_step.cc"))
HEADERS = (pathlib.Path(__file__).with_name("parallel.h"),)  # shared work sharing
# -fno-math-errno lets the compiler vectorise sqrt (the Adam update).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-march=native", "-fno-math-errno")
ENV = "MAXREC_NATIVE"

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
  """Where the library built by `cxx` from the current sources for this machine lives."""
  h = hashlib.sha256()
  for part in (*(f.read_bytes() for f in SOURCES + HEADERS), jaxlib.__version__.encode(),
               " ".join(cxx).encode(), " ".join(FLAGS).encode(), _cpu_id().encode()):  # fmt: skip
    h.update(part)
  return pathlib.Path(default_cache_dir()).expanduser() / f"native-{h.hexdigest()[:16]}.so"


def _build(cxx: list[str], out: pathlib.Path) -> None:
  """Compiles the kernels to `out` (atomically: concurrent builds cannot tear it)."""
  fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out.parent)
  os.close(fd)
  cmd = [*cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
      raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
    os.chmod(tmp, 0o700)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _load() -> None:
  for env in (ENV, "MAXREC_NATIVE_TOP_K"):  # the second: its name before the MF kernel
    if os.environ.get(env, "1") == "0":
      _state.update(ok=False, why=f"{env}=0")
      return
  try:
    cxx = _compiler()
    if cxx is None:
      _state.update(ok=False, why="no C++ compiler found (set CXX, or install g++)")
      return
    path = library_path(cxx)
    check_private(path.parent)
    for attempt in range(2):
      if attempt or not path.exists():  # a cached library that does not load is rebuilt
        t0 = time.perf_counter()
        _build(cxx, path)
        logging.info("built the native CPU kernels in %.1f s: %s", time.perf_counter() - t0, path)
      try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        break
      except OSError:
        if attempt:
          raise
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except Exception as e:  # noqa: BLE001 -- any failure means: use the XLA path
    _state.update(ok=False, why=f"{type(e).__name__}: {e}")
    return
  _state.update(ok=True, why="", path=str(path))


def available() -> bool:
  """Whether the native kernels are built and registered (builds them on the first call).

  When it cannot be, a warning gives the reason once and the answer stays False.
  """
  with _lock:
    if "ok" not in _state:
      _load()
      if not _state["ok"]:
        logging.warning(
          "native CPU kernels unavailable (%s); evaluation uses the XLA two-level top-k "
          "and MF training XLA's row-sparse step, which are slower on the CPU (the same "
          "results for NaN-free scores, up to float rounding in training).",
          _state["why"],
        )
    return _state["ok"]


def why() -> str:
  """Why the kernels are unavailable ("" when they are available or not yet tried)."""
  return _state.get("why", "")


def _require(what: str, instead: str) -> None:
  if jax.default_backend() != "cpu":
    raise RuntimeError(
      f"{what} runs on the CPU only (backend: {jax.default_backend()}); {instead}."
    )
  if not available():
    raise RuntimeError(f"{what} is unavailable: {why()}")


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
  _require("the native top-k", "use jax.lax.top_k there")
  if scores.dtype != jnp.float32 or scores.ndim < 1:
    raise TypeError(f"native top_k takes float32 scores [..., n], got {scores.dtype}{scores.shape}")
  if not 1 <= k <= scores.shape[-1]:
    raise ValueError(f"k={k} must be between 1 and the {scores.shape[-1]} columns")
  out = scores.shape[:-1] + (k,)
  call = jax.ffi.ffi_call(
    "maxrec_top_k",
    (jax.ShapeDtypeStruct(out, jnp.float32), jax.ShapeDtypeStruct(out, jnp.int32)),
    vmap_method="broadcast_all",  # the kernel takes any leading dimensions as rows
  )
  return tuple(call(scores, k=np.int64(k)))


def bpr_step(
  table, scratch, ids, count, scale, *, adam: bool, lr: float, l2_reg: float,
  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
):  # fmt: skip
  """One fused row-sparse MF-BPR step on the CPU (`bpr_step.cc`), in place.

  The same step as `maxrec.sparse.sparse_mf_step` (adam=True) or `sparse_sgd_step`,
  up to float rounding: the loss `mean softplus(s_uj - s_ui) + l2_reg/(2B) Σ|e|²` of the
  batch's rows, its gradient summed over repeated rows, and the update of each touched
  row. A step whose loss is not finite writes nothing.

  Args:
    table: [n, 3d] float32 rows of (θ, m, v) for Adam, [n, d] of θ for SGD. Updated in
      place when the caller donates it (inside a loop it is the loop's carry).
    scratch: [n] int32 work table (its contents do not matter), returned for reuse.
    ids: [3B] int32 row ids: users, positives, negatives (`sparse.batch_rows`).
    count: int32 scalar, Adam's step count before this step (t = count + 1).
    scale: float32 scalar multiplying the loss (1; a test hook injects NaN with it).
    adam, lr, l2_reg, b1, b2, eps: the optimizer (optax.adam's meaning of eps).
  Returns:
    (table, scratch, [3] float32 (loss, bpr, l2)); the loss is scaled, the parts not.
  """
  _require("the native MF-BPR step", "use maxrec.sparse's XLA step there")
  if table.dtype != jnp.float32 or table.ndim != 2:
    raise TypeError(f"native bpr_step takes a float32 [n, w] table, got {table.dtype}{table.shape}")
  if scratch.dtype != jnp.int32 or scratch.shape != table.shape[:1]:
    raise TypeError(f"scratch must be int32 [{table.shape[0]}], got {scratch.dtype}{scratch.shape}")
  if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim != 1 or ids.shape[0] % 3:
    raise TypeError(f"ids must be integer [3B] (users, pos, neg), got {ids.dtype}{ids.shape}")
  if jnp.ndim(count) or jnp.ndim(scale):
    raise TypeError(
      f"count and scale must be scalars, got shapes {jnp.shape(count)}, {jnp.shape(scale)}"
    )
  call = jax.ffi.ffi_call(
    "maxrec_bpr_step",
    (
      jax.ShapeDtypeStruct(table.shape, jnp.float32),
      jax.ShapeDtypeStruct(scratch.shape, jnp.int32),
      jax.ShapeDtypeStruct((3,), jnp.float32),
    ),
    input_output_aliases={0: 0, 1: 1},
  )
  return call(
    table, scratch, ids.astype(jnp.int32), jnp.asarray(count, jnp.int32),
    jnp.asarray(scale, jnp.float32), adam=np.int64(adam), lr=np.float32(lr),
    l2_reg=np.float32(l2_reg), b1=np.float32(b1), b2=np.float32(b2), c1=np.float32(1 - b1),
    c2=np.float32(1 - b2), eps=np.float32(eps),
  )  # fmt: skip
