"""Saving, loading and recommending in raw ids, from Python and from the command line."""

import csv

import numpy as np
import pytest
from helpers import run_cli

from maxrec import recommend, train
from maxrec.config import Config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny MF run on a CSV data set with string ids."""
  d = tmp_path_factory.mktemp("rec")
  rng = np.random.default_rng(0)
  lines = ["uid,sku"]
  seen = set()
  for u in range(40):
    for i in rng.choice(60, 12, replace=False):
      lines.append(f"user-{u},sku-{i}")
      seen.add((f"user-{u}", f"sku-{i}"))
  (d / "clicks.csv").write_text("\n".join(lines) + "\n")
  cfg = Config.from_flat(
    data_path=str(d / "clicks.csv"),
    user_column="uid",
    item_column="sku",
    weighting="none",
    epochs=3,
    batch_size=128,
  )
  train.train_and_evaluate(cfg, str(d / "run"))
  return d / "run", seen


def test_saved_model_round_trip_and_unseen_recommendations(trained):
  run, seen = trained
  model = recommend.load_model(str(run))
  assert model.user_emb.shape == (40, 64) and model.item_ids.dtype.kind == "U"
  rows = recommend.recommend(model, ["user-3", "user-7"], k=5)
  assert [r[0] for r in rows] == ["user-3"] * 5 + ["user-7"] * 5
  assert [r[1] for r in rows[:5]] == [1, 2, 3, 4, 5]
  assert all((u, i) not in seen for u, _, i, _ in rows)  # never an item the user has
  scores = [r[3] for r in rows[:5]]
  assert scores == sorted(scores, reverse=True)
  # scores are the saved embeddings' inner products
  u = model.user_index(["user-3"])[0]
  i = list(model.item_ids).index(rows[0][2])
  assert rows[0][3] == pytest.approx(float(model.user_emb[u] @ model.item_emb[i]), rel=1e-5)


def test_all_users_and_small_catalogue(trained):
  run, _ = trained
  model = recommend.load_model(str(run))
  rows = recommend.recommend(model, None, k=100, batch_size=16)  # k > unseen items per user
  per_user = {}
  for u, _, _, _ in rows:
    per_user[u] = per_user.get(u, 0) + 1
  assert len(per_user) == 40 and set(per_user.values()) == {60 - 12}


def test_unknown_user_is_a_clear_error(trained):
  run, _ = trained
  with pytest.raises(ValueError, match="user 'nobody' is not in the trained model"):
    recommend.recommend(recommend.load_model(str(run)), ["nobody"])


def test_cli_writes_csv(trained, tmp_path):
  run, seen = trained
  out = tmp_path / "recs.csv"
  r = run_cli(
    "experiments.recommend", f"--run={run}", "--users=user-1", "--k=3", f"--out={out}", timeout=300
  )
  assert r.returncode == 0, r.stderr[-2000:]
  rows = list(csv.DictReader(out.open()))
  assert [row["rank"] for row in rows] == ["1", "2", "3"] and rows[0]["user"] == "user-1"
  r = run_cli("experiments.recommend", f"--run={run}", "--users=ghost", timeout=300)
  assert r.returncode == 1 and "Traceback" not in r.stderr and "user 'ghost'" in r.stderr
