"""The Colab notebook executes top to bottom, headless on CPU, with a CPU-sized override."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab", "kdiff_jax_demo.ipynb")


def test_colab_notebook_runs_headless(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("torch")
  monkeypatch.setenv("KDIFF_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("KDIFF_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  shown = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert len(shown) == 4  # 1/2/4-step grids and the PyTorch grid
  assert os.path.exists(tmp_path / "run" / "export" / "step20.json")
