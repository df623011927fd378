"""The comparison script: tables, CSV and resumption, on a tiny configuration."""

import csv
import json
import os
import subprocess
import sys

from helpers import ROOT, run_cli

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


def test_ablation_grids_and_replay(tmp_path):
  """The meta ablations expand into one run per grid value, and the [A9] replay trains on
  R_in ∪ R_meta of the same split with the meta run's logged weights."""
  out = tmp_path / "cmp"
  r = run(
    out,
    "--methods=mf_meta_heldout,mf_meta_replay,mf_meta_cg_iters,mf_meta_split",
    "--cg_iters_grid=1,3",
    "--meta_split_grid=0.2",
    "--seeds=0",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  with open(out / "results.csv") as f:
    runs = {row["run"] for row in csv.DictReader(f)}
  assert runs == {
    "mf_meta_heldout",
    "mf_meta_replay",
    "mf_meta_cg_iters@1",
    "mf_meta_cg_iters@3",
    "mf_meta_split@0.2",
  }
  runs_dir = out / "runs"
  cfg = json.loads((runs_dir / "mf_meta_cg_iters@3" / "seed0" / "config.json").read_text())
  assert cfg["cg_iters"] == 3
  summary = {
    m: json.loads((runs_dir / m / "seed0" / "data_summary.json").read_text())
    for m in ("mf_meta_heldout", "mf_meta_replay", "mf_meta_split@0.2")
  }
  meta, replayed = summary["mf_meta_heldout"], summary["mf_meta_replay"]
  assert meta["n_meta"] > 0 and replayed["n_meta"] == 0
  assert replayed["n_train"] == meta["n_train"] + meta["n_meta"]
  assert replayed["n_valid"] == meta["n_valid"] and replayed["n_test"] == meta["n_test"]
  assert summary["mf_meta_split@0.2"]["n_meta"] > meta["n_meta"]


def test_replay_needs_its_meta_run(tmp_path):
  r = run(tmp_path, "--methods=mf_meta_replay", "--seeds=0")
  assert r.returncode == 1 and "list mf_meta_heldout before mf_meta_replay" in r.stderr


def test_fixed_families_grid_weight_by_temperature():
  """--temperature_grid crosses the fixed weights with InfoNCE temperatures, for the SGL
  and the noise-view families; without it the names stay `B_fixed@w`. (In a child: the
  module defines absl flags that other experiment modules define too.)"""
  code = """
import json
from experiments.compare import expand
grids = {"fixed_grid": ["0.1", "1"], "temperature_grid": ["0.2", "0.5"]}
plain = {"fixed_grid": ["0.1"], "temperature_grid": []}
print(json.dumps([dict(expand("lightgcn_fixed_noise", grids)), dict(expand("lightgcn_fixed", plain))]))
"""
  import subprocess
  import sys

  from helpers import ROOT

  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  runs, plain = json.loads(out.stdout)
  assert set(runs) == {
    "lightgcn_fixed_noise@0.1,tau0.2",
    "lightgcn_fixed_noise@0.1,tau0.5",
    "lightgcn_fixed_noise@1,tau0.2",
    "lightgcn_fixed_noise@1,tau0.5",
  }
  o = runs["lightgcn_fixed_noise@1,tau0.5"]
  assert o["aux_weights"] == [1.0] and o["ssl_temperature"] == 0.5
  assert o["aux_tasks"] == ["user_simgcl", "item_simgcl"]
  assert (
    set(plain) == {"lightgcn_fixed@0.1"} and "ssl_temperature" not in plain["lightgcn_fixed@0.1"]
  )


def test_the_written_command_has_no_path_of_this_machine():
  """An absolute --out inside the working directory is written relative (in a child:
  importing the script defines its flags)."""
  code = (
    "import os\n"
    "from experiments.compare import _portable\n"
    "here = os.getcwd()\n"
    "assert _portable(f'--out={here}/results/x') == '--out=results/x'\n"
    "assert _portable('--out=/elsewhere/x') == '--out=/elsewhere/x'\n"
    "assert _portable('--seeds=0,1') == '--seeds=0,1'\n"
    "print('ok')\n"
  )
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
