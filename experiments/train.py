"""Trains and evaluates one MAXRec model.

  python -m experiments.train                        # built-in data set, defaults
  python -m experiments.train --data_path=../shared/datasets/ml-100k/u.data
  python -m experiments.train --helpfull             # every flag

Results go to --workdir (default: a new folder under runs/).
"""

from __future__ import annotations

import datetime
import os
import sys

from absl import app, flags, logging

from experiments.config_flags import config_from_flags, define_config_flags

define_config_flags()
flags.DEFINE_string("workdir", None, "Output folder. Empty: runs/<date>-<time>-<model>.")
flags.DEFINE_bool(
  "resume", False, "Continue the interrupted run in --workdir from its last checkpoint."
)
flags.DEFINE_bool(
  "distributed",
  False,
  "Multi-host run (TPU pod slice, several GPU hosts): call jax.distributed.initialize() "
  "first; every host runs this same command.",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if flags.FLAGS.distributed:
    import jax

    jax.distributed.initialize()  # coordinator and process ids from the environment
  from maxrec.readers import DataError
  from maxrec.train import train_and_evaluate

  try:
    config = config_from_flags()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  workdir = flags.FLAGS.workdir
  if flags.FLAGS.resume and not workdir:
    print("error: --resume needs the --workdir of the run to continue.", file=sys.stderr)
    return 2
  if not workdir:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = os.path.join("runs", f"{stamp}-{config.model.model}")
  logging.info("work directory: %s", workdir)
  try:
    train_and_evaluate(config, workdir, resume=flags.FLAGS.resume)
  except (DataError, ValueError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"results: {os.path.join(workdir, 'final_metrics.json')}")
  return 0


if __name__ == "__main__":
  flags.FLAGS.set_default("logtostderr", True) if "logtostderr" in flags.FLAGS else None
  app.run(lambda argv: sys.exit(main(argv)))
