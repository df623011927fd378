"""`train_and_evaluate(config, workdir)`: one experiment, from data to test metrics.

The Flax-examples contract: it trains with a `Trainer`, validates every --eval_every
epochs, stops early on --patience, checkpoints every --checkpoint_every epochs (and
resumes from them), tests the best validation epoch, and writes to `workdir`:
  config.json          the resolved configuration
  data_summary.json    what was read, filtered and split
  metrics.jsonl        one JSON object per epoch (losses, timings, validation metrics)
  meta.jsonl           one JSON object per meta step (--weighting=meta)
  final_metrics.json   {"best_epoch", "valid", "test", "popularity", ...}
  model.npz            the selected model with its raw-id mappings
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from maxrec import checkpoint, metrics, recommend, replay, sharding
from maxrec import data as data_lib
from maxrec.config import Config, MetaConfig, ModelConfig
from maxrec.objective import aux_weights
from maxrec.runfiles import RunFiles
from maxrec.trainer import Trainer, _sharded_config

__all__ = ["Progress", "Trainer", "config_warnings", "train_and_evaluate"]


def _fmt(d: dict, keys) -> str:
  return " ".join(f"{k}={d[k]:.4f}" for k in keys if k in d)


@dataclasses.dataclass
class Progress:
  """What the epoch loop carries besides the trainer: model selection and time."""

  epoch: int = 0  # epochs completed
  best_epoch: int = 0
  best_score: float = -np.inf
  best_valid: dict = dataclasses.field(default_factory=dict)
  best_params: Any = None
  best_aux: Any = None
  bad_evals: int = 0  # validations without improvement, once the model beats popularity
  elapsed_s: float = 0.0  # wall time of the run's earlier sessions (resumption)


# Config fields a resumed run may change: they do not affect what was already trained.
RESUMABLE_CHANGES = ("epochs", "patience", "checkpoint_every", "keep_checkpoints", "time_budget_s")


def _check_resumable(files: RunFiles, cfg: Config) -> None:
  if not files.exists("config.json"):
    raise ValueError(f"--resume: {files.workdir} holds no run to resume (no config.json).")
  before = files.read_json("config.json")
  now = json.loads(json.dumps(cfg.flat()))  # tuples -> lists, as on disk
  # A field the run's version did not have yet reads as that field's default.
  defaults = json.loads(json.dumps(Config().flat()))
  before = {k: before.get(k, defaults[k]) for k in now}
  # The cosine schedule runs over --epochs: changing them would change the trained steps.
  free = [k for k in RESUMABLE_CHANGES if not (k == "epochs" and cfg.lr_schedule != "constant")]
  if cfg.aux.weighting != "meta":  # the meta-learner's settings have no effect on this run
    free += [f.name for f in dataclasses.fields(MetaConfig)]
  changed = sorted(k for k in now if k not in free and before[k] != now[k])
  if changed:
    details = ", ".join(f"--{k}={before.get(k)!r} -> {now[k]!r}" for k in changed)
    raise ValueError(f"--resume: the configuration differs from the run's own ({details}).")


def _save_checkpoint(files: RunFiles, trainer: Trainer, p: Progress, cfg: Config) -> None:
  host = dataclasses.asdict(p) | {"best_params": None, "best_aux": None}
  host.update(trainer.host_state())
  payload = {
    "trainer": trainer.device_state(),
    "best_params": p.best_params,
    "best_aux": p.best_aux,
    "host": json.dumps(host),
  }
  checkpoint.save(files.workdir, p.epoch, payload, cfg.train.keep_checkpoints)


def _restore(files: RunFiles, trainer: Trainer) -> Progress:
  """The latest checkpoint into `trainer`; a fresh Progress when there is none."""
  found = checkpoint.list_checkpoints(files.workdir)
  if not found:
    logging.warning("--resume: no checkpoint in %s; starting from the beginning", files.workdir)
    return Progress(
      best_params=jax.tree.map(jnp.copy, trainer.state.params),
      best_aux=jax.tree.map(jnp.copy, trainer.state.aux_params),
    )
  epoch, path = found[-1]
  template = {
    "trainer": trainer.device_state(),
    "best_params": trainer.state.params,
    "best_aux": trainer.state.aux_params,
    "host": "",
  }
  payload = checkpoint.restore(path, template)
  host = json.loads(payload["host"])
  trainer.load(payload["trainer"], host)
  p = Progress(**{k: v for k, v in host.items() if k in Progress.__dataclass_fields__})
  p.best_params, p.best_aux = trainer.place(payload["best_params"]), payload["best_aux"]
  for name in ("metrics.jsonl", "meta.jsonl"):
    files.truncate(name, epoch)
  logging.info("resumed from %s: epoch %d, best epoch %d", path, epoch, p.best_epoch)
  return p


def _check_disk(files: RunFiles, trainer: Trainer, cfg: Config) -> None:
  """Fails at start, not after hours, when the work directory cannot hold the checkpoints."""
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.device_state()))
  need = (cfg.train.keep_checkpoints + 1) * 2 * state_bytes + (16 << 20)
  if files.free_bytes() < need:
    raise ValueError(
      f"--workdir={files.workdir} has {files.free_bytes() >> 20} MiB free, but the run needs "
      f"about {need >> 20} MiB for {cfg.train.keep_checkpoints} checkpoint(s); free space or "
      "lower --keep_checkpoints."
    )


def train_and_evaluate(config: Config, workdir: str, resume: bool = False) -> dict:
  """Trains the configured model, selects the best validation epoch, tests it.

  Checkpoints are written every --checkpoint_every epochs; with `resume`, an interrupted
  run continues from its latest checkpoint and ends exactly as an uninterrupted run.

  Args:
    config: the run's configuration.
    workdir: output folder (created; must be writable).
    resume: continue the run in `workdir`.
  Returns:
    The dict written to `final_metrics.json`.
  Raises:
    ValueError: bad data or configuration, with a message naming the problem.
    FloatingPointError: a non-finite step with --on_nonfinite=stop.
  """
  t_start = time.perf_counter()
  cfg = config
  mesh = sharding.make_mesh(cfg.train.mesh_devices)  # flags first: no work on a bad mesh
  if mesh.size > 1:
    _sharded_config(cfg, mesh)
  if cfg.aux.weighting == "replay":  # a bad source fails before any data is read
    replay.load_trajectory(cfg.aux.replay_from, cfg.aux.tasks)
  files = RunFiles(workdir, resume=resume)
  if resume:
    _check_resumable(files, cfg)
    if files.exists("final_metrics.json"):
      logging.warning(
        "%s already finished (final_metrics.json exists): nothing to resume. A finished run "
        "cannot be extended; start a new --workdir to train longer.",
        workdir,
      )
      return files.read_json("final_metrics.json")
  files.write_json("config.json", cfg.flat())
  ds = data_lib.load_dataset(cfg.data, seed=cfg.train.seed, meta_ratio=cfg.meta_ratio)
  logging.info("%s", data_lib.describe(ds))
  for w in data_lib.warnings(ds):
    logging.warning("%s", w)
  files.write_json("data_summary.json", ds.summary)

  trainer = Trainer(cfg, ds)
  objective, n_batches = trainer.objective, trainer.n_batches
  _check_disk(files, trainer, cfg)
  for w in config_warnings(cfg, n_batches):
    logging.warning("%s", w)
  if trainer.meta is not None:
    logging.info("%s", trainer.meta.describe())
  if trainer.meta is not None:  # no meta step before the model has started to learn
    trainer.meta.active_at = None
  if resume:
    prog = _restore(files, trainer)
  else:  # copies: the state's buffers are donated to the first step
    prog = Progress(
      best_params=jax.tree.map(jnp.copy, trainer.state.params),
      best_aux=jax.tree.map(jnp.copy, trainer.state.aux_params),
    )

  valid_set = trainer.eval_set(ds.valid, ds.observed)
  test_set = trainer.eval_set(ds.test, np.concatenate([ds.observed, ds.valid]))
  logging.info(
    "evaluating %d validation users (%d without validation items excluded), %d test users",
    valid_set.n_users,
    valid_set.n_excluded,
    test_set.n_users,
  )

  ks, select = cfg.train.topk, cfg.train.early_stop_metric
  budget = cfg.train.time_budget_s
  # Patience counts only once the model ranks validation items better than popularity:
  # before that it has not started to learn (LightGCN may need 10x MF's epochs).
  pop_u, pop_i = metrics.popularity_embeddings(ds.observed, ds.n_users, ds.n_items)
  learned_at = metrics.evaluate(pop_u, pop_i, valid_set, ks)[select]

  def out_of_time() -> bool:
    return budget > 0 and prog.elapsed_s + time.perf_counter() - t_start > budget

  while prog.epoch < cfg.epochs and prog.bad_evals < cfg.train.patience:
    if prog.epoch > 0 and out_of_time():
      logging.info("time budget: stopping after epoch %d (--time_budget_s=%g)", prog.epoch, budget)
      break
    epoch = prog.epoch + 1
    sums, times = trainer.epoch(
      lambda rec, e=epoch: files.append("meta.jsonl", {"epoch": e, **rec})
    )
    t_epoch = times["epoch_s"]
    sums = jax.device_get(sums)
    good = float(sums.pop("good"))
    record = {"epoch": epoch, **{k: float(v) / max(good, 1.0) for k, v in sums.items()}}
    record["skipped_steps"] = int(n_batches - good)
    if record["skipped_steps"]:
      first = int(trainer.state.first_bad_step)
      logging.warning(
        "epoch %d: %d step(s) skipped for a non-finite loss or gradient (first at step %d; "
        "%d in the run so far)",
        epoch,
        record["skipped_steps"],
        first,
        int(trainer.state.bad_steps),
      )
      if cfg.train.on_nonfinite == "stop":
        files.append("metrics.jsonl", record)
        raise FloatingPointError(
          f"non-finite loss or gradient at step {first} (epoch {epoch}); stopped as "
          "--on_nonfinite=stop asks. The last good checkpoint is kept; rerun with --resume "
          "after fixing the cause, or use --on_nonfinite=skip."
        )
    record.update(
      step=int(trainer.state.step),
      **times,
      interactions_per_s=n_batches * trainer.batch_size / t_epoch,
      elapsed_s=prog.elapsed_s + time.perf_counter() - t_start,
    )
    msg = f"epoch {epoch:3d} | {_fmt(record, ('loss', 'bpr', 'l2', *objective.task_names))}"
    if objective.task_names:
      msg += " | w " + " ".join(f"{k}={record['weight_' + k]:.3g}" for k in objective.task_names)
    msg += f" | {t_epoch:.2f}s ({record['interactions_per_s']:,.0f} interactions/s)"
    prog.epoch = epoch
    if cfg.validates_after(epoch):
      valid = metrics.evaluate(*trainer.embeddings(), valid_set, ks)
      record["valid"] = valid
      msg += f" | valid {_fmt(valid, ('recall@20', 'ndcg@20'))}"
      if valid[select] > prog.best_score:
        prog.best_epoch, prog.best_score, prog.best_valid = epoch, valid[select], valid
        prog.best_params = jax.tree.map(jnp.copy, trainer.state.params)
        prog.best_aux = jax.tree.map(jnp.copy, trainer.state.aux_params)
        prog.bad_evals = 0
      elif prog.best_score > learned_at:
        prog.bad_evals += 1
      if trainer.meta is not None and trainer.meta.active_at is None and valid[select] > learned_at:
        # the hypergradient assumes θ near θ*(φ): meaningless for a model that ranks worse
        # than popularity (MF's first epochs), so meta steps start once it ranks better
        trainer.meta.active_at = int(trainer.state.step)
        logging.info(
          "meta-learning starts: validation %s %.4f beats popularity's %.4f",
          select,
          valid[select],
          learned_at,
        )
    logging.info("%s | elapsed %.1fs", msg, record["elapsed_s"])
    files.append("metrics.jsonl", record)
    if prog.bad_evals >= cfg.train.patience:
      logging.info("early stop: %s did not improve for %d validations", select, prog.bad_evals)
    if epoch % cfg.train.checkpoint_every == 0:
      saved_elapsed = prog.elapsed_s
      prog.elapsed_s = record["elapsed_s"]
      _save_checkpoint(files, trainer, prog, cfg)
      prog.elapsed_s = saved_elapsed

  test = metrics.evaluate(*trainer.embeddings(prog.best_params), test_set, ks)
  pop_u, pop_i = metrics.popularity_embeddings(ds.observed, ds.n_users, ds.n_items)
  popularity = metrics.evaluate(pop_u, pop_i, test_set, ks)
  final = {
    "best_epoch": prog.best_epoch,
    "valid": prog.best_valid,
    "test": test,
    "popularity": popularity,
    "epochs_run": prog.epoch,
    "skipped_steps": int(trainer.state.bad_steps),
    "wall_s": prog.elapsed_s + time.perf_counter() - t_start,
  }
  if objective.task_names and not (cfg.aux.weighting == "meta" and cfg.meta.weight_net):
    final.update(_weights_summary(cfg, objective, prog.best_aux, trainer.state.aux_params))
  if trainer.meta is not None:
    final["meta"] = trainer.meta.summary()
  user_emb, item_emb = sharding.to_host(trainer.embeddings(prog.best_params))
  if files.writes:
    recommend.save_model(files.path(recommend.MODEL_FILE), user_emb, item_emb, ds, cfg.flat())
  files.write_json("final_metrics.json", final)
  files.close()
  logging.info(
    "best epoch %d | test %s | popularity %s%s",
    prog.best_epoch,
    _fmt(test, ("recall@20", "ndcg@20")),
    _fmt(popularity, ("recall@20", "ndcg@20")),
    "".join(f" | w {k}={v:.3g}" for k, v in final.get("aux_weights", {}).items()),
  )
  return final


def _changed(group) -> list[str]:
  """Fields of a config group that differ from their defaults."""
  return [
    f"--{f.name}={getattr(group, f.name)}"
    for f in dataclasses.fields(group)
    if getattr(group, f.name) != f.default
  ]


def config_warnings(cfg: Config, steps_per_epoch: int) -> list[str]:
  """Settings that are valid but probably not what was meant, once the data is known."""
  out = []
  if cfg.aux.weighting != "meta" and _changed(cfg.meta):
    out.append(f"{', '.join(_changed(cfg.meta))}: no effect without --weighting=meta.")
  aux_changed = [c for c in _changed(cfg.aux) if not c.startswith("--weighting=")]
  if cfg.aux.weighting == "none" and aux_changed:
    out.append(f"{', '.join(aux_changed)}: no effect with --weighting=none (no auxiliary task).")
  if cfg.model.model == "mf" and cfg.model.num_layers != ModelConfig.num_layers:
    out.append(f"--num_layers={cfg.model.num_layers}: no effect with --model=mf.")
  if cfg.aux.replay_from and cfg.aux.weighting not in ("replay", "none"):
    out.append(f"--replay_from={cfg.aux.replay_from}: no effect without --weighting=replay.")
  if cfg.aux.weighting == "replay":
    out += [
      f"{m}: the replay should train on the meta run's split and seed."
      for m in replay.split_mismatches(cfg.aux.replay_from, cfg.flat())
    ]
  every = cfg.meta_every_for(steps_per_epoch)
  if cfg.aux.weighting == "meta" and 0 < (cfg.epochs * steps_per_epoch) // every < 5:
    out.append(
      f"meta steps every {every} steps over {cfg.epochs} epochs of {steps_per_epoch} steps: "
      "fewer than 5 meta steps, the weights will change little; lower --meta_every or "
      "raise --epochs."
    )
  if cfg.aux.weighting == "meta":
    first = max(cfg.meta.warmup_epochs * steps_per_epoch, every)
    if first > cfg.epochs * steps_per_epoch:
      out.append(
        f"no meta step will run: the first comes after step {first}, but --epochs="
        f"{cfg.epochs} gives {cfg.epochs * steps_per_epoch} steps."
      )
  return out


def _weights_summary(cfg, objective, best_aux, last_aux) -> dict:
  """The auxiliary weights at the selected epoch and at the end."""
  if not objective.task_names or best_aux is None:
    return {}
  names = objective.task_names
  w_best = np.asarray(aux_weights(cfg.aux.weighting, jnp.asarray(best_aux))[0])
  w_last = np.asarray(aux_weights(cfg.aux.weighting, last_aux)[0])
  return {
    "aux_weights": dict(zip(names, w_best.tolist())),
    "aux_weights_final": dict(zip(names, w_last.tolist())),
  }
