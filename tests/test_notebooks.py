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
    (root / "art").mkdir()  # a time left by a notebook that no longer exists is dropped
    (root / "art" / "timings.json").write_text(json.dumps({"06_renamed_away": 11.0}))
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
    from cam2mask_lib.experiments import PAPER_DICE

    assert t2[PAPER_DICE].notna().sum() == 4
    # the paper's numbers stand beside the metric they can be: Dice on non-empty masks
    cols = list(t2.columns)
    assert cols.index(PAPER_DICE) == cols.index("Dice (non-empty masks)") + 1
    preds = list((root / "art" / "predictions").glob("*/predictions.csv"))
    assert len(preds) == 1 and preds[0].read_text().startswith("ImageId,ClassId,EncodedPixels")
    assert list((root / "art" / "predictions").glob("*/postprocess_params.json"))


@pytest.mark.notebook
def test_segmentation_outputs(smoke_run):
    root, _ = smoke_run
    fig = root / "fig"
    for name in ("table3_segmentation.md", "table3_segmentation.csv", "table3_per_class.md",
                 "table3_per_class_bars.png", "method_overview.png"):
        assert (fig / name).is_file(), name
    t3 = pd.read_csv(fig / "table3_segmentation.csv")
    exps = list(t3["experiment"])
    for part in ("CAM masks, the paper's parameters", "CAM masks, tuned per class",
                 "network on true masks", "network on CAM masks (threshold 0.2)",
                 "network on CAM masks (tuned per class)", "network on confident CAM pixels",
                 "network on confident CAM pixels + classifier gate"):
        assert part in exps, part
    from cam2mask_lib import experiments as ex

    assert t3[ex.PAPER_DICE].notna().sum() == 3
    paper_rows = set(t3.loc[t3[ex.PAPER_DICE].notna(), "experiment"])
    assert paper_rows == {ex.CAM_PAPER_ROW, ex.SUPERVISED_ROW,
                          ex.network_row(ex.CAM_MASKS_PAPER, gate=True)}
    assert t3.set_index("experiment").loc[ex.SUPERVISED_ROW, ex.PAPER_RATIO] == pytest.approx(1)
    sup = t3.set_index("experiment").loc["network on true masks + classifier gate"]
    assert sup["ratio to supervised (defective)"] == pytest.approx(1.0)
    d = t3[["Dice (defective images)", "Dice (all images)"]]
    assert ((d >= 0) & (d <= 1)).all().all()
    # four trainings, one held-out fold each, finished and resumable
    done = list((root / "art" / "segmentation").glob("*/fold0/done.json"))
    assert len(done) >= 4
    assert "SYNTHETIC" in (fig / "table3_segmentation.md").read_text()


@pytest.mark.notebook
def test_grid_outputs(smoke_run):
    root, _ = smoke_run
    fig = root / "fig"
    for name in ("table4_architectures_losses.md", "table4_architectures_losses.csv",
                 "table4_per_class_bars.png", "table4_predictions_0.png"):
        assert (fig / name).is_file(), name
    t4 = pd.read_csv(fig / "table4_architectures_losses.csv")
    models = list(t4["model"])
    for m in ("U-Net BCE", "U-Net with ResNet encoder CCE", "ResNet encoder-decoder Focal loss",
              "FPN", "DeepLabV3+", "U-Net++", "U-Net (TernausNet-style), SWA"):
        assert m in models, m
    assert set(t4["loss"]) == {"bce_dice", "cce_dice", "focal", "bce_logdice", "lovasz",
                               "bce_smooth", "-"}
    # the first row is what drawing nothing scores on the same images: every class lost
    first = t4.iloc[0]
    assert first["model"] == "baseline: no mask anywhere" and first["loss"] == "-"
    present = [c for c in ("1", "2", "3", "4") if pd.notna(first[f"non-empty class {c}"])]
    assert present and first["Dice (non-empty masks)"] == 0
    assert first["lost classes"] == ", ".join(present)   # every class with a defect held out
    assert (t4["Dice (all)"] >= 0).all() and (t4["Dice (all)"] <= 1).all()
    assert t4["thesis Dice (all)"].notna().sum() == 9
    assert t4["lost classes"].notna().all()


