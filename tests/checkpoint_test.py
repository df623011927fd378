"""Checkpoints: atomic files, last N kept, exact restore; kill -9 and --resume; determinism."""

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import start_cli

from maxrec import checkpoint

RUN = [
  "--weighting=meta",
  "--epochs=8",
  "--patience=8",
  "--synth_users=200",
  "--synth_items=300",
  "--synth_interactions=6000",
  "--batch_size=256",
  "--learning_rate=0.05",
  "--meta_every=5",
  "--hyper_batch_size=256",
  "--meta_batch_size=256",
]


def test_save_restore_round_trip_and_keep_last(tmp_path):
  payload = {
    "state": {"w": jnp.arange(6.0).reshape(2, 3), "key": jax.random.key(7), "n": jnp.int32(4)},
    "host": json.dumps({"epoch": 3}),
  }
  for epoch in (1, 2, 3):
    checkpoint.save(str(tmp_path), epoch, payload, keep=2)
  (tmp_path / "checkpoints" / "ckpt_000004.msgpack.tmp123").write_bytes(b"half-written")
  assert [e for e, _ in checkpoint.list_checkpoints(str(tmp_path))] == [2, 3]
  template = {
    "state": {"w": jnp.zeros((2, 3)), "key": jax.random.key(0), "n": jnp.int32(0)},
    "host": "",
  }
  back = checkpoint.restore(checkpoint.list_checkpoints(str(tmp_path))[-1][1], template)
  np.testing.assert_array_equal(back["state"]["w"], payload["state"]["w"])
  assert int(back["state"]["n"]) == 4 and json.loads(back["host"]) == {"epoch": 3}
  np.testing.assert_array_equal(
    jax.random.key_data(back["state"]["key"]), jax.random.key_data(payload["state"]["key"])
  )


def test_restore_names_a_leaf_whose_shape_changed(tmp_path):
  """A checkpoint from another layout (an older optimizer slab, another dimension) is an
  error naming the file, the leaf and both shapes, not a silently mis-shaped state."""
  checkpoint.save(str(tmp_path), 1, {"opt": {"slots": jnp.zeros((5, 8))}}, keep=1)
  path = checkpoint.list_checkpoints(str(tmp_path))[-1][1]
  with pytest.raises(ValueError, match=r"slots.*\(5, 8\).*\(5, 6\).*fresh --workdir"):
    checkpoint.restore(path, {"opt": {"slots": jnp.zeros((5, 6))}})


def train(*args):
  return start_cli("experiments.train", *RUN, *args)


def losses(workdir):
  return [
    (r["epoch"], r["loss"], r.get("valid", {}).get("recall@20"))
    for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
  ]


def test_sigkill_then_resume_equals_an_uninterrupted_run_of_the_same_seed(tmp_path):
  """Two processes with the same seed agree exactly up to the kill, and the resumed one
  ends exactly as the uninterrupted one; a used --workdir needs --resume."""
  full, cut = tmp_path / "full", tmp_path / "cut"
  uninterrupted = train(f"--workdir={full}")  # both at once: the machine has two cores
  p = train(f"--workdir={cut}")
  target = cut / "checkpoints" / "ckpt_000004.msgpack"
  deadline = time.time() + 900
  while not target.exists() and p.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  _, err = uninterrupted.communicate(timeout=900)
  assert uninterrupted.returncode == 0, err[-3000:]
  assert target.exists() and not (cut / "final_metrics.json").exists()
  r = train(f"--workdir={cut}", "--resume")
  out, err = r.communicate(timeout=900)
  assert r.returncode == 0, err[-3000:]
  assert "resumed from" in err
  a = json.loads((full / "final_metrics.json").read_text())
  b = json.loads((cut / "final_metrics.json").read_text())
  for key in ("best_epoch", "valid", "test", "aux_weights", "aux_weights_final", "epochs_run"):
    assert a[key] == b[key], key
  assert a["meta"]["meta_steps"] == b["meta"]["meta_steps"]
  assert losses(full) == losses(cut)  # every epoch's loss and validation score, exactly
  meta_full = [json.loads(x)["weights"] for x in open(full / "meta.jsonl")]
  meta_cut = [json.loads(x)["weights"] for x in open(cut / "meta.jsonl")]
  assert meta_full == meta_cut
  p = train(f"--workdir={full}")
  _, err = p.communicate(timeout=300)
  assert p.returncode == 1 and "already holds a run; pass --resume" in err


def test_resume_accepts_fields_added_since_the_run_started(tmp_path):
  """A run's config.json from an older version lacks newer fields: they read as defaults."""
  from maxrec import train
  from maxrec.config import Config

  cfg = Config.from_flat(
    weighting="none", synth_users=60, synth_items=120, synth_interactions=900, epochs=2
  )
  train.train_and_evaluate(cfg.replace(epochs=1), str(tmp_path))
  (tmp_path / "final_metrics.json").unlink()  # as if it had been interrupted
  old = json.loads((tmp_path / "config.json").read_text())
  del old["mesh_devices"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  final = train.train_and_evaluate(cfg, str(tmp_path), resume=True)
  assert final["epochs_run"] == 2


def test_resume_ignores_meta_settings_of_a_run_without_meta_learning(tmp_path):
  """A fixed-weight run resumes whatever the meta-learner's settings say; a meta run
  refuses a changed meta setting."""
  from maxrec import train
  from maxrec.config import Config

  tiny = dict(synth_users=60, synth_items=120, synth_interactions=900, epochs=2)
  cfg = Config.from_flat(weighting="fixed", **tiny)
  train.train_and_evaluate(cfg.replace(epochs=1), str(tmp_path / "fixed"))
  (tmp_path / "fixed" / "final_metrics.json").unlink()
  final = train.train_and_evaluate(cfg.replace(meta_lr=0.1), str(tmp_path / "fixed"), resume=True)
  assert final["epochs_run"] == 2
  meta = Config.from_flat(weighting="meta", meta_every=5, **tiny)
  train.train_and_evaluate(meta.replace(epochs=1), str(tmp_path / "meta"))
  (tmp_path / "meta" / "final_metrics.json").unlink()
  with pytest.raises(ValueError, match="--meta_lr=0.5 -> 0.1"):
    train.train_and_evaluate(meta.replace(meta_lr=0.1), str(tmp_path / "meta"), resume=True)
