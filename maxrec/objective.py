"""The inner and outer objectives of the bilevel problem (docs/method.md §2.3–2.5).

    L_in(θ, φ; B, ξ) = L_bpr(θ; B) + Σ_k w_k(φ) L_k(θ; B, ξ) + Ω(θ; B)
    L_meta(θ; B_m)   = L_bpr(θ; B_m)                                      [A5]
                    or mean_(u,i)∈B_m CE(softmax_j s_uj, i), training items masked

`aux_params` φ is a traced array (or pytree), so changing the weights never retraces. How
φ maps to weights depends on the weighting scheme:

  none         no auxiliary term
  fixed, meta  w_k = softplus(φ_k)             (fixed: φ never changes; meta: learned, §2.5)
  uncertainty  w_k = exp(-s_k), plus Σ_k s_k   (Kendall, Gal & Cipolla 2018; φ = s is
                                                learned with θ by the inner optimizer)

With the optional weighting network [A6], φ is the network's parameters and each anchor
gets its own weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maxrec import auxiliary, losses
from maxrec import graph as graph_lib
from maxrec.graph import Graph


def softplus_inverse(w) -> np.ndarray:
  """φ with softplus(φ) = w, stable for large w. softplus⁻¹(0.1) = -2.25217."""
  w = np.asarray(w, np.float64)
  return np.where(w > 20, w, np.log(np.expm1(np.minimum(w, 20))))


def init_aux_params(weighting: str, init_weights: tuple[float, ...]) -> jax.Array:
  """Unconstrained φ for the initial weights (s = -log w for uncertainty)."""
  w = np.asarray(init_weights, np.float64)
  if weighting == "uncertainty":
    return jnp.asarray(-np.log(w), jnp.float32)
  return jnp.asarray(softplus_inverse(w), jnp.float32)


def aux_weights(weighting: str, aux_params) -> tuple[jax.Array, jax.Array]:
  """(weights [K], penalty) for scalar weighting schemes."""
  if weighting == "uncertainty":
    return jnp.exp(-aux_params), jnp.sum(aux_params)
  return jax.nn.softplus(aux_params), jnp.zeros((), aux_params.dtype)


class Objective:
  """Builds the inner and meta losses of a model.

  Args:
    model: an `MF` or `LightGCN` module.
    l2_reg: λ of Ω.
    tasks: names of the auxiliary tasks (registered in `maxrec.auxiliary`).
    weighting: one of none, fixed, uncertainty, meta.
    settings: `auxiliary.AuxSettings`.
    weight_net: optional [A6] network `net(params, features [A, 2]) -> [A, K]` (pre-softplus).
    meta_loss: "bpr" or "softmax", the primary loss of `meta_loss` [A5].
  """

  def __init__(self, model, l2_reg, tasks, weighting, settings, weight_net=None, meta_loss="bpr"):
    if meta_loss not in ("bpr", "softmax"):
      raise ValueError(f"meta_loss must be bpr or softmax, got {meta_loss!r}")
    self.model, self.l2_reg, self.weighting = model, l2_reg, weighting
    self.meta_loss_kind = meta_loss
    self.tasks = tuple(auxiliary.get(t) for t in tasks) if weighting != "none" else ()
    self.settings = settings
    self.weight_net = weight_net

  @property
  def task_names(self) -> tuple[str, ...]:
    return tuple(t.name for t in self.tasks)

  def bpr_parts(self, params, batch, graph: Graph, weights):
    """(BPR loss, L2 term, final embeddings) on one batch."""
    fu, fi = self.model.apply({"params": params}, graph, weights)
    u, i, j = batch["user"], batch["pos"], batch["neg"]
    eu = fu[u]
    bpr = losses.bpr_loss(jnp.sum(eu * fi[i], -1), jnp.sum(eu * fi[j], -1))
    ego = (params["user"][u], params["item"][i], params["item"][j])
    return bpr, losses.l2_penalty(self.l2_reg, u.shape[0], *ego), (fu, fi)

  def task_outputs(self, params, final, batch, graph, key) -> list[auxiliary.AuxOutput]:
    ctx = auxiliary.AuxContext(params, final, batch, graph, key, self.settings)
    return [t.loss_fn(ctx) for t in self.tasks]

  def inner_loss(self, params, aux_params, batch, key, graph: Graph, weights) -> tuple:
    """L_in and its parts.

    Args:
      params: {"user": [U, d], "item": [I, d]}.
      aux_params: φ, [K] (or the weighting network's parameters).
      batch: {"user", "pos", "neg", "pos2"}: [B] int32.
      key: PRNG key fixing the views ξ.
      graph, weights: the training graph and its normalised edge weights [2E].
    Returns:
      (scalar loss, {"bpr", "l2", <task>, "weight_<task>", ...}).
    """
    bpr, l2, final = self.bpr_parts(params, batch, graph, weights)
    parts = {"bpr": bpr, "l2": l2}
    total = bpr + l2
    if not self.tasks:
      return total, parts
    outs = self.task_outputs(params, final, batch, graph, key)
    if self.weight_net is not None:
      total = total + self._network_weighted(aux_params, outs, graph, parts)
      return total, parts
    w, penalty = aux_weights(self.weighting, aux_params)
    for k, (task, out) in enumerate(zip(self.tasks, outs)):
      lk = losses.masked_mean(out.losses, out.valid)
      parts[task.name] = lk
      parts[f"weight_{task.name}"] = w[k]
      total = total + w[k] * lk
    return total + penalty, parts

  def _network_weighted(self, net_params, outs, graph, parts):
    """[A6]: Σ_k mean_b softplus(MLP([log(1+deg_b), ℓ_kb]))_k ℓ_kb, features stop-gradient."""
    total = 0.0
    deg = graph_lib.degrees(graph)
    for k, (task, out) in enumerate(zip(self.tasks, outs)):
      offset = 0 if task.side == "user" else graph.n_users
      feats = jnp.stack([jnp.log1p(deg[offset + out.ids]), out.losses], -1)
      wk = jax.nn.softplus(self.weight_net(net_params, jax.lax.stop_gradient(feats))[:, k])
      parts[task.name] = losses.masked_mean(out.losses, out.valid)
      parts[f"weight_{task.name}"] = losses.masked_mean(wk, out.valid)
      total = total + losses.masked_mean(wk * out.losses, out.valid)
    return total

  def meta_loss(self, params, batch, graph: Graph, weights) -> jax.Array:
    """[A5] The primary loss alone (no auxiliary term, no regulariser) on `batch`.

    BPR on the triples {"user", "pos", "neg"}, or with meta_loss="softmax" the full-softmax
    cross-entropy of each "pos" among all items, the items in "seen" [B, W] masked.
    """
    if self.meta_loss_kind == "bpr":
      return self.bpr_parts(params, batch, graph, weights)[0]
    fu, fi = self.model.apply({"params": params}, graph, weights)
    scores = fu[batch["user"]] @ fi.T
    return losses.softmax_ce(scores, batch["pos"], batch["seen"])

  def task_losses(self, params, batch, key, graph: Graph, weights) -> jax.Array:
    """[K] mean auxiliary losses L_k(θ) (for gradient-alignment diagnostics)."""
    _, _, final = self.bpr_parts(params, batch, graph, weights)
    outs = self.task_outputs(params, final, batch, graph, key)
    return jnp.stack([losses.masked_mean(o.losses, o.valid) for o in outs])
