"""notebooks/dependency_maps.ipynb runs end to end on a tiny run directory (random parameters, no training) and shows
the coloured completion and the image overlay; its outputs are stripped in git."""

import base64
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from test_analysis import make_tiny_run

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "dependency_maps.ipynb"


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  # The notebook imports the library and defines nothing of its own.
  assert not any(line.lstrip().startswith(("def ", "class ")) or "lambda" in line
                 for c in code for line in c.source.splitlines())


def test_notebook_runs_on_a_tiny_run(tmp_path, monkeypatch):
  run_dir = tmp_path / "run"
  make_tiny_run(run_dir)
  for var in ("MPLCONFIGDIR", "IPYTHONDIR", "TIKTOKEN_CACHE_DIR"):
    (tmp_path / var.lower()).mkdir()
    monkeypatch.setenv(var, str(tmp_path / var.lower()))
  # The parameters cell reads these: one held-out prompt plus the drawn image, two short rollouts each.
  monkeypatch.setenv("JAXVG_NB_RUN", str(run_dir))
  monkeypatch.setenv("JAXVG_NB_PROMPTS", "1")
  monkeypatch.setenv("JAXVG_NB_SAMPLES", "2")
  monkeypatch.setenv("JAXVG_NB_MAX_NEW_TOKENS", "8")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  html = [o.data["text/html"] for o in outputs if o.output_type == "display_data" and "text/html" in o.data]
  # One coloured completion per prompt (2), then one step table per prompt (2).
  spans = [h for h in html if "<span" in h and "rgba(220, 38, 38," in h]
  assert len(spans) == 2 and any("user" in h for h in spans)
  assert sum("<table>" in h and "Otsu threshold" in h for h in html) == 2
  pngs = [o.data["image/png"] for o in outputs if "data" in o and "image/png" in o.data]
  assert len(pngs) == 3  # the image overlay, the PGPO plot, the distribution
  assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "sum of weights" in text and "the top 10% carry" in text
  # Nothing on the kernel's stderr: no library warning (e.g. tqdm's "IProgress not found" without ipywidgets).
  stderr = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stderr")
  assert "Warning" not in stderr, stderr


def test_notebook_says_how_to_create_a_missing_run(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXVG_NB_RUN", str(tmp_path / "missing"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells = nb.cells[:3]  # the parameters and the loading cell
  with pytest.raises(Exception, match="python -m jaxvg.train --config configs/demo.py"):
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
