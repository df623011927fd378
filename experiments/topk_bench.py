"""Ways to take the top K of blocked scores on this backend, against the bare matmul.

  python -m experiments.topk_bench            # Gowalla shape: 29,858 users x 40,981 items

The evaluation's cost beyond the score matmul is the top K. This measures, over all users
in blocks (one `lax.scan`, as `maxrec.metrics` does), the bare matmul and the ways of
taking the top K of each block's scores: `lax.top_k`, `lax.approx_max_k`, `lax.top_k` on
row splits of the block, the exact two-level top-k (`maxrec.metrics.two_level_top_k`:
per-chunk maxima, the K best chunks, then `top_k` over their members) on the item table
as it is and padded with zero rows to whole chunks (MAXRec's CPU path without a C++
compiler), and the C++ kernel of `maxrec/top_k.cc` (its CPU path) when it builds. Then
`lax.top_k` alone at several widths (`--widths`), one row per user: the two calls that the
two-level top-k makes. Medians of 3 runs after compilation.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from maxrec import native
from maxrec.metrics import two_level_top_k

flags.DEFINE_integer("users", 29858, "Users.")
flags.DEFINE_integer("items", 40981, "Items.")
flags.DEFINE_integer("dim", 64, "Embedding dimension.")
flags.DEFINE_integer("block", 1024, "Users per block.")
flags.DEFINE_integer("k", 50, "K.")
flags.DEFINE_integer("chunk", 32, "Chunk size of the two-level top-k.")
flags.DEFINE_list(
  "widths", ["400", "1281", "1600", "5120"], "Widths at which lax.top_k alone is timed."
)


def _median_time(fn, arg, repeats: int = 3) -> float:
  """Median seconds of `fn(arg)` after a first (compiling) call."""
  jax.block_until_ready(fn(arg))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(arg))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv):
  del argv
  fv = flags.FLAGS
  rng = np.random.default_rng(0)
  users = jnp.asarray(rng.normal(size=(fv.users, fv.dim)), jnp.float32)
  items = jnp.asarray(rng.normal(size=(fv.items, fv.dim)), jnp.float32)
  n_blocks = fv.users // fv.block
  blocks = jnp.arange(n_blocks * fv.block).reshape(n_blocks, fv.block)
  k = fv.k

  def timed(reduce_block, table=items) -> float:
    run = jax.jit(
      lambda table: jax.lax.scan(
        lambda acc, b: (acc + reduce_block(users[b] @ table.T), None), jnp.zeros(()), blocks
      )[0]
    )
    return _median_time(run, table)

  padded = jnp.pad(items, ((0, -fv.items % fv.chunk), (0, 0)))  # as maxrec.metrics does

  s = users[:256] @ items.T
  s = jnp.round(s * 4).at[:, ::7].set(-jnp.inf)  # many ties and masked items
  want, got = jax.lax.top_k(s, k), two_level_top_k(s, k, fv.chunk)
  assert all(bool((a == b).all()) for a, b in zip(want, got)), "two-level top-k differs"

  variants = {
    "bare matmul": lambda x: x.sum(),
    "lax.top_k": lambda x: jax.lax.top_k(x, k)[0].sum(),
    "lax.approx_max_k": lambda x: jax.lax.approx_max_k(x, k)[0].sum(),
    "lax.top_k on 2 row splits": lambda x: sum(
      jax.lax.top_k(p, k)[0].sum() for p in jnp.split(x, 2)
    ),
    f"two-level top-k (chunk {fv.chunk})": lambda x: two_level_top_k(x, k, fv.chunk)[0].sum(),
  }
  # The C++ kernel of maxrec/top_k.cc, as evaluation uses it on the CPU.
  if jax.default_backend() == "cpu" and native.available():
    got = native.top_k(s, k)
    assert all(bool((a == b).all()) for a, b in zip(want, got)), "native top-k differs"
    variants["native top-k kernel (top_k.cc)"] = lambda x: native.top_k(x, k)[0].sum()
  on_padded = {  # the item table padded to whole chunks: no padded copy of each block
    f"two-level, padded table (chunk {fv.chunk})": lambda x: two_level_top_k(
      x, k, fv.chunk, n_valid=fv.items
    )[0].sum()
  }
  print(f"{fv.users} users x {fv.items} items, d={fv.dim}, blocks of {fv.block}, K={k}")
  base = None
  for name, fn in [*variants.items(), *on_padded.items()]:
    t = timed(fn, padded if name in on_padded else items)
    base = base or t
    print(f"{name:<36}{t:8.3f} s  {t / base:5.2f}x the matmul")
  # What the two-level top-k cannot avoid: two lax.top_k calls, one row per user, over
  # the chunk maxima (items / chunk wide) and over the K best chunks' members (K x chunk).
  print(f"\nlax.top_k alone, {fv.users} rows (one per user), K={k}")
  for w in map(int, fv.widths):
    x = jnp.asarray(rng.normal(size=(fv.users, w)), jnp.float32)
    t = _median_time(jax.jit(lambda x: jax.lax.top_k(x, k)[0].sum()), x)
    print(f"  width {w:>6}{t:8.3f} s")


if __name__ == "__main__":
  app.run(main)
