"""The label-only refinement techniques (cam2mask_lib.refine), each on a case with a known answer."""

import cv2
import numpy as np
import pytest
import torch

from cam2mask_lib import refine
from cam2mask_lib.cams import AUG_VIEWS, smooth
from cam2mask_lib.losses import IGNORE
from cam2mask_lib.segment import confident_labels
from cam2mask_lib.utils import ConfigError


def test_absolute_maps_keep_units_and_undo_flips():
    rng = np.random.default_rng(0)
    low = rng.random((2, 3, 4, 6)).astype(np.float32) * 5  # [N, C, h, w], values up to 5
    one = refine.absolute_maps(low, (8, 12))
    ref = np.stack([np.stack([cv2.resize(m, (12, 8), interpolation=cv2.INTER_LINEAR) for m in im])
                    for im in low])
    assert np.allclose(one, ref, atol=1e-5)  # a plain bilinear resize, no min-max
    assert one.max() > 1.5  # units kept
    # six views of the same map, flipped views stored flipped: their mean is the map itself
    views = np.stack([low[:, :, :, ::-1] if flip else low for flip, _ in AUG_VIEWS], 1)
    assert np.allclose(refine.absolute_maps(views, (8, 12)), ref, atol=1e-5)
    # with min-max on top they give what the paper's aug smoothing gives for identical views
    s = refine.absolute_maps(views, (8, 12), scales=np.array([2.0, 4.0, 5.0]))
    assert np.allclose(s * np.array([2.0, 4.0, 5.0])[None, :, None, None], ref, atol=1e-5)
    mm = smooth(views, (8, 12))
    r = ref - ref.min((-2, -1), keepdims=True)
    assert np.allclose(mm, r / r.max((-2, -1), keepdims=True), atol=1e-4)


def test_scales_and_negative_thresholds_come_from_the_labels():
    peaks = np.array([[4.0, 1.0], [6.0, 2.0], [1.0, 9.0], [0.5, 8.0], [0.2, 7.0]])
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], bool)
    assert np.allclose(refine.class_scales(peaks, labels), [5.0, 8.0])
    th = refine.negative_thresholds(peaks, labels, 0.5)
    assert np.allclose(th, [0.5, 1.5])  # medians of the negatives' peaks
    assert refine.negative_thresholds(peaks, labels, 0.9)[0] > th[0]
    # a class with no negative (or no positive) image still gets a value
    allpos = np.ones_like(labels)
    assert np.allclose(refine.negative_thresholds(peaks, allpos), 0.5)
    assert np.allclose(refine.class_scales(peaks, ~allpos), 1.0)