@pytest.mark.notebook
def test_beyond_the_paper_outputs(smoke_run):
    root, _ = smoke_run
    fig = root / "fig"
    assert (fig / "refine_predictions_class1.png").is_file()
    assert (fig / "refine_lesson_self_training.png").is_file()
    t5 = pd.read_csv(fig / "table5_beyond_the_paper.csv").set_index("masks")
    from cam2mask_lib import experiments as ex
    assert list(t5.index) == [ex.NO_MASK, *ex.TECHNIQUES, ex.SELF_TRAINED, ex.SELF_TRAINED_05,
                              ex.SUPERVISED_NET, ex.SUPERVISED_GATED, ex.SUPERVISED_GATED_05]
    d = t5["Dice (defective images)"]
    if d[ex.SUPERVISED_GATED] != d[ex.NO_MASK]:  # a smoke network may learn nothing: no gap then
        assert t5.loc[ex.NO_MASK, "gap closed"] == 0
        assert t5.loc[ex.SUPERVISED_GATED, "gap closed"] == pytest.approx(1)
    assert t5["Dice (defective images)"].between(0, 1).all()
    md = (fig / "table5_beyond_the_paper.md").read_text()
    assert "SYNTHETIC" in md and "nothing tuned on true masks" in md


@pytest.mark.notebook
def test_report(smoke_run):
    root, _ = smoke_run
    rep = (root / "fig" / "REPORT.md").read_text()
    for part in ("Profile `smoke`", "SYNTHETIC", "Wall time per notebook", "00_data_eda",
                 "05_architectures_losses", "06_beyond_the_paper", "Table 1", "Table 2",
                 "Table 3", "Table 4", "Table 5",
                 "![cls_roc_curves](cls_roc_curves.png)", "paper Dice (compare: non-empty masks)",
                 "thesis Dice (all)", "## Which of the paper's claims hold",
                 "| claim | source | paper / thesis |", "## How far a seed moves the numbers",
                 "## Real data: label-only masks on NEU-Seg (steel)",
                 "## Real data: label-only masks on BSData (ball screws)"):
        assert part in rep, part
    assert "was not produced" not in rep
    assert rep.count("_Profile `smoke`") == 1      # the provenance once, at the top


@pytest.mark.notebook
def test_every_notebook_renders_what_you_should_see(smoke_run):
    """The closing section is rendered from the run's values (a Markdown output), in 00-06."""
    root, runs = smoke_run
    for r in runs[:-1]:
        nb = nbformat.read(r.output, as_version=4)
        outs = [o for c in nb.cells[-4:] if c.cell_type == "code" for o in c.get("outputs", [])
                if "text/markdown" in o.get("data", {})]
        assert outs, f"{r.name}: no rendered 'What you should see'"
        assert "nan" not in "".join(o["data"]["text/markdown"] for o in outs).lower().split(), r.name


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


@pytest.mark.notebook
def test_train_stages_list_exactly_the_networks_the_notebooks_train(smoke_run):
    """``cam2mask train --stages segmentation grid`` trains ahead what notebooks 04-06 train:
    the same run folders, none missing, none extra (so the notebooks reuse every one)."""
    from cam2mask_lib import experiments as ex
    from cam2mask_lib import pipeline
    from cam2mask_lib.seg_stage import segmenter_dir

    root, _ = smoke_run
    ctx = pipeline.context("smoke", artifacts_dir=root / "art")
    run = pipeline.classifier_stage(ctx, progress=False)
    cache = pipeline.cam_stage(ctx, run, *ex.VARIANTS[ex.BEST_VARIANT], progress=False)
    jobs = ex.network_jobs(ctx, run, cache)
    listed = {segmenter_dir(j.ctx, j.targets, j.cfg, run).name for j in jobs}
    trained = {p.name for p in (root / "art" / "segmentation").iterdir() if p.is_dir()}
    assert len(listed) == len(jobs) and listed == trained


def test_only_selector():
    assert [p.stem for p in list_notebooks(only=["0"])] == ["00_data_eda"]
    assert [p.stem for p in list_notebooks(only=["01", "00_data_eda"])] == ["00_data_eda", "01_classification"]
    with pytest.raises(ReproduceError, match="matches no notebook"):
        list_notebooks(only=["99"])
