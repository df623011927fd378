"""Downloads a public data set into the cache and prints the --data_path to train on it.

  python -m experiments.download --dataset=ml-100k
  python -m experiments.train --data_path="$(python -m experiments.download --dataset=ml-100k)"

Data sets: ml-100k, ml-1m (GroupLens), gowalla, yelp2018, amazon-book (LightGCN splits).
The cache is --cache_dir, else $MAXREC_CACHE, else ~/.cache/maxrec.
"""

from __future__ import annotations

import sys

from absl import app, flags

from maxrec import datasets

flags.DEFINE_enum("dataset", None, list(datasets.REGISTRY), "The data set to download.")
flags.DEFINE_string("cache_dir", None, "Cache folder (default $MAXREC_CACHE or ~/.cache/maxrec).")
flags.DEFINE_string("base_url", None, "A mirror to download from instead of the public source.")
flags.DEFINE_float("timeout", 60.0, "Seconds per request.")
flags.DEFINE_bool("skip_count_check", False, "Accept LightGCN files whose counts differ.")


def main(argv):
  del argv
  fv = flags.FLAGS
  if fv.dataset is None:
    print(f"error: --dataset is required: one of {', '.join(datasets.REGISTRY)}.", file=sys.stderr)
    return 2
  try:
    path = datasets.download(
      fv.dataset,
      fv.cache_dir,
      base_url=fv.base_url,
      timeout=fv.timeout,
      check_counts=not fv.skip_count_check,
    )
  except datasets.DownloadError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
