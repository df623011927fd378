"""Usage errors before any work, disk space at start, and warnings about odd settings."""

import pytest
from helpers import run_cli

from maxrec import train
from maxrec.config import Config
from maxrec.runfiles import RunFiles


def cli(*args):
  return run_cli("experiments.train", *args, timeout=300)


@pytest.mark.parametrize(
  "args,message",
  [
    (["--model=svd"], "--model"),
    (["--weighting=meta", "--aux_tasks="], "--weighting=meta needs at least one task"),
    (["--aux_tasks=user_sgl,nope"], "unknown task 'nope'"),
    (
      ["--weighting=meta", "--meta_data=heldout", "--meta_ratio=0"],
      "--weighting=meta needs a meta split",
    ),
    (["--embedding_dim=0"], "--embedding_dim=0 must be >= 1"),
    (["--mesh_devices=4", "--data_path=/no/such/file"], "--mesh_devices=4: 1 device"),
    (["--resume"], "--resume needs the --workdir"),
  ],
)
def test_bad_flags_are_usage_errors_before_any_work(tmp_path, args, message):
  r = cli(*args, f"--workdir={tmp_path / 'w'}" if "--resume" not in args else "--epochs=1")
  assert r.returncode != 0
  assert "Traceback" not in r.stderr
  assert message in r.stderr
  assert not (tmp_path / "w" / "data_summary.json").exists()  # no data was read


def test_full_work_directory_is_reported_at_start(tmp_path, monkeypatch):
  monkeypatch.setattr(RunFiles, "free_bytes", lambda self: 1 << 20)
  cfg = Config.from_flat(weighting="none", synth_users=60, synth_items=120, synth_interactions=900)
  with pytest.raises(ValueError, match=r"has 1 MiB free, but the run needs about"):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists()  # before the first epoch


def test_warnings_for_odd_meta_settings():
  cfg = Config.from_flat(meta_every=500)  # 100 epochs x 36 steps: 7 meta steps, no warning
  assert not any("fewer than 5 meta steps" in w for w in train.config_warnings(cfg, 36))
  cfg = Config.from_flat(meta_every=1000)
  assert any("fewer than 5 meta steps" in w for w in train.config_warnings(cfg, 36))
  cfg = Config.from_flat(epochs=1)
  assert any("no meta step will run" in w for w in train.config_warnings(cfg, 36))
  assert train.config_warnings(Config.from_flat(), 36) == []
  w = train.config_warnings(Config.from_flat(weighting="fixed", hypergrad="neumann"), 36)
  assert w == ["--hypergrad=neumann: no effect without --weighting=meta."]
  w = train.config_warnings(Config.from_flat(weighting="none", aux_tasks=("item_sgl",)), 36)
  assert any("--aux_tasks=('item_sgl',): no effect with --weighting=none" in x for x in w)
  assert train.config_warnings(Config.from_flat(num_layers=2), 36) == [
    "--num_layers=2: no effect with --model=mf."
  ]
