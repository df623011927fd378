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
gets its own weights. `aux_weights` is the one map from φ to weights, `init_aux_params`
its inverse; every other module goes through them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxrec import auxiliary, losses
from maxrec import graph as graph_lib
from maxrec.config import Config
from maxrec.graph import Graph


def softplus_inverse(w) -> np.ndarray:
  """φ with softplus(φ) = w, stable for large w. softplus⁻¹(0.1) = -2.25217."""
  w = np.asarray(w, np.float64)
  return np.where(w > 20, w, np.log(np.expm1(np.minimum(w, 20))))


def init_aux_params(weighting: str, init_weights) -> jax.Array:
  """φ [K] float32 with `aux_weights(weighting, φ)` = the weights [K] (s = -log w for
  uncertainty, softplus⁻¹(w) otherwise)."""
  return jnp.asarray(host_aux_params(weighting, init_weights))


def host_aux_params(weighting: str, weights) -> np.ndarray:
  """`init_aux_params` on the host (NumPy float32; usable while tracing)."""
  w = np.asarray(weights, np.float64)
  return (-np.log(w) if weighting == "uncertainty" else softplus_inverse(w)).astype(np.float32)


def aux_weights(weighting: str, aux_params) -> tuple[jax.Array, jax.Array]:
  """(weights [K], penalty) of scalar φ [K]: exp(-s) and Σ s for uncertainty, softplus(φ)
  and 0 for fixed, meta and replay."""
  if weighting == "uncertainty":
    return jnp.exp(-aux_params), jnp.sum(aux_params)
  return jax.nn.softplus(aux_params), jnp.zeros((), aux_params.dtype)


class WeightNet(nn.Module):
  """[A6] Per-anchor weights: softplus(MLP([log(1+deg), ℓ])) for K tasks.

  Starts at the scalar solution: last layer's kernel 0 and bias softplus⁻¹(w_init).
  """

  num_tasks: int
  hidden: int = 16
  init_weight: float = 0.1

  @nn.compact
  def __call__(self, features):  # [A, 2] -> [A, K] pre-softplus
    h = nn.relu(nn.Dense(self.hidden)(features))
    bias = float(softplus_inverse(self.init_weight))
    return nn.Dense(
      self.num_tasks,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.constant(bias),
    )(h)


def _weight_net(cfg: Config) -> WeightNet | None:
  if cfg.aux.weighting == "meta" and cfg.meta.weight_net:
    return WeightNet(len(cfg.aux.tasks), init_weight=cfg.aux.initial_weights[0])
  return None


def initial_aux_params(cfg: Config):
  """φ at the start: scalar weights [K], or the [A6] network's parameters."""
  net = _weight_net(cfg)
  if net is not None:
    return net.init(jax.random.key(cfg.train.seed + 1), jnp.zeros((1, 2)))["params"]
  return init_aux_params(cfg.aux.weighting, cfg.aux.initial_weights)


def check_tasks(names: tuple[str, ...]) -> None:
  """Raises ValueError naming a task (--aux_tasks) that is not registered."""
  for name in names:
    if name not in auxiliary.names():
      raise ValueError(
        f"--aux_tasks: unknown task {name!r}; registered: {', '.join(auxiliary.names())}."
      )


def make_objective(model, cfg: Config, anchor_caps: tuple[int, int] | None = None) -> Objective:
  """The run's objective; `anchor_caps` bounds the distinct users and items per batch that
  the contrastive tasks hold (default: the batch size).

  Raises:
    ValueError: an unknown task in --aux_tasks.
  """
  check_tasks(cfg.aux.aux_tasks)
  settings = auxiliary.AuxSettings(
    temperature=cfg.aux.ssl_temperature,
    edge_drop=cfg.aux.edge_drop,
    view_layers=cfg.view_layers,
    simgcl_eps=cfg.aux.simgcl_eps,
    kernel=cfg.model.propagation,
    max_users=None if anchor_caps is None else anchor_caps[0],
    max_items=None if anchor_caps is None else anchor_caps[1],
    anchors=cfg.aux.ssl_anchors or None,
  )
  net = _weight_net(cfg)
  weight_net = None if net is None else lambda params, f: net.apply({"params": params}, f)
  return Objective(
    model,
    cfg.train.l2_reg,
    cfg.aux.tasks,
    cfg.aux.weighting,
    settings,
    weight_net=weight_net,
    meta_loss=cfg.meta.meta_loss,
  )


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
    ego = (params["user"][u], params["item"][i], params["item"][j])
    bpr, l2 = losses.bpr_batch(fu[u], fi[i], fi[j], self.l2_reg, ego)
    return bpr, l2, (fu, fi)

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
