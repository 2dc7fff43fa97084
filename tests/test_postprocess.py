import numpy as np
import pytest
import torch

from cam2mask_lib import postprocess as pp
from cam2mask_lib.data import load_dataset, rle_decode
from cam2mask_lib.metrics import dice, dice_pairs, dice_report


def test_dice_hand_cases():
    a = np.zeros((4, 4), np.uint8)
    b = np.zeros((4, 4), np.uint8)
    assert dice(a, b) == 1.0  # empty vs empty
    b[0, :2] = 1
    assert dice(a, b) == 0.0  # empty prediction, non-empty truth
    a[0, 1:4] = 1  # 3 px, overlap 1 with 2 px
    assert dice(a, b) == pytest.approx(2 * 1 / 5)
    assert dice_pairs(0, 0, 0) == 1.0


def test_report_protocols():
    # 3 images x 2 classes; image 2 is defect-free
    true = np.zeros((3, 2, 2, 2), np.uint8)
    true[0, 0, 0, 0] = 1
    true[1, 1, :, :] = 1
    pred = np.zeros_like(true)
    pred[0, 0, 0, 0] = 1          # perfect: 1
    pred[1, 1, 0, :] = 1          # 2 of 4: dice 2*2/6
    pred[2, 0, 1, 1] = 1          # false positive on a clean image: 0
    r = dice_report(pred, true, ["a", "b"])
    v = r.values
    assert np.allclose(v, [[1, 1], [1, 2 / 3], [0, 1]])
    s = r.summary()
    assert s["dice_defective_images"] == pytest.approx((1 + 1 + 1 + 2 / 3) / 4)
    assert s["dice_all_images"] == pytest.approx((1 + 1 + 1 + 2 / 3 + 0 + 1) / 6)
    assert s["dice_nonempty_masks"] == pytest.approx((1 + 2 / 3) / 2)
    assert s["class b (non-empty masks)"] == pytest.approx(2 / 3)


def test_each_parameter_does_what_it_says():
    maps = np.zeros((2, 2, 4, 4), np.float32)
    maps[:, :, :2, :] = 0.8
    maps[:, :, 2, :] = 0.4
    probs = np.array([[0.9, 0.2], [0.6, 0.9]])
    m = pp.apply(maps, probs, pp.Params(confidence=0.5, threshold=0.3, min_area=0))
    assert m[0, 0].sum() == 12 and m[0, 1].sum() == 0  # class 1 of image 0 below confidence
    m = pp.apply(maps, probs, pp.Params(confidence=0.5, threshold=0.5, min_area=0))
    assert m[0, 0].sum() == 8  # only pixels > 0.5
    m = pp.apply(maps, probs, pp.Params(confidence=0.5, threshold=0.5, min_area=9))
    assert m.sum() == 0  # 8-pixel masks are emptied
    m = pp.apply(maps, probs, pp.Params(confidence=[0.95, 0.1], threshold=[0.3, 0.5], min_area=0))
    assert m[:, 0].sum() == 0 and m[0, 1].sum() == 8 and m[1, 1].sum() == 8
    with pytest.raises(ValueError, match="expected 1 or 2"):
        pp.apply(maps, probs, pp.Params(confidence=[0.1, 0.2, 0.3]))


def _random_case(seed=0, n=12, c=3, h=8, w=10):
    rng = np.random.default_rng(seed)
    maps = rng.random((n, c, h, w)).astype(np.float32)
    true = (rng.random((n, c, h, w)) > 0.7).astype(np.uint8)
    true[rng.random((n, c)) < 0.5] = 0
    probs = rng.random((n, c))
    return maps, true, probs


