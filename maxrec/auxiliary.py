"""Self-supervised auxiliary tasks, registered by name (docs/method.md §2.4).

A task is one function `loss_fn(ctx: AuxContext) -> AuxOutput` returning per-anchor losses;
`register(name, side)` adds it to the registry that `--aux_tasks` selects from. The inner
objective reduces each task to its mean over valid anchors (or weights anchors one by one,
[A6]).

Built-in tasks:
  user_sgl     (user side) InfoNCE between two edge-dropout views of the graph (SGL-ED)
  item_sgl     (item side) the same, on the batch's positive items
  user_simgcl  (user side) InfoNCE between two noise-perturbed views (SimGCL)
  item_simgcl  (item side) the same, on the batch's positive items
  item_cooc    (item side) item-item co-occurrence contrast: (i, j) liked by one user

Views are static-shape functions of an explicit PRNG key: the dropout mask is a float
vector over the E training edges. For MF the views are one propagation step of the ego
table through the dropped graph, inside the auxiliary loss only [A2].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from maxrec import graph as graph_lib
from maxrec import losses

SIDES = ("user", "item")


class AuxOutput(NamedTuple):
  """Per-anchor losses of one task on one batch.

  Attributes:
    losses: [A] loss of each anchor (0 where invalid).
    ids: [A] the anchor's user or item id (for per-entity weights).
    valid: [A] bool, False for padding and duplicate anchors.
  """

  losses: jax.Array
  ids: jax.Array
  valid: jax.Array


@dataclasses.dataclass(frozen=True)
class AuxSettings:
  """Static settings the tasks read (from `AuxConfig` and `ModelConfig`)."""

  temperature: float = 0.2
  edge_drop: float = 0.1
  view_layers: int = 1
  simgcl_eps: float = 0.1
  kernel: str = "bcsr"
  max_users: int | None = None  # static cap on a batch's distinct users (None: batch size)
  max_items: int | None = None  # static cap on a batch's distinct positive items
  anchors: int | None = None  # only the first `anchors` triples of a batch give anchors


class AuxContext:
  """Everything a task may use for one batch; shared views are built once per trace.

  Args:
    params: {"user": [U, d], "item": [I, d]} ego embeddings.
    final: (users [U, d], items [I, d]) the backbone's scoring embeddings.
    batch: {"user", "pos", "neg", "pos2"}: [B] int32 each.
    graph: the training graph.
    key: PRNG key of this step; the views draw from it and from nothing else.
    settings: `AuxSettings`.
  """

  def __init__(self, params, final, batch, graph, key, settings: AuxSettings):
    self.params, self.final, self.batch = params, final, batch
    self.graph, self.key, self.settings = graph, key, settings

  @property
  def user_cap(self) -> int:
    return min(self.graph.n_users, self.settings.max_users or self.graph.n_users)

  @property
  def item_cap(self) -> int:
    return min(self.graph.n_items, self.settings.max_items or self.graph.n_items)

  @property
  def ego(self) -> jax.Array:
    """The ego table as nodes, [N, d] (users first)."""
    return jnp.concatenate([self.params["user"], self.params["item"]])

  @functools.cached_property
  def edge_dropout_views(self) -> tuple[jax.Array, jax.Array]:
    """Two SGL-ED views `[N, d]`: propagation through two independently dropped graphs."""
    s, g = self.settings, self.graph
    keys = jax.random.split(jax.random.fold_in(self.key, 1), 2)
    views = []
    for k in keys:
      keep = jax.random.bernoulli(k, 1.0 - s.edge_drop, (g.n_edges,)).astype(jnp.float32)
      w = graph_lib.edge_weights(g, keep, dtype=self.ego.dtype)
      views.append(graph_lib.propagate(g, w, self.ego, s.view_layers, kernel=s.kernel))
    return views[0], views[1]

  @functools.cached_property
  def noise_views(self) -> tuple[jax.Array, jax.Array]:
    """Two SimGCL views `[N, d]`: noise ε sign(x) ⊙ unit(U(0,1)) added at every layer,
    layer 0 left out of the mean. With 0 view layers (MF) the ego table is perturbed."""
    s, g = self.settings, self.graph
    base = graph_lib.edge_weights(g, dtype=self.ego.dtype)
    keys = jax.random.split(jax.random.fold_in(self.key, 2), 2)
    views = []
    for k in keys:
      layer_keys = jax.random.split(k, max(s.view_layers, 1))
      if s.view_layers == 0:
        views.append(_perturb(self.ego, layer_keys[0], s.simgcl_eps))
        continue
      x, acc = self.ego, jnp.zeros_like(self.ego)
      for lk in layer_keys:
        x = _perturb(graph_lib.spmm(g, base, x, s.kernel), lk, s.simgcl_eps)
        acc = acc + x
      views.append(acc / s.view_layers)
    return views[0], views[1]


def _perturb(x: jax.Array, key: jax.Array, eps: float) -> jax.Array:
  noise = losses.cosine_normalize(jax.random.uniform(key, x.shape, x.dtype))
  return x + eps * jnp.sign(x) * noise


@dataclasses.dataclass(frozen=True)
class AuxTask:
  name: str
  side: str
  loss_fn: Callable[[AuxContext], AuxOutput]


_REGISTRY: dict[str, AuxTask] = {}


def register(name: str, side: str):
  """Decorator adding `loss_fn(ctx) -> AuxOutput` to the registry under `name`."""
  if side not in SIDES:
    raise ValueError(f"side must be one of {SIDES}, got {side!r}")

  def deco(fn):
    if name in _REGISTRY:
      raise ValueError(f"auxiliary task {name!r} is already registered")
    _REGISTRY[name] = AuxTask(name, side, fn)
    return fn

  return deco


def get(name: str) -> AuxTask:
  if name not in _REGISTRY:
    raise ValueError(f"unknown auxiliary task {name!r}; registered: {', '.join(names())}.")
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def _contrast(view1, view2, ids, offset, cap, temperature) -> AuxOutput:
  """InfoNCE over the unique `ids` of a batch (at most `cap`), rows `offset + id` of two
  node views. In-batch cost is quadratic in `cap`, so the Trainer sets it just above the
  most distinct ids a batch has (it counts any batch that would exceed it)."""
  uniq, valid = losses.unique_ids(ids, min(ids.shape[0], cap))  # ids: the anchor triples
  z1, z2 = view1[offset + uniq], view2[offset + uniq]
  return AuxOutput(losses.info_nce(z1, z2, temperature, valid), uniq, valid)


def _anchor_ids(ctx: AuxContext, column: str) -> jax.Array:
  """The ids of one side of the batch's anchor triples (the first `anchors`; batches are
  shuffled, so they are a uniform sample)."""
  return ctx.batch[column][: ctx.settings.anchors]


@register("user_sgl", "user")
def user_sgl(ctx: AuxContext) -> AuxOutput:
  """Users of the batch, contrasted across the two edge-dropout views."""
  v1, v2 = ctx.edge_dropout_views
  return _contrast(v1, v2, _anchor_ids(ctx, "user"), 0, ctx.user_cap, ctx.settings.temperature)


@register("item_sgl", "item")
def item_sgl(ctx: AuxContext) -> AuxOutput:
  """Positive items of the batch, contrasted across the two edge-dropout views."""
  v1, v2 = ctx.edge_dropout_views
  g = ctx.graph
  ids = _anchor_ids(ctx, "pos")
  return _contrast(v1, v2, ids, g.n_users, ctx.item_cap, ctx.settings.temperature)


@register("user_simgcl", "user")
def user_simgcl(ctx: AuxContext) -> AuxOutput:
  """Users of the batch, contrasted across two noise-perturbed views (SimGCL)."""
  v1, v2 = ctx.noise_views
  return _contrast(v1, v2, _anchor_ids(ctx, "user"), 0, ctx.user_cap, ctx.settings.temperature)


@register("item_simgcl", "item")
def item_simgcl(ctx: AuxContext) -> AuxOutput:
  """Positive items of the batch, contrasted across the two noise-perturbed views."""
  v1, v2 = ctx.noise_views
  ids = _anchor_ids(ctx, "pos")
  return _contrast(v1, v2, ids, ctx.graph.n_users, ctx.item_cap, ctx.settings.temperature)


@register("item_cooc", "item")
def item_cooc(ctx: AuxContext) -> AuxOutput:
  """Item i against item j that the same user also liked (Item2Vec-like), in-batch negatives.

  Rows whose second positive is the anchor itself (users with one item) are invalid, and a
  column that shares the anchor's item or positive id is masked as a false negative.
  """
  items = ctx.final[1]
  i, j = ctx.batch["pos"], ctx.batch["pos2"]
  z1, z2 = losses.cosine_normalize(items[i]), losses.cosine_normalize(items[j])
  logits = (z1 @ z2.T) / ctx.settings.temperature
  n = i.shape[0]
  same = (i[:, None] == i[None, :]) | (j[:, None] == j[None, :]) | (i[:, None] == j[None, :])
  collide = same & ~jnp.eye(n, dtype=bool)
  valid = i != j
  # One row per anchor item: later duplicates of an anchor are not anchors again.
  first = jnp.argmax(i[:, None] == i[None, :], axis=1) == jnp.arange(n)
  valid = valid & first
  logits = jnp.where(collide | ~valid[None, :], losses.MASK_LOGIT, logits)
  per = -jnp.diagonal(jax.nn.log_softmax(logits, axis=-1))
  return AuxOutput(jnp.where(valid, per, 0.0), i, valid)
