"""[A9] replay: the trajectory lookup, its errors, and a replay run following a meta run."""

import json

import numpy as np
import pytest

from maxrec import replay, train
from maxrec.config import Config

TASKS = ("user_sgl", "item_sgl")


def write_run(path, records, **cfg):
  path.mkdir(parents=True, exist_ok=True)
  base = {"weighting": "meta", "aux_tasks": list(TASKS), "aux_weights": [0.1], "seed": 0}
  (path / "config.json").write_text(json.dumps({**base, **cfg}))
  (path / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def rec(epoch, u, i):
  return {"epoch": epoch, "weights": {"user_sgl": u, "item_sgl": i}}


def test_weights_in_effect_when_each_epoch_began(tmp_path):
  src = write_run(tmp_path / "m", [rec(2, 0.08, 0.09), rec(2, 0.07, 0.095), rec(4, 0.05, 0.1)])
  t = replay.load_trajectory(src, TASKS)
  expect = {1: [0.1, 0.1], 2: [0.1, 0.1], 3: [0.07, 0.095], 4: [0.07, 0.095], 5: [0.05, 0.1]}
  for epoch, w in expect.items():
    np.testing.assert_allclose(t.at_epoch(epoch), w)
  np.testing.assert_allclose(t.at_epoch(50), [0.05, 0.1])  # held after the last step
  assert t.last_epoch == 4


def test_no_meta_step_keeps_the_initial_weights(tmp_path):
  t = replay.load_trajectory(write_run(tmp_path / "m", [], aux_weights=[0.2, 0.3]), TASKS)
  np.testing.assert_allclose(t.at_epoch(7), [0.2, 0.3])


@pytest.mark.parametrize(
  "cfg, records, message",
  [
    (dict(weighting="fixed"), [], "replay needs a --weighting=meta run"),
    (dict(aux_tasks=["user_sgl"]), [], "use the same tasks"),
    ({}, [{"epoch": 1}], "meta.jsonl:1: not a meta-step record"),
    ({}, [rec(3, 0.1, 0.1), rec(2, 0.1, 0.1)], "meta.jsonl:2: epoch 2 after epoch 3"),
  ],
)
def test_bad_sources_are_clear_errors(tmp_path, cfg, records, message):
  src = write_run(tmp_path / "m", records, **cfg)
  with pytest.raises(ValueError, match=message):
    replay.load_trajectory(src, TASKS)


def test_missing_source_names_the_file(tmp_path):
  with pytest.raises(ValueError, match="config.json does not exist"):
    replay.load_trajectory(str(tmp_path / "nowhere"), TASKS)


def test_replay_run_follows_the_meta_runs_weights(tmp_path):
  tiny = dict(
    synth_users=100, synth_items=140, synth_interactions=2500, synth_clusters=3,
    batch_size=256, hyper_batch_size=128, meta_batch_size=128, eval_every=1,
    learning_rate=0.05,
  )  # fmt: skip
  meta_dir = str(tmp_path / "meta")
  cfg = Config.from_flat(**tiny, epochs=3, meta_every=3, warmup_epochs=0)
  train.train_and_evaluate(cfg, meta_dir)
  traj = replay.load_trajectory(meta_dir, TASKS)
  assert len(traj.epochs) >= 2 and not np.allclose(traj.weights[-1], traj.initial)
  rp = Config.from_flat(**tiny, epochs=4, weighting="replay", replay_from=meta_dir)
  assert rp.meta_ratio == 0
  train.train_and_evaluate(rp, str(tmp_path / "replay"))
  with open(tmp_path / "replay" / "metrics.jsonl") as f:
    epochs = [json.loads(line) for line in f]
  assert len(epochs) == 4
  for r in epochs:
    w = [r[f"weight_{t}"] for t in TASKS]
    np.testing.assert_allclose(w, traj.at_epoch(r["epoch"]), rtol=1e-5)


def test_replay_needs_a_source():
  with pytest.raises(ValueError, match="--weighting=replay needs --replay_from"):
    Config.from_flat(weighting="replay")


def test_bad_source_fails_before_the_work_directory_is_made(tmp_path):
  cfg = Config.from_flat(weighting="replay", replay_from=str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="config.json does not exist"):
    train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
