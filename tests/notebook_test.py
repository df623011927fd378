"""The Colab notebook runs end to end on a tiny configuration, so it cannot rot."""

import json
import os

import pytest
from helpers import ROOT, run_script

NOTEBOOK = os.path.join(ROOT, "experiments", "differentiable_ablation.ipynb")


def test_notebook_executes(tmp_path):
  pytest.importorskip("matplotlib", reason="the notebook plots: pip install -e '.[plots]'")
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  assert len(cells) >= 4
  script = tmp_path / "notebook.py"
  script.write_text("\n\n".join(cells))
  r = run_script(script, env={"MAXREC_NOTEBOOK_TINY": "1", "MPLBACKEND": "Agg"}, timeout=900)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "predicted Δ if removed" in r.stdout and "measured Δ L_meta" in r.stdout
  assert (tmp_path / "differentiable_ablation.png").exists()
