"""Ways to take the top K of blocked scores on this backend, against the bare matmul.

  python -m experiments.topk_bench            # Gowalla shape: 29,858 users x 40,981 items

The evaluation's cost beyond the score matmul is the top K. This measures, over all users
in blocks (one `lax.scan`, as `maxrec.metrics` does), the bare matmul and four ways of
taking the top K of each block's scores: `lax.top_k` (what MAXRec uses), `lax.approx_max_k`,
`lax.top_k` on row splits of the block, and an exact two-level top-k (per-chunk maxima, the
K best chunks, then `top_k` over their members). Medians of 3 runs after compilation.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

flags.DEFINE_integer("users", 29858, "Users.")
flags.DEFINE_integer("items", 40981, "Items.")
flags.DEFINE_integer("dim", 64, "Embedding dimension.")
flags.DEFINE_integer("block", 1024, "Users per block.")
flags.DEFINE_integer("k", 50, "K.")
flags.DEFINE_integer("chunk", 32, "Chunk size of the two-level top-k.")


def two_level_top_k(scores: jax.Array, k: int, chunk: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-k values and ids of `scores` [b, n] by way of the k best chunks.

  Any element outside the k chunks with the largest maxima is at most the k-th largest
  chunk maximum, so it cannot beat k elements. Chunks are gathered in id order, so ties
  break towards the lower id, as `lax.top_k` does.
  """
  b, n = scores.shape
  m = -(-n // chunk) * chunk
  if m // chunk < k:  # fewer chunks than k: nothing to gain
    return jax.lax.top_k(scores, k)
  s3 = jnp.pad(scores, ((0, 0), (0, m - n)), constant_values=-jnp.inf).reshape(b, -1, chunk)
  _, best = jax.lax.top_k(s3.max(-1), k)
  best = jnp.sort(best, axis=1)
  cand = jnp.take_along_axis(s3, best[:, :, None], axis=1).reshape(b, k * chunk)
  values, pos = jax.lax.top_k(cand, k)
  ids = jnp.take_along_axis(best, pos // chunk, axis=1) * chunk + pos % chunk
  return values, ids


def main(argv):
  del argv
  fv = flags.FLAGS
  rng = np.random.default_rng(0)
  users = jnp.asarray(rng.normal(size=(fv.users, fv.dim)), jnp.float32)
  items = jnp.asarray(rng.normal(size=(fv.items, fv.dim)), jnp.float32)
  n_blocks = fv.users // fv.block
  blocks = jnp.arange(n_blocks * fv.block).reshape(n_blocks, fv.block)
  k = fv.k

  def timed(reduce_block) -> float:
    run = jax.jit(
      lambda: jax.lax.scan(
        lambda acc, b: (acc + reduce_block(users[b] @ items.T), None), jnp.zeros(()), blocks
      )[0]
    )
    jax.block_until_ready(run())
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      times.append(time.perf_counter() - t0)
    return float(np.median(times))

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
  print(f"{fv.users} users x {fv.items} items, d={fv.dim}, blocks of {fv.block}, K={k}")
  base = None
  for name, fn in variants.items():
    t = timed(fn)
    base = base or t
    print(f"{name:<32}{t:8.3f} s  {t / base:5.2f}x the matmul")


if __name__ == "__main__":
  app.run(main)
