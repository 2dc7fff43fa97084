import numpy as np
import pytest
from PIL import Image

from cam2mask_lib.data import DataError, ImageDataset, load_dataset, load_severstal

IMAGES = {"a.jpg": (16, 40), "b.jpg": (16, 40), "c.jpg": (16, 40)}


def test_current_and_original_formats_agree(severstal_dir, tmp_path):
    cur = severstal_dir("ImageId,ClassId,EncodedPixels\na.jpg,1,1 5\na.jpg,3,20 4\nb.jpg,4,100 16\n",
                        IMAGES)
    orig_rows = ["ImageId_ClassId,EncodedPixels"]
    rles = {("a.jpg", 1): "1 5", ("a.jpg", 3): "20 4", ("b.jpg", 4): "100 16"}
    for img in IMAGES:
        for c in range(1, 5):
            orig_rows.append(f"{img}_{c},{rles.get((img, c), '')}")
    (cur / "train.csv").write_text("\n".join(orig_rows) + "\n")
    orig = load_severstal(cur)
    cur_idx = load_dataset(cur)
    for idx in (orig, cur_idx):
        assert idx.image_ids == ["a.jpg", "b.jpg", "c.jpg"]
        assert idx.labels.tolist() == [[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
        assert idx.mask(0)[0].sum() == 5 and idx.mask(1)[3].sum() == 16
        assert idx.mask(2).sum() == 0
        assert idx.mask_area(1, 3) == 16


def test_image_not_in_csv_is_defect_free(severstal_dir):
    idx = load_severstal(severstal_dir("ImageId,ClassId,EncodedPixels\na.jpg,2,1 3\n", IMAGES))
    assert len(idx) == 3 and idx.labels.sum() == 1


@pytest.mark.parametrize("csv, message", [
    ("ImageId,ClassId,EncodedPixels\na.jpg,5,1 3\n", r"line 2: class id '5' .* not in the class list"),
    ("ImageId,ClassId,EncodedPixels\na.jpg,1,1 3\nb.jpg,1,1 2\na.jpg,1,9 3\n",
     r"line 4: duplicated row for image 'a.jpg', class '1' \(first at line 2\)"),
    ("ImageId,ClassId,EncodedPixels\nzz.jpg,1,1 3\n", r"line 2: image 'zz.jpg' is listed but .*zz.jpg does not exist"),
    ("ImageId,ClassId,EncodedPixels\na.jpg,1,1 3\nb.jpg,2,1 2 3\n", r"line 3 \(image 'b.jpg', class '2'.*even count"),
    ("ImageId,ClassId,EncodedPixels\nb.jpg,2,5 a\n", r"line 2 .*not an integer"),
    ("ImageId,ClassId,EncodedPixels\nb.jpg,2,5 0\n", r"line 2 .*length 0"),
    ("ImageId,ClassId,EncodedPixels\nb.jpg,2,9 3 2 2\n", r"line 2 .*sorted and disjoint"),
    ("ImageId,ClassId,EncodedPixels\nc.jpg,3,630 20\n", r"line 2 \(image 'c.jpg', class '3', image 16x40\).*past the image end \(640 pixels\)"),
    ("Image,Class,RLE\na.jpg,1,1 3\n", r"header is \['Image', 'Class', 'RLE'\]; expected"),
    ("ImageId_ClassId,EncodedPixels\na.jpg1,1 3\n", r"line 2: ImageId_ClassId 'a.jpg1' has no '_'"),
    ("ImageId,ClassId,EncodedPixels\nb.jpg,2,1 99999999999999999999\n", r"line 2 .*too large: the image has 640 pixels"),
    ("ImageId_ClassId,EncodedPixels\na.jpg_1,1 3\na.jpg_2,\na.jpg_3,\na.jpg_4,\n",
     r"b.jpg has no row in .*train.csv \(2 such images\); the original competition layout"),
])
def test_bad_rows_name_file_line_and_problem(severstal_dir, csv, message):
    root = severstal_dir(csv, IMAGES)
    with pytest.raises(DataError, match=message) as e:
        load_severstal(root)
    assert "train.csv" in str(e.value)


def test_no_image_size_is_assumed(severstal_dir):
    """The RLE's pixel numbering depends on the height: even the quickest check reads each
    image's own size, so a 16x40 image's mask is decoded at 16x40."""
    root = severstal_dir("ImageId,ClassId,EncodedPixels\nc.jpg,3,17 16\n", IMAGES)
    for check in ("none", "header"):
        idx = load_severstal(root, check=check)
        c = idx.image_ids.index("c.jpg")
        assert tuple(idx.shapes[c]) == (16, 40)
        assert idx.mask(c)[2, :, 1].all() and idx.mask(c)[2].sum() == 16  # the second column


def test_mask_that_does_not_fit_a_smaller_image(severstal_dir):
    # a Severstal-size mask on an image that is not 256x1600: the image size contradicts the mask
    root = severstal_dir("ImageId,ClassId,EncodedPixels\na.jpg,1,409000 500\n", {"a.jpg": (256, 800)})
    with pytest.raises(DataError, match="image 256x800.*past the image end"):
        load_severstal(root)


def test_corrupt_and_truncated_images(severstal_dir):
    root = severstal_dir("ImageId,ClassId,EncodedPixels\na.jpg,1,1 3\n", IMAGES)
    (root / "train_images" / "b.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"b.jpg: not a readable image"):
        load_severstal(root)
    # a file whose header is fine but whose data is cut: found when decoded, named
    good = root / "train_images" / "a.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 40, 3), dtype=np.uint8)).save(
        root / "train_images" / "b.jpg", quality=95)
    data = (root / "train_images" / "b.jpg").read_bytes()
    (root / "train_images" / "b.jpg").write_bytes(data[: len(data) - 100])
    idx = load_severstal(root)  # header check passes
    with pytest.raises(DataError, match=r"b.jpg: cannot read image"):
        ImageDataset(idx, (16, 40))[1]
    with pytest.raises(DataError, match=r"b.jpg: cannot read image"):
        load_severstal(root, check="full")
    assert good.is_file()


def test_an_image_of_another_size_is_refused_naming_it_and_both_sizes(severstal_dir):
    """train.csv's codes number pixels down the columns of one image size: an image of another
    size would have its masks decoded elsewhere (IoU 0 with the true defect), so it is refused."""
    root = severstal_dir("ImageId,ClassId,EncodedPixels\nc.jpg,3,17 16\n",
                         {**IMAGES, "c.jpg": (20, 40)})
    with pytest.raises(DataError, match=r"c.jpg: 20x40 \(HxW\), but 2 of the 3 images are 16x40"):
        load_severstal(root)


def test_an_image_id_that_is_a_path_is_named_as_such(severstal_dir, tmp_path):
    root = severstal_dir("ImageId,ClassId,EncodedPixels\n../../outside.jpg,1,1 3\n", IMAGES)
    Image.fromarray(np.full((16, 40, 3), 90, np.uint8)).save(root.parent.parent / "outside.jpg")
    with pytest.raises(DataError, match=r"line 2: ImageId '../../outside.jpg' is a path; expected "
                                        r"the file name of an image inside .*train_images/"):
        load_severstal(root)


def test_truncated_images_are_found_from_their_last_bytes(severstal_dir):
    from cam2mask_lib.data import check_complete
    root = severstal_dir("ImageId,ClassId,EncodedPixels\na.jpg,1,1 3\n", IMAGES)
    paths = sorted((root / "train_images").glob("*.jpg"))
    check_complete(paths)                                  # complete files pass
    data = paths[1].read_bytes()
    paths[1].write_bytes(data + b"\0" * 5000)              # a long trailer: decoded, still fine
    check_complete(paths)
    paths[1].write_bytes(data[: len(data) // 2])           # cut short: named
    with pytest.raises(DataError, match=r"b.jpg: cannot read image"):
        check_complete(paths)


def test_empty_dataset_and_missing_parts(tmp_path, severstal_dir):
    root = severstal_dir("ImageId,ClassId,EncodedPixels\n", {})
    with pytest.raises(DataError, match="empty dataset"):
        load_severstal(root)
    with pytest.raises(DataError, match="train.csv: file not found"):
        load_severstal(tmp_path)
    with pytest.raises(DataError, match="neither train.csv"):
        load_dataset(tmp_path)


def test_dataset_object_at_profile_size(synth_dir):
    import timm.data
    import torch

    from cam2mask_lib.data import IMAGENET_MEAN, IMAGENET_STD

    assert IMAGENET_MEAN == tuple(timm.data.IMAGENET_DEFAULT_MEAN)
    assert IMAGENET_STD == tuple(timm.data.IMAGENET_DEFAULT_STD)
    idx = load_dataset(synth_dir)
    ds = ImageDataset(idx, (32, 200), cache=True)
    item = ds[0]
    assert item["image"].shape == (3, 32, 200) and item["image"].dtype == torch.float32
    assert item["masks"].shape == (4, 32, 200) and item["labels"].shape == (4,)
    assert set(torch.unique(item["masks"]).tolist()) <= {0, 1}
    raw = ImageDataset(idx, (32, 200), normalize=False)[0]["image"]
    assert 0 <= raw.min() and raw.max() <= 1
    # a labelled class has a non-empty mask at the reduced size too
    for k in range(len(ds)):
        it = ds[k]
        for c in np.flatnonzero(it["labels"].numpy()):
            assert it["masks"][c].sum() > 0
    sub = ImageDataset(idx, (32, 200), rows=[2, 5])
    assert len(sub) == 2 and sub[1]["index"] == 5


def test_image_array_is_the_resized_images_and_is_reused(synth_dir, tmp_path):
    import torch

    from cam2mask_lib.data import image_array

    idx = load_dataset(synth_dir)
    arr = image_array(idx, (32, 200), tmp_path, progress=False)
    assert arr.shape == (30, 32, 200, 3) and arr.dtype == np.uint8
    files = list(tmp_path.glob("images_32x200_*.npy"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = image_array(idx, (32, 200), tmp_path, progress=False)
    assert files[0].stat().st_mtime_ns == stamp and np.array_equal(arr, again)
    plain, backed = ImageDataset(idx, (32, 200)), ImageDataset(idx, (32, 200), array=arr)
    for k in (0, 7, 29):
        assert torch.equal(plain[k]["image"], backed[k]["image"])
        assert torch.equal(plain[k]["masks"], backed[k]["masks"])
    with pytest.raises(ValueError, match="expected \\(30, 16, 100, 3\\)"):
        ImageDataset(idx, (16, 100), array=arr)


def test_uint8_batches_normalised_on_the_device_equal_the_float_items(synth_dir):
    """Batches cross as uint8 and are normalised where the network runs: bit for bit the
    dataset's own float items, so moving the work changes no number."""
    import torch

    from cam2mask_lib.data import ImageDataset, normalize_images
    from cam2mask_lib.device import to_model

    ds = ImageDataset(load_dataset(synth_dir), (32, 200), with_masks=False)
    rows = [3, 0, 7, 5]
    u8 = ds.uint8_batch(rows)
    assert u8.dtype == torch.uint8 and u8.shape == (4, 3, 32, 200)
    assert torch.equal(normalize_images(u8), ds.batch(rows))
    conv = torch.nn.Conv2d(3, 2, 3).to(memory_format=torch.channels_last)
    x = to_model(u8, conv)
    assert torch.equal(x, ds.batch(rows)) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ds.raw()[7]["image"], u8[2]) and ds[7]["image"].dtype == torch.float32


def test_loader_workers_persist_across_passes_and_give_the_same_batches(synth_dir):
    """DataLoader workers are started once per dataset, batch size and worker count, not for
    every epoch and prediction pass; each pass gets exactly its rows, in its order."""
    import numpy as np
    import torch

    from cam2mask_lib.classify import _batches
    from cam2mask_lib.data import ImageDataset

    ds = ImageDataset(load_dataset(synth_dir), (32, 200), with_masks=False)
    rows = np.array([3, 0, 7, 5, 1])
    loader = ds.loader(2, 1)
    assert ds.loader(2, 1) is loader  # one per (batch size, workers)
    passes = []
    for order in (rows, rows[::-1]):
        got = list(_batches(ds, order, 2, None, num_workers=1))
        assert [len(x) for x, _ in got] == [2, 2, 1]
        assert torch.equal(torch.cat([x for x, _ in got]), ds.uint8_batch(order))
        assert torch.equal(torch.cat([y for _, y in got]),
                           torch.from_numpy(ds.index.labels[order].astype(np.float32)))
        passes.append([w.pid for w in loader.loader._iterator._workers])  # the worker processes
    assert passes[0] == passes[1]
    # shuffled passes (training) follow the generator, as without workers
    a = [x for x, _ in _batches(ds, rows, 2, torch.Generator().manual_seed(1), 1)]
    b = [x for x, _ in _batches(ds, rows, 2, torch.Generator().manual_seed(1), 0)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    first = loader(rows)
    next(first)
    with pytest.raises(RuntimeError, match="already serving a pass"):
        next(loader(rows))
    first.close()
    assert len(list(loader(rows))) == 3  # a pass left early frees the loader


def test_a_batch_of_files_shared_among_workers_is_the_same_batch(synth_dir):
    """``uint8_batch(rows, num_workers)`` decodes image files in the persistent workers, in
    pieces, and gives the batch decoded here (any rows, in their order); a cached array is read
    here."""
    import numpy as np
    import torch

    from cam2mask_lib.data import ImageDataset
    from cam2mask_lib.data.loader import WORKER_PIECE

    ds = ImageDataset(load_dataset(synth_dir), (32, 200), with_masks=False)
    rows = np.array([9, 2, 4, 0, 11, 6, 1, 3, 8, 5, 7])  # pieces of 4, 4 and 3
    assert len(rows) > 2 * WORKER_PIECE
    here = ds.uint8_batch(rows)
    for order in (rows, rows[::-1], rows[:2]):
        assert torch.equal(ds.uint8_batch(order, num_workers=2), ds.uint8_batch(order))
    assert list(ds._loaders) == [(WORKER_PIECE, 2)]  # one set of workers serves every call
    every = ds.uint8_batch(np.arange(len(ds))).permute(0, 2, 3, 1).contiguous().numpy()
    cached = ImageDataset(ds.index, (32, 200), with_masks=False, array=every)
    assert torch.equal(cached.uint8_batch(rows, num_workers=2), here) and not cached._loaders


def test_resize_mask_is_pils_nearest_for_every_mask():
    from PIL import Image

    from cam2mask_lib.data import resize_mask

    rng = np.random.default_rng(0)
    masks = (rng.random((2, 4, 40, 250)) > 0.8).astype(np.uint8)
    masks[0, 1] = 0  # empty masks are skipped, not resized: they must still come back empty
    masks[1, 3] = 1
    for size in ((20, 125), (32, 96), (64, 400)):
        got = resize_mask(masks, size)
        want = np.stack([np.asarray(Image.fromarray(m).resize(size[::-1], Image.NEAREST))
                         for m in masks.reshape(-1, 40, 250)]).reshape(2, 4, *size)
        assert got.dtype == np.uint8 and np.array_equal(got, want)


def test_jpegs_decoded_on_the_device_equal_pils_images(synth_dir, tmp_path, monkeypatch):
    """``decode_device``: the workers read JPEG bytes and each batch is decoded in one
    ``torchvision.io.decode_jpeg`` call where the network runs. On the CPU that is PIL's
    libjpeg-turbo decoding: bit for bit the same batches, with workers or without; resized
    there (antialiased bilinear) within one grey level of PIL's resize. A folder that is not all
    JPEG, or the option beside a decoded-image cache, is refused before any batch."""
    import torch

    from cam2mask_lib.data import loader
    from cam2mask_lib.classify import TrainConfig, _batches
    from cam2mask_lib.data import ImageDataset, decode_jpeg_batch
    from cam2mask_lib.utils import ConfigError

    calls = []
    monkeypatch.setattr(loader, "decode_jpeg_batch",
                        lambda *a: calls.append(len(a[0])) or decode_jpeg_batch(*a))
    index = load_dataset(synth_dir)
    native = tuple(int(v) for v in index.shapes[0])
    rows = np.array([3, 0, 7, 5, 1])
    for size in (native, (32, 200)):
        pil = ImageDataset(index, size, with_masks=False)
        dev = ImageDataset(index, size, with_masks=False, decode_device="cpu")
        want = pil.uint8_batch(rows)
        assert dev.raw()[0]["image"].dim() == 1  # the workers' items: the file's bytes
        for workers in (0, 1):
            calls.clear()
            got = torch.cat([x for x, _ in _batches(dev, rows, 2, None, workers)])
            assert calls == [2, 2, 1]  # one decoding call per batch
            assert got.dtype == torch.uint8 and got.shape == want.shape
            diff = (got.int() - want.int()).abs().max()
            assert diff == 0 if size == native else diff <= 1, (size, workers, int(diff))
    one = decode_jpeg_batch([dev._jpeg_bytes(3)], native, torch.device("cpu"))
    assert torch.equal(one[0], ImageDataset(index, native, with_masks=False).uint8_batch([3])[0])

    png = tmp_path / "png"
    (png / "train_images").mkdir(parents=True)
    for name, p in zip(index.image_ids, index.image_paths):
        Image.open(p).save(png / "train_images" / name.replace(".jpg", ".png"))
    (png / "train.csv").write_text("ImageId,ClassId,EncodedPixels\n")
    with pytest.raises(ConfigError, match=r"\.png: not a JPEG file.*decode='workers'"):
        ImageDataset(load_severstal(png), native, with_masks=False, decode_device="cpu")
    with pytest.raises(ConfigError, match="cache"):
        ImageDataset(index, native, with_masks=False, cache=True, decode_device="cpu")
    with pytest.raises(ConfigError, match="cache_images=False"):
        TrainConfig(encoder="mobilenetv3_small_050", decode="device")
    with pytest.raises(ConfigError, match="decode='gpu'"):
        TrainConfig(encoder="mobilenetv3_small_050", decode="gpu", cache_images=False)
    plain = TrainConfig(encoder="mobilenetv3_small_050")
    assert "decode" not in plain.key()  # the default keeps every cache key
    assert TrainConfig(encoder="mobilenetv3_small_050", decode="device",
                       cache_images=False).key()["decode"] == "device"


def test_the_context_decodes_where_the_classifier_says(tmp_path):
    from cam2mask_lib import pipeline

    dirs = dict(artifacts_dir=tmp_path / "a", figures_dir=tmp_path / "f")
    ctx = pipeline.context("smoke", **dirs, **{"classifier.decode": "device",
                                               "classifier.cache_images": False})
    ds = ctx.images()
    assert ds.decode_device == ctx.device and ds.array is None
    assert pipeline.context("smoke", **dirs).images().decode_device is None
