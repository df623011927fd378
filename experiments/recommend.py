"""Writes top-K recommendations of a trained run, in raw ids, to CSV.

  python -m experiments.recommend --run=runs/<workdir> --users=196,186 --k=10
  python -m experiments.recommend --run=runs/<workdir> --all_users --out=recs.csv

Items a user has interacted with anywhere in the data set are never recommended.
"""

from __future__ import annotations

import csv
import sys

from absl import app, flags

flags.DEFINE_string("run", None, "A run's work directory (or its model.npz).")
flags.DEFINE_list("users", [], "Raw user ids to recommend for.")
flags.DEFINE_bool("all_users", False, "Recommend for every user.")
flags.DEFINE_integer("k", 10, "Items per user.")
flags.DEFINE_string("out", None, "CSV file to write. Empty: print to stdout.")


def main(argv):
  del argv
  from maxrec import recommend

  fv = flags.FLAGS
  if not fv.run:
    print(
      "error: --run is required (a work directory written by experiments.train).", file=sys.stderr
    )
    return 2
  if bool(fv.users) == fv.all_users:
    print("error: give either --users=id,id,... or --all_users.", file=sys.stderr)
    return 2
  if fv.k < 1:
    print(f"error: --k={fv.k} must be >= 1.", file=sys.stderr)
    return 2
  try:
    model = recommend.load_model(fv.run)
    rows = recommend.recommend(model, None if fv.all_users else fv.users, k=fv.k)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  out = open(fv.out, "w", newline="") if fv.out else sys.stdout
  try:
    w = csv.writer(out)
    w.writerow(["user", "rank", "item", "score"])
    w.writerows([(u, r, i, f"{s:.6f}") for u, r, i, s in rows])
  finally:
    if fv.out:
      out.close()
  if fv.out:
    print(f"wrote {len(rows):,} recommendations to {fv.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
