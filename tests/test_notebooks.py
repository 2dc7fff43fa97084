"""All notebooks executed in order with papermill in the smoke profile, and the runner's failure
report. One run shares its artifacts between the notebooks, as `cam2mask reproduce` does."""
import json

import nbformat
import pandas as pd
import pytest

from cam2mask_lib.runner import ReproduceError, list_notebooks, reproduce


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    runs = reproduce("smoke", output_dir=root / "nb", figures=root / "fig", artifacts=root / "art",
                     progress=False)
    return root, runs


@pytest.mark.notebook
def test_every_notebook_runs_in_order(smoke_run):
    root, runs = smoke_run
    assert [r.name for r in runs] == [p.stem for p in list_notebooks()]
    for r in runs:
        nb = nbformat.read(r.output, as_version=4)
        assert "start_time" not in json.dumps(nb.metadata)
        assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    timings = json.loads((root / "art" / "timings.json").read_text())
    assert set(timings) == {r.name for r in runs}


@pytest.mark.notebook
def test_eda_outputs(smoke_run):
    root, _ = smoke_run
    fig = root / "fig"
    for name in ("eda_class_counts.png", "eda_class_counts.md", "eda_class_counts.csv",
                 "eda_examples.png", "eda_defect_free.png", "eda_cooccurrence.png",
                 "eda_mask_area.png", "eda_rle_example.png", "eda_folds.md", "eda_texture.md"):
        assert (fig / name).is_file(), name
    md = (fig / "eda_class_counts.md").read_text()
    assert "Profile `smoke`" in md and "SYNTHETIC" in md and "paper images" in md
    assert (root / "art" / "folds_k3_seed0.csv").is_file()


@pytest.mark.notebook
def test_classification_outputs(smoke_run):
    root, _ = smoke_run
    for name in ("table1_classification_auc.md", "table1_classification_auc.csv",
                 "cls_training_curves.png", "cls_roc_curves.png"):
        assert (root / "fig" / name).is_file(), name
    md = (root / "fig" / "table1_classification_auc.md").read_text()
    assert "random init" in md and "EfficientNet-b0 + HFlip" in md and "SYNTHETIC" in md
    runs = list((root / "art" / "classifier").glob("*/oof.csv"))
    assert len(runs) == 1
    oof = pd.read_csv(runs[0]).filter(like="p_")
    assert len(oof) == 40 and oof.notna().all().all() and ((oof >= 0) & (oof <= 1)).all().all()


@pytest.mark.notebook
def test_cam_and_postprocessing_outputs(smoke_run):
    root, _ = smoke_run
    fig = root / "fig"
    for name in ("cam_figures_10_13.png", "cam_guided_gradcam.png", "table2_cam_dice.md",
                 "table2_cam_dice.csv", "table2_per_class.md", "postprocess_gallery.png"):
        assert (fig / name).is_file(), name
    t2 = pd.read_csv(fig / "table2_cam_dice.csv")
    exps = " ".join(t2["experiment"])
    for part in ("no mask anywhere", "whole image where the classifier fires", "Grad-CAM +",
                 "Grad-CAM++ +", "SWA + aug smooth", "per-class", "paper's parameters", "layercam"):
        assert part in exps, part
    d = t2["Dice (defective images)"]
    assert ((d >= 0) & (d <= 1)).all()
    assert t2["paper Dice"].notna().sum() == 4
    preds = list((root / "art" / "predictions").glob("*/predictions.csv"))
    assert len(preds) == 1 and preds[0].read_text().startswith("ImageId,ClassId,EncodedPixels")
    assert list((root / "art" / "predictions").glob("*/postprocess_params.json"))


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


def test_only_selector():
    assert [p.stem for p in list_notebooks(only=["0"])] == ["00_data_eda"]
    assert [p.stem for p in list_notebooks(only=["01", "00_data_eda"])] == ["00_data_eda", "01_classification"]
    with pytest.raises(ReproduceError, match="matches no notebook"):
        list_notebooks(only=["99"])