def test_search_statistics_agree_with_applying_the_masks():
    maps, true, probs = _random_case()
    th = [0.2, 0.3, 0.5, 0.75]
    stats = pp.collect_stats([maps[:5], maps[5:]], [true[:5], true[5:]], th)
    for params in (pp.Params(0.5, 0.3, 0), pp.Params([0.1, 0.6, 0.9], [0.2, 0.75, 0.5], [0, 5, 20])):
        direct = dice(pp.apply(maps, probs, params), true)
        assert np.allclose(pp.pair_dice(stats, probs, params), direct)
    with pytest.raises(ValueError, match="threshold 0.4 was not collected"):
        pp.pair_dice(stats, probs, pp.Params(0.5, 0.4, 0))


def test_fast_counts_equal_the_plain_sums_at_the_thresholds_edges():
    # collect_stats compares float32 maps in float32 and counts rows as bytes: the counts must be
    # those of maps > t in exact arithmetic, also for values at and one float32 step around t
    maps, true, _ = _random_case(seed=7, w=700)
    th = [0.05, 0.1, 0.3, 0.7, 0.75, 0.9]
    for k, t in enumerate(th):
        f = np.float32(t)
        maps[k, 0, 0, :3] = [f, np.nextafter(f, np.float32(1)), np.nextafter(f, np.float32(0))]
    stats = pp.collect_stats([maps[:7], maps[7:]], [true[:7], true[7:]], th)
    for i, t in enumerate(th):
        above = maps.astype(np.float64) > t
        assert np.array_equal(stats.area[i], above.sum((-2, -1)))
        assert np.array_equal(stats.inter[i], (above & (true != 0)).sum((-2, -1)))
    assert np.array_equal(stats.true_area, true.astype(bool).sum((-2, -1)))
    wide = np.zeros((1, 1, 2, 70000), bool)
    wide[0, 0, :, ::2] = True  # rows longer than a uint16 count
    assert pp.count_set(wide)[0, 0] == 70000


def test_counts_on_a_device_equal_numpys():
    # the accelerator path (torch comparisons and sums, only the counts cross back) run here on
    # CPU tensors: the same counts as numpy's, also at and one float32 step around the cuts, for
    # float32, float64 and half maps
    maps, true, _ = _random_case(seed=3, w=300)
    th = np.asarray([0.05, 0.3, 0.75, 0.9])
    for k, t in enumerate(th):
        f = np.float32(t)
        maps[k, 1, 2, :3] = [f, np.nextafter(f, np.float32(1)), np.nextafter(f, np.float32(0))]
    for m in (maps, maps.astype(np.float64)):
        ref = pp._counts(m, true, th)
        got = pp._counts_t(torch.from_numpy(m), torch.from_numpy(true), th)
        for a, b in zip(ref, got):
            assert np.array_equal(a, b)
    half = maps.astype(np.float16)
    ref = pp._counts(half.astype(np.float32), true, th)
    for a, b in zip(ref, pp._counts_t(torch.from_numpy(half), true, th)):
        assert np.array_equal(a, b)
    # collect_stats takes CPU tensors as numpy arrays
    a = pp.collect_stats([torch.from_numpy(maps)], [true], th)
    b = pp.collect_stats([maps], [true], th)
    assert np.array_equal(a.inter, b.inter) and np.array_equal(a.area, b.area)


def test_masks_made_on_a_device_equal_numpys():
    maps, _, probs = _random_case(seed=5, w=64)
    thr = [0.2, 0.75, 0.5]
    for k, t in enumerate(thr):
        f = np.float32(t)
        maps[k, k, 0, :3] = [f, np.nextafter(f, np.float32(1)), np.nextafter(f, np.float32(0))]
    for params in (pp.Params(0.5, 0.3, 0), pp.Params([0.1, 0.6, 0.9], thr, [0, 5, 40])):
        ref = pp.apply(maps, probs, params)
        got = pp.apply(torch.from_numpy(maps), probs, params)
        assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), ref)
        assert np.array_equal(pp.apply(torch.from_numpy(maps.astype(np.float64)), probs,
                                       params).numpy(), pp.apply(maps.astype(np.float64), probs,
                                                                 params))
    assert ref.sum() > 0 and (ref.sum((-2, -1)) == 0).any()  # both kinds of pairs were tried


