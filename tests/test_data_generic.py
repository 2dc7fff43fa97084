import numpy as np
import pytest
from PIL import Image

from cam2mask_lib.data import DataError, ImageDataset, load_dataset, load_generic


def make_generic(root, labels_csv, images, masks=None):
    """images: {filename: (h, w)}; masks: {(class, stem): array}"""
    (root / "images").mkdir(parents=True)
    for name, (h, w) in images.items():
        Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(root / "images" / name)
    (root / "labels.csv").write_text(labels_csv)
    if masks is not None:
        (root / "masks").mkdir()
        for (cls, stem), arr in masks.items():
            (root / "masks" / cls).mkdir(exist_ok=True)
            Image.fromarray(arr.astype(np.uint8) * 255).save(root / "masks" / cls / f"{stem}.png")
    return root


def test_generic_with_masks_any_classes_any_size(tmp_path):
    m = np.zeros((37, 51), np.uint8)
    m[5:10, 7:20] = 1
    root = make_generic(tmp_path / "g", "image,scratch,dent\nx,1,0\ny.bmp,0,0\nz,0,1\n",
                        {"x.png": (37, 51), "y.bmp": (20, 30), "z.jpg": (64, 48)},
                        {("scratch", "x"): m, ("dent", "z"): np.ones((64, 48))})
    idx = load_dataset(root)
    assert idx.format == "generic" and idx.class_names == ["scratch", "dent"]
    assert idx.image_ids == ["x", "y", "z"]
    assert idx.labels.tolist() == [[1, 0], [0, 0], [0, 1]]
    assert idx.shapes.tolist() == [[37, 51], [20, 30], [64, 48]]
    assert np.array_equal(idx.mask(0)[0], m) and idx.mask(1).sum() == 0
    item = ImageDataset(idx, (16, 24))[0]
    assert item["masks"].shape == (2, 16, 24) and item["masks"][0].sum() > 0
    # the quickest check still reads each image's own size: nothing assumes Severstal's 256x1600
    fast = load_dataset(root, check="none")
    assert fast.shapes.tolist() == idx.shapes.tolist() and np.array_equal(fast.mask(0)[0], m)


def test_generic_without_masks(tmp_path):
    root = make_generic(tmp_path / "g", "image,a\np,1\nq,0\n", {"p.png": (10, 10), "q.png": (10, 12)})
    idx = load_generic(root)
    assert not idx.has_masks
    assert "masks" not in ImageDataset(idx, (8, 8))[0]


@pytest.mark.parametrize("csv, message", [
    ("name,a\np,1\nq,0\n", r"labels.csv: first column is 'name'; expected 'image'"),
    ("image\np\nq\n", "no class columns"),
    ("image,a\np,2\nq,0\n", r"labels.csv, line 2, column 'a': value '2'; expected 0 or 1"),
    ("image,a\np,1\nq,\n", r"line 3, column 'a': value ''"),
    ("image,a\np,1\nq,0\np.png,0\n", r"line 4: image 'p.png' is listed again \(first at line 2\)"),
    ("image,a\np,1\nq,0\nr,0\n", r"line 4: image 'r' is listed but no file"),
    ("image,a\np,1\n", r"q.png is not listed in .*labels.csv"),
    ("image,a,a\np,1,1\nq,0,0\n", "appears more than once"),
    ("image,a\n", "empty dataset"),
])
def test_generic_bad_labels(tmp_path, csv, message):
    root = make_generic(tmp_path / "g", csv, {"p.png": (10, 10), "q.png": (10, 12)})
    with pytest.raises(DataError, match=message):
        load_generic(root)


