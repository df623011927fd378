"""The command line as a user meets it: bad input exits non-zero with one clear line."""

import json
import math

import pytest
from helpers import run_cli


def run_train(*args):
  return run_cli("experiments.train", *args)


def test_malformed_file_is_one_clear_line(tmp_path):
  bad = tmp_path / "u.data"
  bad.write_text("1\t2\t5\t100\n1\t3\t5\n")
  r = run_train(f"--data_path={bad}", f"--workdir={tmp_path / 'run'}")
  assert r.returncode != 0
  assert "Traceback" not in r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert errors == [
    f"error: {bad}:2: expected 4 columns (user, item, rating, timestamp), found 3. Is --data_format right?"
  ]


def test_bad_flag_value_is_a_usage_error(tmp_path):
  r = run_train("--split_ratios=0.8,0.1,0.2", f"--workdir={tmp_path}")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "sums to 1.1, not 1" in r.stderr


def test_help_shows_script_and_grouped_config_flags():
  r = run_cli("experiments.train", "--help", timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  for head in (
    "flags of this script:",
    "--[no]resume",
    "\ndata:",
    "\nmodel:",
    "\ntrain:",
    "\naux:",
  ):
    assert head in r.stdout, head
  assert "--meta_lr:" in r.stdout.split("\nmeta:")[1]
  r = run_cli("experiments.train", "--inject_nan_at_step=3", timeout=120)
  assert r.returncode != 0 and "Unknown command line flag 'inject_nan_at_step'" in r.stderr


def test_train_cli_end_to_end(tmp_path):
  r = run_train(
    "--synth_users=100",
    "--synth_items=120",
    "--synth_interactions=2500",
    "--epochs=4",
    "--meta_every=1",  # the default (meta) method: meta steps once it beats popularity
    "--learning_rate=0.05",  # (after its second epoch here)
    f"--workdir={tmp_path}",
  )
  assert r.returncode == 0, r.stderr[-2000:]
  final = json.loads((tmp_path / "final_metrics.json").read_text())
  assert "recall@20" in final["test"] and "recall@20" in final["popularity"]
  assert set(final["aux_weights"]) == {"user_sgl", "item_sgl"} and final["meta"]["meta_steps"] >= 1


def test_topk_bench_runs():
  r = run_cli(
    "experiments.topk_bench", "--users=256", "--items=500", "--block=64", "--k=10", "--chunk=8",
    "--widths=20,60",
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-2000:]
  assert "two-level, padded table" in r.stdout and "x the matmul" in r.stdout
  assert "width     60" in r.stdout


def test_bench_writes_every_figure(tmp_path):
  """A tiny run of every measurement: every JSON key the benchmark reports, finite positive
  times, and one compilation per training measurement."""
  import importlib.util

  out = tmp_path / "bench.json"
  r = run_cli(
    "experiments.bench", "--only=mf,eval,lightgcn,fixed,meta,implicit", "--timed_epochs=1",
    "--mf_timed_epochs=2", "--synth_users=300", "--synth_items=400",
    "--synth_interactions=8000", "--batch_size=256", "--meta_every=5", f"--out={out}",
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads(out.read_text())
  keys = ["mf_epoch_s", "mf_sgd_epoch_s", "lightgcn_epoch_s", "eval_s", "matmul_s"]
  keys += ["fixed_epoch_s", "meta_epoch_s", "peak_rss_mib"]
  if importlib.util.find_spec("implicit") is not None:
    keys.append("implicit_epoch_s")
  for key in keys:
    assert math.isfinite(res[key]) and res[key] > 0, key
  assert all(res[k]["compilations"] == 1 for k in ("mf", "mf_sgd", "lightgcn", "fixed", "meta"))
  assert res["meta"]["meta_steps_timed"] >= 1
  import jax.numpy as jnp

  from maxrec import metrics

  assert res["eval_top_k"] == metrics.top_k_method(jnp.zeros((2, 2)))
  from maxrec import sparse

  kernel = sparse.resolve_kernel("auto", sharded=False)
  assert res["mf"]["sparse_kernel"] == res["mf_sgd"]["sparse_kernel"] == kernel
  if kernel == "native":  # the XLA step timed beside it
    assert res["mf_xla"]["sparse_kernel"] == "xla" and res["mf_xla_epoch_s"] > 0
    assert res["mf_xla"]["compilations"] == 1
  assert "eval / bare matmul" in r.stdout and "meta / fixed epoch" in r.stdout


def test_graph_filter_validates_ranks_and_tests_the_best(tmp_path):
  r = run_cli(
    "experiments.graph_filter", "--synth_users=150", "--synth_items=120",
    "--synth_interactions=3000", "--ranks=4,16", f"--out={tmp_path}",
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-2000:]
  final = json.loads((tmp_path / "final_metrics.json").read_text())
  assert final["rank"] in (4, 16) and set(final["by_rank"]) == {"4", "16"}
  best = max(final["by_rank"].values(), key=lambda v: v["valid"]["recall@20"])
  assert final["valid"] == best["valid"]
  # The filter ranks held-out items far better than popularity on the clustered data.
  assert final["test"]["recall@20"] > final["popularity"]["recall@20"]
  r = run_cli("experiments.graph_filter", "--synth_users=150", "--synth_items=120",
              "--synth_interactions=3000", "--ranks=500", f"--out={tmp_path}")  # fmt: skip
  assert r.returncode == 1 and "rank=500 must be in" in r.stderr


def test_meta_objectives_scores_each_run_on_the_validation_pairs(tmp_path):
  """Two trained runs (MF after 1 and after 10 epochs): the script recomputes each held-out
  loss from the saved embeddings (checked here against NumPy for BPR's bounds and the
  softmax cross-entropy's definition) and reports the rank correlations."""
  import numpy as np

  data = ["--synth_users=80", "--synth_items=100", "--synth_interactions=2000"]
  for name, epochs in (("short", 1), ("long", 10)):
    r = run_train(*data, "--weighting=none", f"--epochs={epochs}", "--learning_rate=0.01",
                  f"--workdir={tmp_path}/cmp/runs/{name}/seed0")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
  r = run_cli("experiments.meta_objectives", *data, f"--runs={tmp_path}/cmp",
              f"--out={tmp_path}/mo")  # fmt: skip
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads((tmp_path / "mo" / "meta_objectives.json").read_text())
  rows = {row["run"]: row for row in out["runs"]}
  assert set(rows) == {"short/seed0", "long/seed0"}
  assert set(out["spearman"]) == {"bpr", "softmax"}
  # the softmax loss of one model, from its definition (training items masked)
  from maxrec import data as data_lib
  from maxrec import recommend
  from maxrec.config import Config

  cfg = Config.from_flat(synth_users=80, synth_items=100, synth_interactions=2000)
  ds = data_lib.load_dataset(cfg.data, seed=0)
  m = recommend.load_model(str(tmp_path / "cmp" / "runs" / "long" / "seed0"))
  ce = []
  for u, i in ds.valid:
    s = m.user_emb[u].astype(np.float64) @ m.item_emb.T.astype(np.float64)
    keep = np.ones(ds.n_items, bool)
    keep[ds.train[ds.train[:, 0] == u, 1]] = False
    ce.append(np.log(np.exp(s[keep]).sum()) - s[i])
  assert rows["long/seed0"]["softmax"] == pytest.approx(np.mean(ce), rel=1e-4)
  assert 0 < rows["long/seed0"]["bpr"] < rows["short/seed0"]["bpr"] < math.log(2) + 0.05
  assert "Spearman" in (tmp_path / "mo" / "meta_objectives.md").read_text()
  r = run_cli("experiments.meta_objectives", *data, f"--runs={tmp_path}/none",
              f"--out={tmp_path}/mo")  # fmt: skip
  assert r.returncode == 2 and "no finished run" in r.stderr


def test_buckets_split_the_test_metric_by_user_activity(tmp_path):
  """The per-group recalls, weighted by each group's evaluated users, give back the run's
  own test Recall@20: the groups partition the test users and use the same protocol."""
  data = ["--synth_users=80", "--synth_items=100", "--synth_interactions=2000"]
  r = run_train(*data, "--weighting=none", "--epochs=3", "--learning_rate=0.01",
                f"--workdir={tmp_path}/cmp/runs/mf/seed0")  # fmt: skip
  assert r.returncode == 0, r.stderr[-2000:]
  r = run_cli("experiments.buckets", *data, "--buckets=3", f"--runs={tmp_path}/cmp",
              f"--out={tmp_path}/b")  # fmt: skip
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads((tmp_path / "b" / "buckets.json").read_text())
  assert len(out["groups"]) == 3 and len(out["runs"]) == 1
  final = json.loads((tmp_path / "cmp/runs/mf/seed0/final_metrics.json").read_text())
  users, values = out["users"], out["runs"][0]["by_group"]
  overall = sum(n * v for n, v in zip(users, values)) / sum(users)
  assert overall == pytest.approx(final["test"]["recall@20"], rel=1e-5)
  r = run_cli("experiments.buckets", *data, "--buckets=0", f"--runs={tmp_path}/cmp")
  assert r.returncode == 2 and "--buckets=0 must be >= 1" in r.stderr
