"""Backbones as Flax modules used functionally: MF and LightGCN (docs/method.md §2.2).

`model.init_params(key)` gives `{"user": [U, d], "item": [I, d]}` (the ego table E0 = θ); `model.apply({"params": params}, graph, weights)` gives the final user and item
embeddings used for scoring, ŷ_ui = <e_u, e_i>.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxrec.graph import Graph, propagate, split_nodes


class MF(nn.Module):
  """Matrix factorisation: the final embeddings are the ego embeddings."""

  num_users: int
  num_items: int
  features: int = 64
  init_std: float = 0.1

  def setup(self):
    init = nn.initializers.normal(self.init_std)
    self.user = self.param("user", init, (self.num_users, self.features))
    self.item = self.param("item", init, (self.num_items, self.features))

  def ego(self):
    """The ego tables E0: (users `[U, d]`, items `[I, d]`)."""
    return self.user, self.item

  def __call__(self, graph: Graph | None = None, weights: jax.Array | None = None):
    """Returns (users `[U, d]`, items `[I, d]`); the graph is unused."""
    del graph, weights
    return self.user, self.item

  def init_params(self, key: jax.Array) -> dict:
    """`{"user": [U, d], "item": [I, d]}` drawn from N(0, init_std^2)."""
    return self.init(key, method="ego")["params"]


class LightGCN(MF):
  """LightGCN: the mean of L propagation layers over the training graph, layer 0 included."""

  num_layers: int = 3
  kernel: str = "bcsr"

  def __call__(self, graph: Graph, weights: jax.Array):
    """Returns the propagated (users `[U, d]`, items `[I, d]`) for edge weights `[2E]`."""
    emb = jnp.concatenate([self.user, self.item])
    return split_nodes(graph, propagate(graph, weights, emb, self.num_layers, kernel=self.kernel))


def make_model(config, num_users: int, num_items: int) -> MF:
  """The backbone named by `config.model` (a `ModelConfig`)."""
  kw = dict(
    num_users=num_users,
    num_items=num_items,
    features=config.embedding_dim,
    init_std=config.resolved_init_std,
  )
  if config.model == "mf":
    return MF(**kw)
  if config.model == "lightgcn":
    return LightGCN(**kw, num_layers=config.num_layers, kernel=config.propagation)
  raise ValueError(f"unknown model {config.model!r}; use mf or lightgcn.")
