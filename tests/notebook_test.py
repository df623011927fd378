"""The Colab notebook runs end to end, on a tiny configuration, in a real Jupyter kernel
that starts without MAXRec: its first cell installs MAXRec, so that cannot rot either."""

import json
import os
import shutil
import site
import subprocess
import sys

import pytest
from helpers import ROOT

NOTEBOOK = os.path.join(ROOT, "experiments", "differentiable_ablation.ipynb")
# Left out of the copy of the repository that the kernel installs from: what a build does
# not read, and what a build writes (pip builds a local folder in place).
NOT_SOURCE = shutil.ignore_patterns(
  ".git",
  ".venv",
  "venv",
  "runs",
  "results",
  "build",
  "dist",
  "*.egg-info",
  "__pycache__",
  ".*_cache",
)


def bare_python(folder) -> str:
  """A new virtual environment in `folder` that sees every package of this one but MAXRec,
  with nothing installed in it; returns its python.

  Its site-packages holds a .pth file that lists a folder of links to this environment's
  site-packages entries, MAXRec's own left out (its dist-info, and the finder and .pth file
  of an editable install). Python does not process .pth files in a folder that a .pth file
  adds, so MAXRec is not importable there, while jax, ipykernel, pip, setuptools ... are,
  without a download.
  """
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
  python = os.path.join(folder, "bin", "python")
  purelib = subprocess.run(
    [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()
  links = os.path.join(folder, "packages")
  os.mkdir(links)
  for packages in site.getsitepackages():
    for name in os.listdir(packages) if os.path.isdir(packages) else ():
      if "maxrec" not in name.lower() and not os.path.exists(os.path.join(links, name)):
        os.symlink(os.path.join(packages, name), os.path.join(links, name))
  with open(os.path.join(purelib, "packages.pth"), "w") as f:
    f.write(links + "\n")
  return python


def test_notebook_executes(tmp_path):
  pytest.importorskip("matplotlib", reason="the notebook plots: pip install -e '.[plots]'")
  for module in ("nbclient", "nbformat", "ipykernel"):
    pytest.importorskip(
      module, reason=f"the notebook runs in a Jupyter kernel: pip install {module}"
    )
  import nbformat
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  from nbclient import NotebookClient

  python = bare_python(tmp_path / "venv")
  source = tmp_path / "MAXRec"
  shutil.copytree(ROOT, source, ignore=NOT_SOURCE, symlinks=True)
  work = tmp_path / "work"  # the kernel's working directory: no maxrec/ in it, no clone above
  work.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MPLBACKEND")}
  env.update(MAXREC_SOURCE=str(source), MAXREC_NOTEBOOK_TINY="1", PYTHONNOUSERSITE="1")
  probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('maxrec') is not None)"
  assert subprocess.run([python, "-c", probe], cwd=work, env=env).returncode == 0, (
    "maxrec is importable before the notebook installs it"
  )

  kernels = tmp_path / "kernels"
  (kernels / "bare").mkdir(parents=True)
  (kernels / "bare" / "kernel.json").write_text(
    json.dumps(
      {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (without MAXRec)",
        "language": "python",
      }
    )
  )
  km = KernelManager(
    kernel_name="bare", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
  )
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(work)}})
  client.execute(env=env)  # raises CellExecutionError, with the cell's traceback, on an error

  code = [c for c in nb.cells if c.cell_type == "code"]
  printed = [
    "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream") for c in code
  ]
  assert f"MAXRec is not installed: installing it from {source.as_uri()}" in printed[0]
  assert f"from {tmp_path / 'venv'}{os.sep}" in printed[0], printed[0][-3000:]  # not the clone
  everything = "".join(printed)
  assert "predicted Δ if removed" in everything and "measured Δ L_meta" in everything
  assert (work / "differentiable_ablation.png").exists()