def test_search_finds_the_best_combination_by_brute_force():
    maps, true, probs = _random_case(seed=3)
    th, conf, mins = [0.3, 0.5, 0.8], [0.2, 0.5, 0.8], [0, 10, 30]
    stats = pp.collect_stats([maps], [true], th)
    defective = true.any((1, 2, 3))
    best, score = pp.search(stats, probs, conf, mins)
    brute = max(dice(pp.apply(maps, probs, pp.Params(k, t, m)), true)[defective].mean()
                for t in th for k in conf for m in mins)
    assert score == pytest.approx(brute)
    assert dice(pp.apply(maps, probs, best), true)[defective].mean() == pytest.approx(score)
    per, per_score = pp.search(stats, probs, conf, mins, per_class=True)
    assert per_score >= score - 1e-12
    assert dice(pp.apply(maps, probs, per), true)[defective].mean() == pytest.approx(per_score)


def test_baselines():
    maps, true, probs = _random_case(seed=5)
    stats = pp.collect_stats([maps], [true], [0.5])
    empty = pp.baseline_empty(stats, ["a", "b", "c"])
    ne = true.any((-2, -1))
    assert np.array_equal(empty.values, (~ne).astype(float))
    fill = pp.baseline_fill(stats, probs, 0.5, ["a", "b", "c"])
    full = np.broadcast_to((probs >= 0.5)[..., None, None], maps.shape).astype(np.uint8)
    assert np.allclose(fill.values, dice(full, true))


def test_write_predictions_round_trip(synth_dir, tmp_path):
    idx = load_dataset(synth_dir)
    rows = [0, 1]
    masks = np.zeros((2, 4, 16, 100), np.uint8)
    masks[0, 2, 4:10, 20:60] = 1
    csv = pp.write_predictions(idx, [(rows, masks)], tmp_path / "out")
    lines = csv.read_text().splitlines()
    assert lines[0] == "ImageId,ClassId,EncodedPixels" and len(lines) == 2
    img, cls, rle = lines[1].split(",")
    assert img == idx.image_ids[0] and cls == "3"
    full = rle_decode(rle, tuple(idx.shapes[0]))
    assert full.shape == (64, 400) and full[16:40, 80:240].all() and full.sum() == 24 * 160
    png = tmp_path / "out" / "masks" / "3" / (idx.image_ids[0].rsplit(".", 1)[0] + ".png")
    assert png.is_file()
    assert not (tmp_path / "out" / "masks" / "1").exists()  # empty masks: no PNG


def test_predictions_csv_is_quoted_and_class_names_stay_inside_masks(tmp_path):
    """An image or class name with a comma is quoted in the CSV (read back: 3 fields per row); a
    class name that would write outside masks/ is refused when the data is read."""
    import csv

    from PIL import Image

    from cam2mask_lib.data import DataError, load_generic
    from cam2mask_lib.postprocess import write_predictions

    root = tmp_path / "g"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((8, 10, 3), 90, np.uint8)).save(root / "images" / "a,b.png")
    (root / "labels.csv").write_text('image,"pit,dent"\n"a,b",1\n')
    idx = load_generic(root)
    masks = np.zeros((1, 1, 8, 10), np.uint8)
    masks[0, 0, 2:4, 3:6] = 1
    out = write_predictions(idx, [(np.array([0]), masks)], tmp_path / "out")
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["ImageId", "ClassId", "EncodedPixels"]
    assert rows[1][:2] == ["a,b", "pit,dent"] and len(rows[1]) == 3
    assert (tmp_path / "out" / "masks" / "pit,dent" / "a,b.png").is_file()
    for bad in ("..", "pit/dent"):
        (root / "labels.csv").write_text(f'image,{bad}\n"a,b",1\n')
        with pytest.raises(DataError, match=r"labels.csv, line 1: class name .* cannot name a folder"):
            load_generic(root)
