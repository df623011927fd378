"""experiments.time_to_accuracy: t99 from hand-written curves, and a tiny end-to-end run."""

import json

from helpers import run_cli

from experiments import time_to_accuracy as tta

POINTS = [
  {"epoch": 1, "elapsed_s": 10.0, "recall@20": 0.10, "ndcg@20": 0.05},
  {"epoch": 2, "elapsed_s": 20.0, "recall@20": 0.197, "ndcg@20": 0.09},
  {"epoch": 3, "elapsed_s": 30.0, "recall@20": 0.20, "ndcg@20": 0.10},
  {"epoch": 4, "elapsed_s": 40.0, "recall@20": 0.19, "ndcg@20": 0.10},
]


def test_time_to_99_percent_of_the_best():
  s = tta.time_to_fraction(POINTS, 0.99)
  assert s["best_recall@20"] == 0.20 and s["best_epoch"] == 3 and s["t_best_s"] == 30.0
  assert s["t99_s"] == 30.0 and s["epoch99"] == 3  # 0.197 < 0.99 x 0.20
  assert tta.time_to_fraction(POINTS, 0.5)["t99_s"] == 10.0
  assert tta.time_to_fraction([], 0.99)["t99_s"] is None


def test_value_at_is_the_best_so_far():
  assert tta.value_at(POINTS, 5.0) is None
  assert tta.value_at(POINTS, 35.0) == 0.20
  assert tta.value_at(POINTS, 100.0) == 0.20


def test_reference_comparison_says_when_the_reference_ran_too_short():
  fast = {"recipe": "fast", "points": POINTS[:3]}
  ref = {"recipe": "ref", "points": [{**p, "recall@20": p["recall@20"] / 2} for p in POINTS]}
  tta.summarise([ref, fast], 0.99, "ref", 1.0)
  cmp = fast["reference"]
  assert cmp["horizon_s"] == 30.0 and cmp["reference_recall@20"] == 0.10 and cmp["covered"]
  tta.summarise([ref, fast], 0.99, "ref", 10.0)
  assert not fast["reference"]["covered"] and fast["reference"]["reference_ran_s"] == 40.0
  # auto: each recipe against its own published version.
  pub = {**ref, "recipe": "fast_published"}
  tta.summarise([pub, fast], 0.99, "auto", 1.0)
  assert fast["reference"]["recipe"] == "fast_published" and "reference" not in pub


def test_end_to_end_tiny_and_resumable(tmp_path):
  args = [
    "--recipes=lightgcn_published,lightgcn",
    f"--out={tmp_path}",
    "--set=synth_users=100",
    "--set=synth_items=120",
    "--set=synth_interactions=2500",
    "--set=epochs=3",
    "--budgets=lightgcn_published=3600",
  ]
  r = run_cli("experiments.time_to_accuracy", *args)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads((tmp_path / "tta.json").read_text())
  recs = {x["recipe"]: x for x in out["recipes"]}
  assert set(recs) == {"lightgcn_published", "lightgcn"}
  # The published recipe validates every epoch; the fast one after epochs 1-3, then every 4.
  assert [p["epoch"] for p in recs["lightgcn_published"]["points"]] == [1, 2, 3]
  assert [p["epoch"] for p in recs["lightgcn"]["points"]] == [1, 2, 3]
  for rec in recs.values():
    assert rec["t99_s"] <= rec["t_best_s"] and rec["peak_rss_mib"] > 50
    assert rec["command"].startswith("python -m experiments.train --model=lightgcn")
  assert "--batch_size=2048" in recs["lightgcn_published"]["command"]
  assert "--time_budget_s=3600" in recs["lightgcn_published"]["command"]
  assert "--time_budget_s" not in recs["lightgcn"]["command"]
  assert "reference" in recs["lightgcn"] and "reference" not in recs["lightgcn_published"]
  assert (tmp_path / "tta.png").stat().st_size > 1000
  assert "| lightgcn |" in (tmp_path / "tta.md").read_text()
  # A second call reads the finished runs back instead of training them again.
  before = (tmp_path / "runs" / "lightgcn" / "metrics.jsonl").read_text()
  r = run_cli("experiments.time_to_accuracy", *args)
  assert r.returncode == 0 and "experiments.train --model" not in r.stdout
  assert (tmp_path / "runs" / "lightgcn" / "metrics.jsonl").read_text() == before


def test_unknown_recipe_is_a_clear_error(tmp_path):
  r = run_cli("experiments.time_to_accuracy", "--recipes=nope", f"--out={tmp_path}")
  assert r.returncode == 2 and "unknown or unlisted recipe 'nope'" in r.stderr


def test_bad_budget_is_a_clear_error(tmp_path):
  r = run_cli("experiments.time_to_accuracy", "--budgets=lightgcn=soon", f"--out={tmp_path}")
  assert r.returncode == 2 and "must be <listed recipe>=<seconds>" in r.stderr
