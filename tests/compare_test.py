"""The comparison script: tables, CSV and resumption, on a tiny configuration."""

import csv
import os

from helpers import run_cli

TINY = [
  "--synth_users=80",
  "--synth_items=120",
  "--synth_interactions=1600",
  "--epochs=2",
  "--batch_size=256",
  "--meta_every=2",
  "--hyper_batch_size=128",
  "--meta_batch_size=128",
]


def run(out, *args):
  return run_cli("experiments.compare", f"--out={out}", *TINY, *args, timeout=900)


def test_compare_writes_tables_and_resumes(tmp_path):
  out = tmp_path / "cmp"
  r = run(out, "--methods=mf,mf_fixed,mf_meta", "--fixed_grid=0.01,0.1", "--seeds=0,1")
  assert r.returncode == 0, r.stderr[-3000:]
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == (1 + 2 + 1) * 2  # mf, two grid values, meta; two seeds
  assert {row["run"] for row in rows} == {"mf", "mf_fixed@0.01", "mf_fixed@0.1", "mf_meta"}
  table = (out / "results.md").read_text()
  assert "| mf_meta |" in table and "vs best baseline" in table and "Command:" in table
  stamp = os.path.getmtime(out / "runs" / "mf" / "seed0" / "final_metrics.json")
  r = run(out, "--methods=mf,mf_fixed,mf_meta", "--fixed_grid=0.01,0.1", "--seeds=0,1")
  assert r.returncode == 0 and "skip mf seed 0 (done)" in r.stderr
  assert os.path.getmtime(out / "runs" / "mf" / "seed0" / "final_metrics.json") == stamp


def test_unknown_method_is_a_usage_error(tmp_path):
  r = run(tmp_path, "--methods=svd")
  assert r.returncode == 2 and "unknown method 'svd'" in r.stderr
