"""Run files: a used folder needs --resume, logs truncate to a checkpoint, only process 0
writes, and the log lines say what the records hold."""

import json

import jax
import pytest

from maxrec import runfiles
from maxrec.runfiles import RunFiles


def test_logs_resume_and_truncate_to_a_checkpoint(tmp_path):
  files = RunFiles(str(tmp_path))
  files.write_json("config.json", {"epochs": 3})
  for epoch in (1, 2, 3):
    files.append("metrics.jsonl", {"epoch": epoch, "loss": 1.0 / epoch})
  files.close()
  with pytest.raises(ValueError, match="already holds a run; pass --resume"):
    RunFiles(str(tmp_path))
  again = RunFiles(str(tmp_path), resume=True)
  again.truncate("metrics.jsonl", 2)  # the checkpoint covers epochs 1 and 2
  again.append("metrics.jsonl", {"epoch": 3, "loss": 0.3})
  again.close()
  epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "metrics.jsonl")]
  assert epochs == [1, 2, 3] and again.read_json("config.json") == {"epochs": 3}
  assert not list(tmp_path.glob("*.tmp"))


def test_an_unwritable_folder_is_an_error_naming_it(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match=r"--workdir=.*file/run is not writable"):
    RunFiles(str(tmp_path / "file" / "run"))


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  files = RunFiles(str(tmp_path))
  files.write_json("config.json", {})
  files.append("metrics.jsonl", {"epoch": 1})
  assert not files.writes and list(tmp_path.iterdir()) == []


def test_log_lines():
  record = {
    "epoch": 7,
    "loss": 0.5,
    "bpr": 0.4,
    "l2": 0.01,
    "user_sgl": 2.0,
    "weight_user_sgl": 0.0123,
    "epoch_s": 1.5,
    "interactions_per_s": 12345.6,
    "elapsed_s": 9.25,
    "valid": {"recall@20": 0.25, "ndcg@20": 0.125},
  }
  line = runfiles.format_epoch(record, ("user_sgl",))
  assert line == (
    "epoch   7 | loss=0.5000 bpr=0.4000 l2=0.0100 user_sgl=2.0000 | w user_sgl=0.0123 | "
    "1.50s (12,346 interactions/s) | valid recall@20=0.2500 ndcg@20=0.1250 | elapsed 9.2s"
  )
  final = {
    "best_epoch": 3,
    "test": {"recall@20": 0.3, "ndcg@20": 0.2},
    "popularity": {"recall@20": 0.1, "ndcg@20": 0.05},
    "aux_weights": {"user_sgl": 0.02},
  }
  assert runfiles.format_final(final) == (
    "best epoch 3 | test recall@20=0.3000 ndcg@20=0.2000 | popularity recall@20=0.1000 "
    "ndcg@20=0.0500 | w user_sgl=0.02"
  )
  step = {
    "meta_step": 4,
    "step": 200,
    "weights": {"user_sgl": 0.05},
    "hypergrad": {"user_sgl": -0.5},
    "negative_curvature": False,
    "num_steps": 12,
    "relative_residual": 3.0,
    "lambda_max": 40.0,
    "meta_step_s": 0.25,
    "meta_over_inner": 5.0,
    "skipped": True,
  }
  line = runfiles.format_meta_step(step, "cg", max_residual=1.0)
  assert line.startswith("meta 4 (step 200) w_user_sgl=0.05 | hypergrad -0.5 | CG 12 steps")
  assert line.endswith("| SKIPPED (relative residual above --max_residual=1)")
