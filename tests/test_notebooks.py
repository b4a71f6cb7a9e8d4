"""The notebooks run top to bottom (code cells executed in order, tiny settings)."""
import glob
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb"))))
def test_notebook_runs(path, shapes_data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("FMJAX_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("FMJAX_NOTEBOOK_DATA_DIR", shapes_data_dir)
    monkeypatch.setenv("FMJAX_NOTEBOOK_WORKDIR", str(tmp_path / "wd"))
    with open(path) as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    namespace = {"__name__": "__notebook__"}
    for cell in cells:
        exec(compile("".join(cell["source"]), path, "exec"), namespace)
    assert "final" in namespace and namespace["final"]["step"] == 4
    assert os.listdir(tmp_path / "wd" / "images")
