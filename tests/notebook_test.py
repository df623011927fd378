"""The Colab notebook runs end to end on a tiny configuration, so it cannot rot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "differentiable_ablation.ipynb")


def test_notebook_executes(tmp_path):
  pytest.importorskip("matplotlib", reason="the notebook plots: pip install -e '.[plots]'")
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  assert len(cells) >= 4
  script = tmp_path / "notebook.py"
  script.write_text("\n\n".join(cells))
  env = {**os.environ, "MAXREC_NOTEBOOK_TINY": "1", "MPLBACKEND": "Agg", "PYTHONPATH": ROOT}
  r = subprocess.run(
    [sys.executable, str(script)],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "predicted Δ if removed" in r.stdout and "measured Δ L_meta" in r.stdout
  assert (tmp_path / "differentiable_ablation.png").exists()
