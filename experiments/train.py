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

from experiments.config_flags import config_from_flags, define_config_flags, parse_flags

define_config_flags()
flags.DEFINE_string("workdir", None, "Output folder. Empty: runs/<date>-<time>-<model>.")
flags.DEFINE_bool(
  "resume", False, "Continue the interrupted run in --workdir from its last checkpoint."
)
flags.DEFINE_bool(
  "distributed",
  False,
  "Multi-host run (TPU pod slice, several GPU hosts): call jax.distributed.initialize() "
  "first; every host runs this same command with the same --workdir on a shared file "
  "system. The coordinator and process ids come from the cluster (TPU, SLURM, MPI) or from "
  "--coordinator_address, --num_processes and --process_id.",
)
flags.DEFINE_string(
  "coordinator_address", None, "With --distributed: host:port of process 0 (e.g. 10.0.0.1:1234)."
)
flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's id, 0 to N-1.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if flags.FLAGS.distributed:
    import jax

    jax.distributed.initialize(  # None: from the cluster's environment
      coordinator_address=flags.FLAGS.coordinator_address,
      num_processes=flags.FLAGS.num_processes,
      process_id=flags.FLAGS.process_id,
    )
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
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
