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

from maxrec import checkpoint, metrics, objective, recommend, replay, sharding
from maxrec import data as data_lib
from maxrec.config import Config, MetaConfig, ModelConfig
from maxrec.objective import aux_weights
from maxrec.runfiles import RunFiles, format_epoch, format_final
from maxrec.trainer import Trainer

__all__ = ["Progress", "Trainer", "config_warnings", "train_and_evaluate"]


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


@dataclasses.dataclass
class _Run:
  """One run's pieces, built once by `_start` and shared by the loop's functions."""

  cfg: Config
  files: RunFiles
  ds: data_lib.Dataset
  trainer: Trainer
  prog: Progress
  valid_set: metrics.EvalSet
  test_set: metrics.EvalSet
  learned_at: float  # popularity's validation score: the bar for patience and meta steps
  t_start: float
  flat_config: dict  # the configuration as given (config.json, model.npz)


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
  run = _start(config, workdir, resume, t_start)
  if isinstance(run, dict):  # a finished run: nothing to resume
    return run
  prog, budget = run.prog, run.cfg.train.time_budget_s
  while prog.epoch < run.cfg.epochs and prog.bad_evals < run.cfg.train.patience:
    elapsed = prog.elapsed_s + time.perf_counter() - t_start
    if prog.epoch > 0 and budget > 0 and elapsed > budget:
      logging.info("time budget: stopping after epoch %d (--time_budget_s=%g)", prog.epoch, budget)
      break
    _epoch(run)
  return _finish(run)


def _start(config: Config, workdir: str, resume: bool, t_start: float) -> _Run | dict:
  """Checks the configuration, reads the data and builds the trainer, once; restores the
  latest checkpoint with `resume`. Returns a finished run's final metrics as they are."""
  mesh = sharding.make_mesh(config.train.mesh_devices)  # flags first: no work on a bad mesh
  cfg = sharding.sharded_config(config, mesh)
  objective.check_tasks(cfg.aux.aux_tasks)
  if cfg.aux.weighting == "replay":  # a bad source fails before any data is read
    replay.load_trajectory(cfg.aux.replay_from, cfg.aux.tasks)
  files = RunFiles(workdir, resume=resume)
  if resume:
    _check_resumable(files, config)
    if files.exists("final_metrics.json"):
      logging.warning(
        "%s already finished (final_metrics.json exists): nothing to resume. A finished run "
        "cannot be extended; start a new --workdir to train longer.",
        workdir,
      )
      return files.read_json("final_metrics.json")
  files.write_json("config.json", config.flat())
  ds = data_lib.load_dataset(cfg.data, seed=cfg.train.seed, meta_ratio=cfg.meta_ratio)
  logging.info("%s", data_lib.describe(ds))
  for w in data_lib.warnings(ds):
    logging.warning("%s", w)
  files.write_json("data_summary.json", ds.summary)

  trainer = Trainer(cfg, ds, mesh)
  _check_disk(files, trainer, cfg)
  for w in config_warnings(cfg, trainer.n_batches):
    logging.warning("%s", w)
  if trainer.meta is not None:
    logging.info("%s", trainer.meta.describe())
    trainer.meta.active_at = None  # no meta step before the model has started to learn
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
  # Patience counts only once the model ranks validation items better than popularity:
  # before that it has not started to learn (LightGCN may need 10x MF's epochs).
  pop_u, pop_i = metrics.popularity_embeddings(ds.observed, ds.n_users, ds.n_items)
  learned_at = metrics.evaluate(pop_u, pop_i, valid_set, cfg.train.topk)[
    cfg.train.early_stop_metric
  ]
  return _Run(
    cfg, files, ds, trainer, prog, valid_set, test_set, learned_at, t_start, config.flat()
  )


def _epoch(run: _Run) -> None:
  """Trains one epoch, validates when due, logs it, checkpoints when due."""
  cfg, trainer, prog = run.cfg, run.trainer, run.prog
  epoch = prog.epoch + 1
  record = _train_epoch(run, epoch)
  prog.epoch = epoch
  valid = _validate(run, epoch) if cfg.validates_after(epoch) else None
  if valid is not None:
    record["valid"] = valid
  logging.info("%s", format_epoch(record, trainer.objective.task_names))
  run.files.append("metrics.jsonl", record)
  if prog.bad_evals >= cfg.train.patience:
    logging.info(
      "early stop: %s did not improve for %d validations",
      cfg.train.early_stop_metric,
      prog.bad_evals,
    )
  if epoch % cfg.train.checkpoint_every == 0:
    saved_elapsed = prog.elapsed_s
    prog.elapsed_s = record["elapsed_s"]
    _save_checkpoint(run.files, trainer, prog, cfg)
    prog.elapsed_s = saved_elapsed