def test_otsu_separates_two_levels_and_leaves_flat_maps_empty():
    m = np.full((1, 2, 10, 10), 0.1, np.float32)
    m[0, 0, 2:5, 3:8] = 0.9
    m[0, 0] += np.random.default_rng(1).random((10, 10)).astype(np.float32) * 0.05
    t = refine.otsu_thresholds(m)
    assert t.shape == (1, 2)
    out = m > t[..., None, None]
    assert out[0, 0].sum() == 15 and out[0, 0, 2:5, 3:8].all()
    assert out[0, 1].sum() == 0  # flat: no foreground
    # the same cut as OpenCV's own Otsu mask on the quantised map
    q = np.round((m[0, 0] - m[0, 0].min()) / np.ptp(m[0, 0]) * 255).astype(np.uint8)
    _, ref = cv2.threshold(q, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert (out[0, 0] == ref.astype(bool)).all()


def test_grey_zscore_is_a_robust_signed_z_score():
    rng = np.random.default_rng(4)
    img = np.repeat((100 + rng.normal(0, 5, (1, 1, 32, 32))).astype(np.float32), 3, 1)
    img[:, :, 10:14, 10:14] = 40.0  # a dark defect, 16 of 1024 pixels
    z = refine.grey_zscore(img)
    assert z.shape == (1, 32, 32)
    assert z[0, 10:14, 10:14].max() < -8  # about 60 / 5 robust sds, darker
    assert np.median(np.abs(z)) < 1 and (np.abs(z) > 3).mean() < 0.03
    # the same with the defect ten times brighter: it cannot move the median or the MAD
    img[:, :, 10:14, 10:14] = 255.0
    z2 = refine.grey_zscore(img)
    assert z2[0, 10:14, 10:14].min() > 8
    assert np.median(np.abs(z2)) == pytest.approx(np.median(np.abs(z)), rel=0.05)


def test_class_polarity_follows_the_labels_and_departures_its_sign():
    rng = np.random.default_rng(5)
    labels = rng.random((200, 3)) < 0.5
    balance = rng.normal(0, 0.01, 200)
    balance[labels[:, 0]] -= 0.02  # class 0: its images hold more dark pixels
    balance[labels[:, 1]] += 0.02  # class 1: more bright ones; class 2: no difference
    pol = refine.class_polarity(balance, labels)
    assert pol[:2].tolist() == [-1, 1] and np.isnan(pol[2])
    assert np.isnan(refine.class_polarity(balance, labels, min_t=1e6)).all()
    z = np.array([[[-3.0, -0.5, 0.5, 3.0]]])
    d = refine.departures(z, 1.0, np.array([-1, 1, 0, np.nan]))
    assert d[0, :, 0].tolist() == [[True, False, False, False], [False, False, False, True],
                                   [True, False, False, True], [True, True, True, True]]
    # one number of sds per class (NaN beside a NaN polarity)
    d = refine.departures(z, np.array([4.0, 0.4, 0.4, np.nan]), np.array([-1, 1, 0, np.nan]))
    assert d[0, :, 0].tolist() == [[False, False, False, False], [False, False, True, True],
                                   [True, True, True, True], [True, True, True, True]]


def _contrast_case(seed=6, n=40, size=32):
    """Grey images with sheet noise (robust z ~ N(0, 1)) and three classes on every image:
    class 0 has a dark 6x6 defect inside its region, class 1 a region with nothing in it, class
    2 a defect that is dark in half of its images and bright in the others (outside the other
    classes' regions, a dark defect of another class)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1, (n, size, size)).astype(np.float32)
    region = np.zeros((n, 3, size, size), bool)
    region[:, 0, 4:18, :14] = True
    region[:, 1, 20:, 16:] = True
    region[:, 2, :12, 16:30] = True
    z[:, 8:14, 4:10] -= 6.0  # class 0's defect, in its region
    z[: n // 2, 2:8, 20:26] -= 6.0  # class 2's, in its region, of both signs
    z[n // 2:, 2:8, 20:26] += 6.0
    return z, region, np.ones((n, 3), bool)


def test_contrast_learns_the_sign_and_sds_where_departures_concentrate():
    z, region, present = _contrast_case()
    c = refine.Contrast.empty(3, refine.GreyConfig().deviations)
    for s in range(0, len(z), 7):  # batch by batch, as calibrate feeds it
        c.add(z[s:s + 7], region[s:s + 7], present[s:s + 7])
    assert c.n_in[0] == 40 * 14 * 14 and c.n_out[0] == 40 * (32 * 32 - 14 * 14 - 12 * 16 - 12 * 14)
    assert c.inside[0, 0, 0] > c.outside[0, 0, 0] / 2
    r0 = region[:, 0]  # the counts are the plain ones: dark (sign 0) departures in class 0's region
    assert c.inside[0, 0].tolist() == [int(((-z[r0]) > k).sum()) for k in c.ks]
    sheet = ~region.any(1)  # either way (sign 2) outside every region
    assert c.outside[0, 2].tolist() == [int((np.abs(z[sheet]) > k).sum()) for k in c.ks]
    pol, ks = refine.contrast_departures(c)
    assert pol[0] == -1 and ks[0] >= 2  # dark; far enough out that the sheet's noise is left
    assert np.isnan(pol[1]) and np.isnan(ks[1])  # no concentration: no grey-level test
    assert pol[2] == 0 and ks[2] >= 2  # dark in some images, bright in others: either sign
    # the chosen cut keeps the defect and little else, better than the whole region
    d = refine.departures(z, ks, pol) & region
    tp = d[:, 0, 8:14, 4:10].sum()
    assert tp > 0.95 * 40 * 36 and d[:, 0].sum() < 1.3 * tp
    # only the labelled images count
    none = refine.Contrast.empty(3, [1.0, 2.0])
    none.add(z, region, np.zeros_like(present))
    assert none.n_in.sum() == 0 and np.isnan(refine.contrast_departures(none)[0]).all()
    # a purity nothing reaches leaves every class without a test
    assert np.isnan(refine.contrast_departures(c, min_purity=1.0)[0][1:]).all()


def test_par_keeps_constants_and_stops_at_edges():
    img = np.zeros((1, 3, 24, 24), np.float32)
    img[:, :, :, 12:] = 200.0  # a strong vertical edge
    img += np.random.default_rng(2).random(img.shape).astype(np.float32)  # texture
    flat = np.full((1, 2, 24, 24), 0.7, np.float32)
    assert np.allclose(refine.par(flat, img, iterations=5, dilations=(1, 2, 4)), 0.7, atol=1e-5)
    m = np.zeros((1, 1, 24, 24), np.float32)
    m[0, 0, 10:14, 8:11] = 1.0  # a blob on the dark side, next to the edge
    out = refine.par(m, img, iterations=10, dilations=(1, 2, 4))[0, 0]
    assert out[:, :12].mean() > 20 * out[:, 12:].mean()  # it spread on its own side only
    assert 0 <= out.min() and out.max() <= 1 + 1e-6  # weighted means of the map's values
    # without the edge the same blob spreads across
    same = refine.par(m, np.full_like(img, 100.0), iterations=10, dilations=(1, 2, 4))[0, 0]
    assert same[:, 12:].mean() > 5 * out[:, 12:].mean()
    with pytest.raises(ValueError, match="differ in size"):
        refine.par(m, img[..., :12], iterations=1)


def test_par_refines_each_class_on_its_own():
    # every class flows with the same weights, independently of the others (a former version
    # reshaped the stacked neighbours so that classes and neighbours were mixed up)
    rng = np.random.default_rng(0)
    maps = rng.random((2, 4, 16, 20)).astype(np.float32)
    img = rng.integers(0, 255, (2, 3, 16, 20)).astype(np.float32)
    both = refine.par(maps, img, iterations=3, dilations=(1, 3))
    alone = np.concatenate([refine.par(maps[:, c:c + 1], img, iterations=3, dilations=(1, 3))
                            for c in range(4)], 1)
    assert np.allclose(both, alone, atol=1e-6)
    # the accumulated sum is the stacked one: m_i <- sum_k a_ik m_k
    import torch
    m, aff = torch.from_numpy(maps), refine.par_affinity(torch.from_numpy(img), (1, 3))
    nb = refine._neighbours(m, (1, 3))  # [B, K, C, H, W]
    assert nb.shape == (2, 17, 4, 16, 20) and torch.equal(nb[:, 0], m)
    direct = (nb * aff[:, :, None]).sum(1).numpy()
    assert np.allclose(refine.par(maps, img, iterations=1, dilations=(1, 3)), direct, atol=1e-6)


def test_confident_labels_defect_background_ignore_and_absent_classes():
    defect = np.array([[[[0, 0, 1, 1]], [[1, 1, 1, 1]]]], bool)
    background = np.array([[[[1, 0, 0, 1]], [[0, 0, 0, 0]]]], bool)
    out = confident_labels(defect, background, np.array([[True, False]]))
    assert out[0, 0, 0].tolist() == [0, IGNORE, 1, 1]  # defect wins over background
    assert (out[0, 1] == 0).all()  # the label says the class is absent


def test_gate_and_threshold_masks():
    maps = np.array([[[[0.2, 0.8]], [[0.6, 0.4]]]], np.float32)
    m = refine.threshold_masks(maps, np.array([0.5, 0.5]))
    assert m.tolist() == [[[[0, 1]], [[1, 0]]]]
    assert refine.gate(m, np.array([[True, False]])).tolist() == [[[[0, 1]], [[0, 0]]]]


def test_config_is_checked():
    for make, bad in ((refine.RegionConfig, {"rule": "mean"}),
                      (refine.RegionConfig, {"negative_quantile": 1.0}),
                      (refine.RegionConfig, {"par_iterations": -1}),
                      (refine.RegionConfig, {"threshold": 0}),
                      (refine.RefineConfig, {"band": 1.5}), (refine.RefineConfig, {"region": "mean"}),
                      (refine.RefineConfig, {"grey": "mean"}),
                      (refine.GreyConfig, {"deviation": 0}), (refine.GreyConfig, {"min_t": 0}),
                      (refine.GreyConfig, {"min_z": 0}), (refine.GreyConfig, {"deviations": ()}),
                      (refine.GreyConfig, {"deviations": (1.0, -1.0)}),
                      (refine.GreyConfig, {"min_purity": 0})):
        with pytest.raises(ConfigError):
            make(**bad)
    assert "Otsu" in refine.RefineConfig(region="otsu").describe()
    assert "robust sd" not in refine.RefineConfig(grey="off").describe()
    assert refine.GreyConfig(deviations=(2, 0.5)).deviations == (0.5, 2.0)
    # a rule's name stands for its defaults
    assert refine.RefineConfig(region="otsu", grey="off") == refine.RefineConfig(
        region=refine.RegionConfig("otsu"), grey=refine.GreyConfig("off"))


class _Cache:
    """What the refinement reads of a CamCache: the maps in their own units (``absolute_on`` a
    device) and the paper's maps (``maps_on`` a device, ``maps`` in numpy)."""

    def __init__(self, low):
        self._low = low

    def absolute_on(self, device, rows, size, scales=None):
        return refine.absolute_maps_on(device, self._low[np.asarray(rows)], size, scales)

    def maps_on(self, device, rows, size):
        from cam2mask_lib.cams import upsample
        return torch.from_numpy(upsample(self._low[np.asarray(rows)][:, 0], size)).to(device)

    def maps(self, rows, size):
        return self.maps_on("cpu", rows, size).numpy()


def _case(n=20):
    rng = np.random.default_rng(3)
    labels = np.zeros((n, 2), bool)
    labels[:10, 0] = True
    labels[10:, 1] = True
    low = rng.random((n, 1, 2, 4, 4)).astype(np.float32) * 0.2
    low[:10, 0, 0, 1:3, 1:3] += 3.0  # class 0 fires where it is present
    low[10:, 0, 1, 0, :] += 2.0
    imgs = np.full((n, 3, 8, 8), 120.0, np.float32)
    imgs += rng.normal(0, 2, imgs.shape).astype(np.float32)
    imgs[:10, :, 3:5, 3:5] = 30.0  # the class-0 defect is dark, 2x2 pixels
    return labels, low, imgs


def test_negative_calibration_and_refine_batches_on_a_cache():
    labels, low, imgs = _case()
    cfg = refine.RefineConfig(region=refine.RegionConfig("negatives", negative_quantile=0.9),
                              grey="off")
    cal = refine.calibrate(_Cache(low), None, labels, (8, 8), cfg, batch=7)
    assert cal.thresholds.shape == (2,) and (cal.thresholds < 0.5).all()
    probs = labels.astype(float)
    got = list(refine.refine_batches(_Cache(low), None, np.arange(20), probs, (8, 8), cfg, cal, 6))
    rows = np.concatenate([b for b, _, _ in got])
    masks = np.concatenate([m for _, _, m in got])
    assert rows.tolist() == list(range(20))
    assert masks[:10, 1].sum() == 0 and masks[10:, 0].sum() == 0  # the gate
    assert masks[:10, 0, 3:5, 3:5].all() and not masks[:10, 0, 0].any()  # the defect, not more


def test_the_grey_level_narrows_the_region_to_the_defect():
    labels, low, imgs = _case()
    load = lambda rows: imgs[np.asarray(rows)]  # noqa: E731
    probs = labels.astype(float)
    for region, grey in zip(refine.REGIONS, ("contrast", "labels", "contrast")):
        wide = refine.RefineConfig(region=region, grey="off")
        # departures from the image's grey (on 8x8 images a neighbourhood is a pixel or two)
        cfg = refine.RefineConfig(region=region, grey=refine.GreyConfig(grey, deviation=3.0,
                                                                        local_region=False))
        cal = refine.calibrate(_Cache(low), load, labels, (8, 8), cfg)
        assert cal.polarity[0] == -1  # the class-0 defect is dark, learnt from the labels
        if grey == "contrast":  # class 1 has no grey-level cue: its region stays whole
            assert np.isnan(cal.polarity[1]) and np.isnan(cal.deviations[1])
        else:  # the t-test between images is fooled: next to class 0's dark images, class 1's
            assert cal.polarity[1] == 1  # look bright, though nothing in them departs
        w = np.concatenate([m for *_, m in refine.refine_batches(_Cache(low), load, np.arange(20),
                                                                 probs, (8, 8), wide, cal)])
        n = np.concatenate([m for *_, m in refine.refine_batches(_Cache(low), load, np.arange(20),
                                                                 probs, (8, 8), cfg, cal)])
        assert (w[:10, 0].sum((-2, -1)) > 4).all(), region  # the CAM blob is larger than the defect
        assert (n[:10, 0].sum((-2, -1)) == 4).all() and n[:10, 0, 3:5, 3:5].all(), region
        t = refine.self_training_targets(_Cache(low), load, np.arange(20), labels, (8, 8), cfg, cal)
        assert (t[:10, 0, 3:5, 3:5] == 1).all() and (t[10:, 0] == 0).all()
        assert (t[:10, 0, 0] == 0).mean() > 0.6, region  # mostly the sheet's own grey, far off
        assert (t[:10, 0] == IGNORE).any(), region  # and a band left to the network


def test_self_training_cache_key_follows_what_the_labels_taught(tmp_path):
    """Networks trained on refined targets are cached by their key: a calibration that changes
    (here only the polarity learnt from the labels) must change it."""
    from types import SimpleNamespace

    from cam2mask_lib.seg_stage import refined_targets

    ctx = SimpleNamespace(seg_size=(8, 8), artifacts=tmp_path, images=lambda: None,
                          index=SimpleNamespace(
        labels=np.zeros((3, 2))), profile=SimpleNamespace(classifier=SimpleNamespace(
            cache_images=False)))
    cache = SimpleNamespace(path=tmp_path / "cams" / "run")

    def key(polarity):
        cal = refine.Calibration(np.ones(2), np.full(2, 0.3), np.asarray(polarity, float),
                                 np.where(np.isnan(polarity), np.nan, 1.0))
        ref = refine.Refined(ctx, cache, refine.RefineConfig(), cal, (8, 8))
        return refined_targets(ctx, ref).key

    assert key([-1, 1]) == key([-1, 1])
    assert key([-1, 1]) != key([-1, np.nan]) != key([-1, 0])

    def key_k(ks):  # the sds learnt per class too
        cal = refine.Calibration(np.ones(2), np.full(2, 0.3), np.array([-1.0, 1.0]),
                                 np.asarray(ks, float))
        return refined_targets(ctx, refine.Refined(ctx, cache, refine.RefineConfig(), cal,
                                                   (8, 8))).key

    assert key_k([1, 2]) != key_k([1, 1])

    def key_cfg(cfg):  # and every field of the refinement's configuration
        cal = refine.Calibration(np.ones(2), np.full(2, 0.3), np.array([-1.0, 1.0]), np.ones(2))
        return refined_targets(ctx, refine.Refined(ctx, cache, cfg, cal, (8, 8))).key

    assert key_cfg(refine.RefineConfig()) == key_cfg(refine.RefineConfig(band=0.5))
    assert key_cfg(refine.RefineConfig()) != key_cfg(refine.RefineConfig(band=0.4))
    assert key_cfg(refine.RefineConfig())["refine"] == {}  # the default: no field in the key


def test_a_self_trained_network_is_cut_where_it_agrees_with_its_teacher():
    """An under-confident network (probabilities 0.3 on its teacher's mask, 0.1 elsewhere) is cut
    between the two, where 0.5 would find nothing; a confident one keeps a high cut; a class no
    image is labelled with keeps 0.5."""
    from cam2mask_lib.postprocess import collect_stats
    from cam2mask_lib.seg_stage import NET_THRESHOLDS, fit_to_teacher

    rng = np.random.default_rng(0)
    teacher = np.zeros((12, 3, 8, 8), np.uint8)
    teacher[:6, 0, 2:5, 2:6] = 1
    teacher[6:, 1, 4:, :3] = 1
    labels = teacher.any((-2, -1))
    probs = np.where(teacher, 0.3, 0.1) + rng.uniform(-0.04, 0.04, teacher.shape)
    probs[:, 1] = np.where(teacher[:, 1], 0.95, 0.6) + rng.uniform(-0.02, 0.02, (12, 8, 8))
    got = fit_to_teacher(collect_stats([probs[:5], probs[5:]], [teacher[:5], teacher[5:]],
                                       NET_THRESHOLDS), labels)
    assert 0.1 < got[0] < 0.3 and 0.6 < got[1] < 0.95 and got[2] == 0.5
    assert ((probs[:6, 0] > got[0]) == teacher[:6, 0].astype(bool)).all()


def test_refined_targets_take_the_training_batch_instead_of_reading_it_again():
    """Self-training targets made from a batch's uint8 images (what a trainer has read already)
    equal those that read the images themselves, which a second read would otherwise cost; a
    memo passes only the images of the rows it has not seen."""
    from types import SimpleNamespace

    from cam2mask_lib.seg_stage import Targets

    labels, low, imgs = _case()
    big = np.repeat(np.repeat(np.clip(imgs, 0, 255).astype(np.uint8), 2, -2), 2, -1)  # 16x16
    reads = []

    def uint8_batch(rows, num_workers=0):
        reads.append(len(rows))
        return torch.from_numpy(big[np.asarray(rows)])

    ds = SimpleNamespace(uint8_batch=uint8_batch)
    ctx = SimpleNamespace(images=lambda: ds, device=torch.device("cpu"),
                          index=SimpleNamespace(labels=labels),
                          profile=SimpleNamespace(classifier=SimpleNamespace(num_workers=0)))
    cfg = refine.RefineConfig(region=refine.RegionConfig(par_iterations=2))
    cal = refine.calibrate(_Cache(low), refine.image_loader(ctx, (8, 8)), labels, (8, 8), cfg)
    ref = refine.Refined(ctx, _Cache(low), cfg, cal, (8, 8))
    rows = np.array([3, 12, 5, 17])
    reads.clear()
    own = ref.targets(rows)
    assert reads == [4]
    given = ref.targets(rows, torch.from_numpy(big[rows]))
    assert reads == [4] and np.array_equal(own, given)
    assert (own == IGNORE).any() and (own == 1).any()  # the case exercises every kind of pixel
    seen = []

    def fn(r, x):
        seen.append((list(r), x.shape[0]))
        return ref.targets(r, x)

    t = Targets("refined", {}, fn, memo={}, guide=ds)
    first = t(rows[:2], torch.from_numpy(big[rows[:2]]))
    both = t(rows, torch.from_numpy(big[rows]))
    assert seen == [([3, 12], 2), ([5, 17], 2)] and np.array_equal(both, own)
    assert np.array_equal(first, own[:2])
    with pytest.raises(TypeError, match="rows only"):
        Targets("true", {}, lambda r: own)(rows, torch.from_numpy(big[rows]))


def test_local_zscore_is_the_robust_z_of_the_grey_minus_its_gaussian_blur():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(8)
    # a sheet whose grey drifts from 60 to 200 across the image, and a small dark defect on it
    img = np.linspace(60, 200, 64, dtype=np.float32)[None, None, None, :].repeat(48, 2)
    img = np.repeat(img + rng.normal(0, 2, (1, 1, 48, 64)).astype(np.float32), 3, 1)
    img[:, :, 20:23, 50:53] -= 30.0  # darker than its neighbours, not than the image's median
    z = refine.local_zscore(img, sigma=0.125)
    # the library's blur (scipy: "mirror" is torch's reflect; radius 3 sigma) gives the same
    g = img.mean(1, keepdims=True)
    ref = gaussian_filter(g[0, 0].astype(np.float64), 0.125 * 48, mode="mirror", truncate=3.0)
    assert np.abs(refine.gaussian_blur(torch.from_numpy(g), 0.125 * 48)[0, 0].numpy()
                  - ref).max() < 1e-3
    d = g[0, 0] - ref  # torch's median of an even count is the lower middle value, numpy's the mean
    ref_z = (d - np.median(d)) / (1.4826 * np.median(np.abs(d - np.median(d))) + 1e-3)
    assert z.shape == (1, 48, 64) and np.abs(z[0] - ref_z).max() < 0.05
    assert z[0, 20:23, 50:53].max() < -5  # the defect departs from its neighbourhood
    assert (z[0, :, 8:-8] < -5).sum() == 9  # and only it, away from the borders (a reflected
    # ramp bends there, so the blur is off by a few sds of this sheet at the first columns)
    assert (z[0] < -5).sum() > 9
    # where the image's grey level does not see it
    assert refine.grey_zscore(img)[0, 20:23, 50:53].min() > -1


def _misplaced_case(n=40, size=32):
    """Class 0's CAM looks at the top-left corner, its defect (a dark 3x3 spot) is anywhere else;
    class 1 (the other half of the images) has a CAM blob and no defect at all."""
    rng = np.random.default_rng(9)
    labels = np.zeros((n, 2), bool)
    labels[: n // 2, 0] = True
    labels[n // 2:, 1] = True
    low = rng.random((n, 1, 2, 4, 4)).astype(np.float32) * 0.2
    low[: n // 2, 0, 0, 0, 0] += 3.0
    low[n // 2:, 0, 1, 2:, 2:] += 2.0
    imgs = np.repeat(120 + rng.normal(0, 2, (n, 1, size, size)).astype(np.float32), 3, 1)
    spots = rng.integers(12, size - 4, (n // 2, 2))
    for i, (y, x) in enumerate(spots):
        imgs[i, :, y:y + 3, x:x + 3] -= 40.0
    return labels, low, imgs, spots


def test_a_class_its_region_misses_is_tested_on_the_whole_image():
    labels, low, imgs, spots = _misplaced_case()
    load = lambda rows: imgs[np.asarray(rows)]  # noqa: E731
    probs = labels.astype(float)
    cal = refine.calibrate(_Cache(low), load, labels, (32, 32), refine.RefineConfig(), batch=16)
    assert cal.anywhere.tolist() == [True, False]  # class 1: nothing to find anywhere
    assert cal.polarity[0] == -1 and cal.deviations[0] >= 2 and np.isnan(cal.polarity[1])
    c = refine.Contrast.empty(2, [1.0, 3.0])  # the counts: each image once, dark and bright only
    z = refine.local_zscore(imgs)
    c.add_images(z, labels)
    assert c.n_in.tolist() == [20 * 32 * 32] * 2 and (c.inside[:, 2] == 0).all()
    assert c.inside[0, 0, 1] == (-z[:20] > 3).sum() and c.outside[0, 1, 0] == (z[20:] > 1).sum()
    assert "anywhere in the image" in cal.describe()
    masks = np.concatenate([m for *_, m in refine.refine_batches(
        _Cache(low), load, np.arange(40), probs, (32, 32), refine.RefineConfig(), cal)])
    for i, (y, x) in enumerate(spots):  # the spot, outside the class's CAM region, and little else
        assert masks[i, 0, y:y + 3, x:x + 3].all() and masks[i, 0].sum() <= 12
    assert not masks[20:, 0].any()  # the classifier's gate still holds
    t = refine.self_training_targets(_Cache(low), load, np.arange(40), labels, (32, 32),
                                     refine.RefineConfig(), cal)
    y, x = spots[0]
    assert (t[0, 0, y:y + 3, x:x + 3] == 1).all() and (t[0, 0] == 0).mean() > 0.9
    # without the whole-image test the class keeps its CAM region, which misses the spots
    off = refine.RefineConfig(grey=refine.GreyConfig(whole_image=False))
    cal_off = refine.calibrate(_Cache(low), load, labels, (32, 32), off, batch=16)
    assert not cal_off.anywhere.any() and np.isnan(cal_off.polarity).all()
    with pytest.raises(ConfigError, match="local_sigma"):
        refine.GreyConfig(local_sigma=0.5)


def test_the_separable_blur_equals_torchvisions():
    from torchvision.transforms.v2.functional import gaussian_blur as tv_blur

    x = torch.rand(2, 1, 40, 56) * 255
    for sigma in (1.0, 5.0, 12.5):
        r = int(3 * sigma + 0.5)
        ref = tv_blur(x, [2 * r + 1, 2 * r + 1], [sigma, sigma])
        assert torch.allclose(refine.gaussian_blur(x, sigma), ref, atol=1e-3)


def test_a_region_that_holds_the_departures_keeps_its_class():
    """The whole-image test is for a class its region misses: where the class's CAM blob sits on
    its spots, the region localises it and no class is moved to the whole image."""
    labels, low, imgs, spots = _misplaced_case()
    low[:20, 0, 0] = 0.0
    for i, (y, x) in enumerate(spots):  # the class-0 CAM now peaks on its spot (4x4 map of 32)
        low[i, 0, 0, (y + 1) // 8, (x + 1) // 8] = 3.0
    load = lambda rows: imgs[np.asarray(rows)]  # noqa: E731
    cal = refine.calibrate(_Cache(low), load, labels, (32, 32), refine.RefineConfig(), batch=16)
    assert not cal.anywhere.any() and cal.polarity[0] == -1  # the region rule finds the spots
    # region_misses itself: departures inside the region (purity 1) or spread evenly (purity 0)
    near = refine.Contrast.empty(1, [1.0, 2.0])
    z = np.zeros((4, 8, 8), np.float32)
    region = np.zeros((4, 1, 8, 8), bool)
    region[:, 0, :4] = True
    z[:, 1, 1] = -5.0
    near.add(z, region, np.ones((4, 1), bool))
    assert refine.region_misses(near, np.array([-1.0]), np.array([2.0])).tolist() == [False]
    z[:, 6, 1] = -5.0  # as many outside
    near = refine.Contrast.empty(1, [1.0, 2.0])
    near.add(z, region, np.ones((4, 1), bool))
    assert refine.region_misses(near, np.array([-1.0]), np.array([2.0])).tolist() == [True]
    assert refine.region_misses(near, np.array([np.nan]), np.array([np.nan])).tolist() == [False]


def test_a_class_with_a_grey_cue_is_measured_from_its_neighbourhood():
    """A sheet with a wide, slow dark shading inside class 0's CAM region, and a sharp dark spot
    (the defect) in the same region: measured from the image's grey the class keeps the shading
    with the spot; measured from each pixel's neighbourhood (``local_region``, the default) the
    shading mostly goes, the spot stays."""
    rng = np.random.default_rng(10)
    n, size = 40, 64
    labels = np.zeros((n, 2), bool)
    labels[: n // 2, 0] = True
    labels[n // 2:, 1] = True
    low = rng.random((n, 1, 2, 4, 4)).astype(np.float32) * 0.2
    low[: n // 2, 0, 0, :, :2] += 3.0  # class 0 looks at the left half
    low[n // 2:, 0, 1, 1:3, 1:3] += 2.0  # class 1: a blob, no defect at all
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    shade = -40 * np.exp(-((yy - 32) ** 2 + (xx - 8) ** 2) / (2 * 16.0 ** 2))
    imgs = np.repeat(130 + rng.normal(0, 4, (n, 1, size, size)).astype(np.float32), 3, 1)
    imgs[: n // 2] += shade  # the shading is on class 0's sheets
    spots = np.stack([rng.integers(8, size - 11, n // 2), rng.integers(16, 28, n // 2)], 1)
    for i, (y, x) in enumerate(spots):
        imgs[i, :, y:y + 3, x:x + 3] -= 40.0
    load = lambda rows: imgs[np.asarray(rows)]  # noqa: E731
    probs = labels.astype(float)

    def masks_of(cfg):
        cal = refine.calibrate(_Cache(low), load, labels, (size, size), cfg, batch=16)
        m = np.concatenate([m for *_, m in refine.refine_batches(
            _Cache(low), load, np.arange(n), probs, (size, size), cfg, cal)])
        assert all(m[i, 0, y:y + 3, x:x + 3].all() for i, (y, x) in enumerate(spots))
        return cal, m[: n // 2, 0].sum()

    cal, kept = masks_of(refine.RefineConfig())
    assert cal.near.tolist() == [True, False] and not cal.anywhere.any()
    assert cal.polarity[0] == -1 and np.isnan(cal.polarity[1])
    assert "dark" in cal.describe() and "of its neighbourhood" in cal.describe()
    cal_g, kept_g = masks_of(refine.RefineConfig(grey=refine.GreyConfig(local_region=False)))
    assert not cal_g.near.any() and cal_g.polarity[0] == -1  # the same cue, from the image's grey
    assert kept_g > 3 * kept  # which keeps the shading as well
    # Contrast.add counts dark and bright only when asked (a dark spot's ring is bright)
    c = refine.Contrast.empty(2, [1.0])
    c.add(refine.local_zscore(imgs[:4]), np.ones((4, 2, size, size), bool), labels[:4],
          either=False)
    assert (c.inside[:, 2] == 0).all() and c.inside[0, 0, 0] > 0
    # the sign of the neighbourhood's test is the image grey's: a ring of the other sign is not
    # chosen, however much of it there is
    c = refine.Contrast(np.array([1.0]), np.array([[[20.0], [100.0], [0.0]]] * 2),
                        np.array([[[1.0], [1.0], [0.0]]] * 2), np.full(2, 1e3), np.full(2, 1e3))
    assert refine.contrast_departures(c)[0].tolist() == [1.0, 1.0]  # the bright ring
    pol, ks = refine.contrast_departures(c, signs=np.array([-1.0, np.nan]))
    assert pol[0] == -1 and ks[0] == 1.0 and np.isnan(pol[1]) and np.isnan(ks[1])


def test_targets_of_a_tensor_batch_stay_tensors_equal_to_numpys():
    """A training batch's self-training targets are made as torch where its images are (the
    trainer's device) and stay there; they equal the targets made from the same images as numpy,
    for every region and grey-level rule."""
    labels, low, imgs = _case()
    rows = np.arange(20)
    for cfg in (refine.RefineConfig(), refine.RefineConfig(region="negatives"),
                refine.RefineConfig(region="otsu", grey="labels"),
                refine.RefineConfig(region=refine.RegionConfig(par_iterations=2), grey="either"),
                refine.RefineConfig(grey="off")):
        as_numpy = lambda r: imgs[np.asarray(r)]  # noqa: E731
        as_tensor = lambda r: torch.from_numpy(imgs[np.asarray(r)])  # noqa: E731
        cal = refine.calibrate(_Cache(low), as_numpy, labels, (8, 8), cfg)
        t = refine.self_training_targets(_Cache(low), as_tensor, rows, labels, (8, 8), cfg, cal)
        n = refine.self_training_targets(_Cache(low), as_numpy, rows, labels, (8, 8), cfg, cal)
        if cfg.reads_grey or cfg.region.par_iterations:
            assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8
        assert isinstance(n, np.ndarray) and np.array_equal(np.asarray(t), n), cfg
