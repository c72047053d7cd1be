"""The analysis notebooks run as stored, each within a minute, and draw their figures.

(`compare_sweep.ipynb` needs a sweep folder and is run by `tests/test_compare.py`.)
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
# notebook -> how many figures it draws
FIGURES = {"attention_maps": 2, "position_embeddings": 2, "mixer_weights": 2}


def test_every_notebook_is_run_by_the_suite():
    stored = {path.stem for path in (ROOT / "notebooks").glob("*.ipynb")}
    assert stored == {*FIGURES, "compare_sweep"}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_in_under_a_minute_and_draws_its_figures(name, monkeypatch):
    for variable in ("VITLAB_STEPS", "VITLAB_NPZ"):
        monkeypatch.delenv(variable, raising=False)
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells), "store it without outputs"
    client = NotebookClient(
        notebook,
        timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": ROOT / "notebooks"}},
    )
    client.execute()
    images = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == FIGURES[name]