def _train_epoch(run: _Run, epoch: int) -> dict:
  """One epoch of training; its record (mean loss parts, timings). Stops the run on a
  non-finite step with --on_nonfinite=stop."""
  trainer, n_batches = run.trainer, run.trainer.n_batches
  sums, times = trainer.epoch(lambda rec: run.files.append("meta.jsonl", {"epoch": epoch, **rec}))
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
    if run.cfg.train.on_nonfinite == "stop":
      run.files.append("metrics.jsonl", record)
      raise FloatingPointError(
        f"non-finite loss or gradient at step {first} (epoch {epoch}); stopped as "
        "--on_nonfinite=stop asks. The last good checkpoint is kept; rerun with --resume "
        "after fixing the cause, or use --on_nonfinite=skip."
      )
  record.update(
    step=int(trainer.state.step),
    **times,
    interactions_per_s=n_batches * trainer.batch_size / times["epoch_s"],
    elapsed_s=run.prog.elapsed_s + time.perf_counter() - run.t_start,
  )
  return record


def _validate(run: _Run, epoch: int) -> dict:
  """Validation metrics after `epoch`; keeps the best epoch's parameters, counts patience
  and starts the meta steps once the model beats popularity."""
  trainer, prog, select = run.trainer, run.prog, run.cfg.train.early_stop_metric
  valid = metrics.evaluate(*trainer.embeddings(), run.valid_set, run.cfg.train.topk)
  if valid[select] > prog.best_score:
    prog.best_epoch, prog.best_score, prog.best_valid = epoch, valid[select], valid
    prog.best_params = jax.tree.map(jnp.copy, trainer.state.params)
    prog.best_aux = jax.tree.map(jnp.copy, trainer.state.aux_params)
    prog.bad_evals = 0
  elif prog.best_score > run.learned_at:
    prog.bad_evals += 1
  if trainer.meta is not None and trainer.meta.active_at is None and valid[select] > run.learned_at:
    # the hypergradient assumes θ near θ*(φ): meaningless for a model that ranks worse
    # than popularity (MF's first epochs), so meta steps start once it ranks better
    trainer.meta.active_at = int(trainer.state.step)
    logging.info(
      "meta-learning starts: validation %s %.4f beats popularity's %.4f",
      select,
      valid[select],
      run.learned_at,
    )
  return valid


def _finish(run: _Run) -> dict:
  """Tests the selected epoch, saves the model and writes `final_metrics.json`."""
  cfg, trainer, prog, ds, ks = run.cfg, run.trainer, run.prog, run.ds, run.cfg.train.topk
  test = metrics.evaluate(*trainer.embeddings(prog.best_params), run.test_set, ks)
  pop_u, pop_i = metrics.popularity_embeddings(ds.observed, ds.n_users, ds.n_items)
  popularity = metrics.evaluate(pop_u, pop_i, run.test_set, ks)
  final = {
    "best_epoch": prog.best_epoch,
    "valid": prog.best_valid,
    "test": test,
    "popularity": popularity,
    "epochs_run": prog.epoch,
    "skipped_steps": int(trainer.state.bad_steps),
    "wall_s": prog.elapsed_s + time.perf_counter() - run.t_start,
  }
  objective = trainer.objective
  if objective.task_names and not (cfg.aux.weighting == "meta" and cfg.meta.weight_net):
    final.update(_weights_summary(cfg, objective, prog.best_aux, trainer.state.aux_params))
  if trainer.meta is not None:
    final["meta"] = trainer.meta.summary()
  user_emb, item_emb = sharding.to_host(trainer.embeddings(prog.best_params))
  if run.files.writes:
    path = run.files.path(recommend.MODEL_FILE)
    recommend.save_model(path, user_emb, item_emb, ds, run.flat_config)
  run.files.write_json("final_metrics.json", final)
  run.files.close()
  logging.info("%s", format_final(final))
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
