"""Helpers shared by the tests that drive the command lines as a user would."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(module: str, *args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
  """Runs `python -m <module> <args>` from the repository root, capturing its output."""
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    **kw,
  )


def start_cli(module: str, *args: str) -> subprocess.Popen:
  """Starts `python -m <module> <args>` in the background (to signal it)."""
  return subprocess.Popen(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def run_script(script, *args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
  """Runs `python <script> <args>` in the script's folder with `env` added to the
  environment and the repository on PYTHONPATH, capturing its output."""
  return subprocess.run(
    [sys.executable, str(script), *args],
    cwd=os.path.dirname(str(script)),
    env={**os.environ, **env, "PYTHONPATH": ROOT},
    capture_output=True,
    text=True,
    timeout=timeout,
  )
