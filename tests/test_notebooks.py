"""Notebooks executed with papermill in the smoke profile, and the runner's failure report."""
import json

import nbformat
import pytest

from cam2mask_lib.runner import ReproduceError, list_notebooks, reproduce


@pytest.mark.notebook
def test_eda_notebook_in_smoke_profile(tmp_path):
    runs = reproduce("smoke", only=["00"], output_dir=tmp_path / "nb", figures=tmp_path / "fig",
                     artifacts=tmp_path / "art", progress=False)
    assert [r.name for r in runs] == ["00_data_eda"]
    nb = nbformat.read(tmp_path / "nb" / "00_data_eda.ipynb", as_version=4)
    text = json.dumps(nb)
    assert "SYNTHETIC" in text
    for name in ("eda_class_counts.png", "eda_class_counts.md", "eda_class_counts.csv",
                 "eda_examples.png", "eda_defect_free.png", "eda_cooccurrence.png",
                 "eda_mask_area.png", "eda_rle_example.png", "eda_folds.md", "eda_texture.md"):
        assert (tmp_path / "fig" / name).is_file(), name
    md = (tmp_path / "fig" / "eda_class_counts.md").read_text()
    assert "Profile `smoke`" in md and "SYNTHETIC" in md and "paper images" in md
    assert (tmp_path / "art" / "folds_k3_seed0.csv").is_file()
    assert "start_time" not in json.dumps(nb.metadata)


def test_failure_names_notebook_and_cell_and_keeps_last_good_copy(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("profile = 'smoke'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell("raise ValueError('boom in cell two')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, books / "07_broken.ipynb")
    out = tmp_path / "out"
    out.mkdir()
    (out / "07_broken.ipynb").write_text("last good copy")
    with pytest.raises(ReproduceError, match=r"07_broken.ipynb failed in cell .*ValueError: boom in cell two"):
        reproduce("smoke", notebooks_dir=books, output_dir=out, figures=tmp_path / "f",
                  artifacts=tmp_path / "a", progress=False)
    assert (out / "07_broken.ipynb").read_text() == "last good copy"
    assert (tmp_path / "a" / "failed" / "07_broken.ipynb").is_file()


def test_only_selector(tmp_path):
    assert [p.stem for p in list_notebooks(only=["0"])][:1] == ["00_data_eda"]
    with pytest.raises(ReproduceError, match="matches no notebook"):
        list_notebooks(only=["99"])
