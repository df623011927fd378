"""Multi-host runs for real: two processes joined by `jax.distributed.initialize` on the
loopback address, each with two simulated CPU devices, train on one 4-device mesh,
checkpoint, are killed, resume, and end as an uninterrupted single-process run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import ROOT

RUN = [
  "--weighting=meta",
  "--epochs=4",
  "--patience=8",
  "--checkpoint_every=1",
  "--synth_users=200",
  "--synth_items=300",
  "--synth_interactions=6000",
  "--batch_size=256",
  "--learning_rate=0.05",
  "--meta_every=5",
  "--hyper_batch_size=256",
  "--meta_batch_size=256",
  "--mesh_devices=4",
]


def start(workdir, devices: int, *args) -> subprocess.Popen:
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
  }
  return subprocess.Popen(
    [sys.executable, "-m", "experiments.train", *RUN, f"--workdir={workdir}", *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def start_two(workdir, *args) -> list[subprocess.Popen]:
  with socket.socket() as s:  # a free port for the coordinator
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return [
    start(
      workdir,
      2,
      "--distributed",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
      *args,
    )
    for i in range(2)
  ]


def finish(procs) -> list[str]:
  errs = []
  for p in procs:
    _, err = p.communicate(timeout=900)
    errs.append(err)
    assert p.returncode == 0, err[-3000:]
  return errs


def records(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_two_processes_checkpoint_killed_resume_equal_one_process(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  single = start(one, 4)  # beside the first two-process run: they compile at once
  procs = start_two(two)
  target = two / "checkpoints" / "ckpt_000001.msgpack"  # before the first meta step
  deadline = time.time() + 900
  while not target.exists() and all(p.poll() is None for p in procs) and time.time() < deadline:
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.wait()
  finish([single])
  assert target.exists() and not (two / "final_metrics.json").exists()
  assert sorted(os.listdir(two / "checkpoints"))[-1] in (
    "ckpt_000001.msgpack",
    "ckpt_000002.msgpack",
  )

  errs = finish(start_two(two, "--resume"))
  assert all("resumed from" in e for e in errs)
  assert "2 process(es)" in errs[0]
  a = json.loads((one / "final_metrics.json").read_text())
  b = json.loads((two / "final_metrics.json").read_text())
  assert a["best_epoch"] == b["best_epoch"] and a["epochs_run"] == b["epochs_run"] == 4
  # Cross-process all-reduces sum in another order than one process's: equal to rounding.
  for split in ("valid", "test"):
    for k, v in a[split].items():
      assert b[split][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (split, k)
  for ra, rb in zip(records(one), records(two), strict=True):
    assert ra["epoch"] == rb["epoch"]
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
  assert a["meta"]["meta_steps"] == b["meta"]["meta_steps"]
  assert (two / "model.npz").exists()