def test_generic_bad_masks(tmp_path):
    ok = np.ones((10, 10))
    root = make_generic(tmp_path / "a", "image,a\np,1\nq,0\n", {"p.png": (10, 10), "q.png": (10, 12)},
                        {("a", "p"): np.ones((9, 10))})
    with pytest.raises(DataError, match=r"p.png: mask is 9x10 \(HxW\) but image .* is 10x10"):
        load_generic(root)
    root = make_generic(tmp_path / "b", "image,a\np,1\nq,0\n", {"p.png": (10, 10), "q.png": (10, 12)},
                        {("a", "p"): ok, ("b", "p"): ok})
    with pytest.raises(DataError, match=r"class folder 'b' is not a class"):
        load_generic(root)
    root = make_generic(tmp_path / "c", "image,a\np,1\nq,0\n", {"p.png": (10, 10), "q.png": (10, 12)},
                        {("a", "p"): ok, ("a", "ghost"): ok})
    with pytest.raises(DataError, match=r"ghost.png: no image 'ghost' is listed"):
        load_generic(root)
    root = make_generic(tmp_path / "d", "image,a\np,1\nq,0\n", {"p.png": (10, 10), "q.png": (10, 12)},
                        {("a", "q"): np.zeros((10, 12))})
    with pytest.raises(DataError, match=r"line 2: image 'p' has class 'a' = 1 but .*p.png is missing"):
        load_generic(root)
    # a mask contradicting its label fails when the data is read, before any work starts
    root = make_generic(tmp_path / "e", "image,a\np,1\nq,0\n", {"p.png": (10, 10), "q.png": (10, 12)},
                        {("a", "p"): ok, ("a", "q"): np.ones((10, 12))})
    with pytest.raises(DataError, match=r"q.png: mask has defect pixels but .*labels.csv, line 3 "
                                        r"gives class 'a' = 0"):
        load_generic(root)
    root = make_generic(tmp_path / "f", "image,a\np,1\nq,0\n", {"p.png": (10, 10), "q.png": (10, 12)},
                        {("a", "p"): np.zeros((10, 10))})
    with pytest.raises(DataError, match=r"p.png: mask is all black .* line 2 gives class 'a' = 1"):
        load_generic(root)


def test_ambiguous_image_name(tmp_path):
    root = make_generic(tmp_path / "g", "image,a\np,1\n", {"p.png": (10, 10), "p.jpg": (10, 10)})
    with pytest.raises(DataError, match="ambiguous"):
        load_generic(root)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG of mean 85.7 (in 8-bit terms) reads as mean ~85.7, not near-white."""
    from cam2mask_lib.data import read_image

    rng = np.random.default_rng(0)
    a8 = rng.integers(40, 130, (20, 30))
    Image.fromarray((a8 * 257).astype(np.uint16)).save(tmp_path / "x16.png")
    with Image.open(tmp_path / "x16.png") as im:
        assert im.mode.startswith("I")  # really 16-bit on disk
    img = read_image(tmp_path / "x16.png")
    assert img.dtype == np.uint8 and img.shape == (20, 30, 3)
    assert np.array_equal(img[..., 0], a8) and abs(img.mean() - a8.mean()) < 1e-9


def test_excel_bom_empty_file_and_trailing_comma(tmp_path, severstal_dir):
    """labels.csv saved as Excel's "CSV UTF-8" (a byte-order mark) reads as train.csv does; an
    empty CSV names its file; a trailing comma does not shift a row's columns."""
    root = make_generic(tmp_path / "bom", "\ufeffimage,a\np,1\nq,0\n", {"p.png": (10, 10), "q.png": (10, 12)})
    assert load_generic(root).class_names == ["a"]
    (root / "labels.csv").write_text("")
    with pytest.raises(DataError, match=r"labels.csv: the file is empty"):
        load_generic(root)
    from cam2mask_lib.data import load_severstal
    sev = severstal_dir("", {"a.jpg": (16, 40)})
    with pytest.raises(DataError, match=r"train.csv: the file is empty"):
        load_severstal(sev)
    (sev / "train.csv").write_text("ImageId,ClassId,EncodedPixels\na.jpg,1,1 3,\n")
    assert load_severstal(sev).rles[0] == {0: "1 3"}
    # a value past the header's columns is not dropped in silence: the error names its line
    (sev / "train.csv").write_text("ImageId,ClassId,EncodedPixels\na.jpg,1,1 3,,\n"
                                   "a.jpg,2,5 6,7 8\n")
    with pytest.raises(DataError, match=r"train.csv, line 3: 4 fields where the header has 3 "
                                        r"\('7 8' past the last column\)"):
        load_severstal(sev)
