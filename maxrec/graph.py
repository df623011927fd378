"""The normalised user-item graph and LightGCN propagation (docs/method.md §2.2, §2.4).

The bipartite adjacency A = [[0, R], [R^T, 0]] over N = users + items nodes is stored once,
as CSR of its 2E non-zeros (each training pair twice). Edge weights are a separate array so
that edge-dropout views only change weights, never shapes:

    w_e = m_e / sqrt(deg(row_e) * deg(col_e)),   deg = row sums of the kept edges m,

with isolated nodes at degree 0 getting weight 0, not NaN. `propagate` computes
`(1/(L+1)) sum_{l=0..L} Â^l E0`.

The product Â x has two kernels:
- "bcsr": JAX's CSR kernel (a native CPU/GPU call), wrapped in a `custom_vjp` whose backward
  pass is again Â g, because Â is symmetric. Reverse mode and forward-over-reverse
  (`jax.jvp` of `jax.grad`, used by the Hessian-vector products) are fast; direct forward
  mode (`jax.jvp` of a loss) is not available through a `custom_vjp`.
- "segment": gather + `segment_sum`, plain JAX autodiff in every mode; the kernel to use
  under SPMD sharding and for reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import sparse

KERNELS = ("bcsr", "segment")


@struct.dataclass
class Graph:
  """Static structure of the symmetric bipartite adjacency, CSR order.

  Attributes:
    row, col: [2E] int32 node ids of each non-zero (users first, then items at n_users + i).
    indptr: [N + 1] int32 CSR row pointers.
    edge: [2E] int32 index of the undirected training edge each non-zero comes from.
    n_users, n_items: static sizes.
  """

  row: jax.Array
  col: jax.Array
  indptr: jax.Array
  edge: jax.Array
  n_users: int = struct.field(pytree_node=False)
  n_items: int = struct.field(pytree_node=False)

  @property
  def n_nodes(self) -> int:
    return self.n_users + self.n_items

  @property
  def n_edges(self) -> int:
    """Undirected training edges E (the length of a dropout mask)."""
    return self.row.shape[0] // 2


def build_graph(pairs: np.ndarray, n_users: int, n_items: int) -> Graph:
  """The graph of training pairs `[E, 2]` (user, item); only these become edges."""
  pairs = np.asarray(pairs, np.int64)
  e = np.arange(len(pairs))
  row = np.concatenate([pairs[:, 0], pairs[:, 1] + n_users])
  col = np.concatenate([pairs[:, 1] + n_users, pairs[:, 0]])
  edge = np.concatenate([e, e])
  order = np.lexsort((col, row))
  n = n_users + n_items
  indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=n))])
  return Graph(
    row=jnp.asarray(row[order], jnp.int32),
    col=jnp.asarray(col[order], jnp.int32),
    indptr=jnp.asarray(indptr, jnp.int32),
    edge=jnp.asarray(edge[order], jnp.int32),
    n_users=n_users,
    n_items=n_items,
  )


def edge_weights(graph: Graph, keep: jax.Array | None = None, dtype=jnp.float32) -> jax.Array:
  """Symmetric-normalised weights of the (possibly edge-dropped) graph.

  Args:
    graph: the structure.
    keep: [E] 0/1 float mask of kept undirected edges, or None for the full graph.
  Returns:
    [2E] weights of `dtype` in CSR order; degrees are recomputed from the kept edges.
  """
  m = jnp.ones(graph.row.shape, dtype) if keep is None else keep[graph.edge]
  m = jax.lax.stop_gradient(m.astype(dtype))
  deg = jax.ops.segment_sum(m, graph.row, graph.n_nodes, indices_are_sorted=True)
  inv_sqrt = jnp.where(deg > 0, jax.lax.rsqrt(jnp.maximum(deg, 1.0)), 0.0)
  return m * inv_sqrt[graph.row] * inv_sqrt[graph.col]


def degrees(graph: Graph) -> jax.Array:
  """[N] training degree of every node (users first)."""
  ones = jnp.ones(graph.row.shape, jnp.float32)
  return jax.ops.segment_sum(ones, graph.row, graph.n_nodes, indices_are_sorted=True)


def _csr_matmul(weights, col, indptr, x, n):
  return sparse.BCSR((weights.astype(x.dtype), col, indptr), shape=(n, n)) @ x


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _spmm_bcsr(weights, col, indptr, row, n, x):
  return _csr_matmul(weights, col, indptr, x, n)


def _spmm_bcsr_fwd(weights, col, indptr, row, n, x):
  return _csr_matmul(weights, col, indptr, x, n), (weights, col, indptr, row, x)


def _spmm_bcsr_bwd(n, res, g):
  weights, col, indptr, row, x = res
  # Â is symmetric, so the cotangent of x is Â g: one more CSR product, not a scatter.
  dx = _csr_matmul(weights, col, indptr, g, n)
  dw = jnp.sum(g[row] * x[col], axis=-1).astype(weights.dtype)  # pruned when unused
  return dw, None, None, None, dx


_spmm_bcsr.defvjp(_spmm_bcsr_fwd, _spmm_bcsr_bwd)


def spmm(graph: Graph, weights: jax.Array, x: jax.Array, kernel: str = "bcsr") -> jax.Array:
  """Â x for node features x `[N, d]`, with Â given by `weights` `[2E]`."""
  if kernel == "bcsr":
    return _spmm_bcsr(weights, graph.col, graph.indptr, graph.row, graph.n_nodes, x)
  if kernel == "segment":
    msg = x[graph.col] * weights[:, None].astype(x.dtype)
    return jax.ops.segment_sum(msg, graph.row, graph.n_nodes, indices_are_sorted=True)
  raise ValueError(f"unknown propagation kernel {kernel!r}; use one of {', '.join(KERNELS)}.")


def propagate(
  graph: Graph,
  weights: jax.Array,
  emb: jax.Array,
  num_layers: int,
  *,
  kernel: str = "bcsr",
  include_ego: bool = True,
) -> jax.Array:
  """LightGCN layer mean `(1/(L+1)) sum_{l=0..L} Â^l emb` for emb `[N, d]`.

  With `include_ego=False` the mean runs over layers 1..L only (SimGCL).
  """
  acc = emb if include_ego else jnp.zeros_like(emb)
  x = emb
  for _ in range(num_layers):
    x = spmm(graph, weights, x, kernel)
    acc = acc + x
  return acc / (num_layers + (1 if include_ego else 0) or 1)


def dense_adjacency(graph: Graph, weights: jax.Array) -> jax.Array:
  """Dense `[N, N]` Â, for tests on small graphs."""
  n = graph.n_nodes
  return jnp.zeros((n, n), weights.dtype).at[graph.row, graph.col].add(weights)


def split_nodes(graph: Graph, emb: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Node table `[N, d]` -> (users `[U, d]`, items `[I, d]`)."""
  return emb[: graph.n_users], emb[graph.n_users :]
