import hashlib

import numpy as np
import pytest

from cam2mask_lib import synth
from cam2mask_lib.data import load_dataset
from cam2mask_lib.synth import assign_labels, generate


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, synth_dir):
    again = generate(tmp_path / "again", n=30, seed=3, height=64, width=400, progress=False)
    assert digest(again) == digest(synth_dir)
    other = generate(tmp_path / "other", n=30, seed=4, height=64, width=400, progress=False)
    assert digest(other) != digest(synth_dir)


def test_drawn_in_several_processes_the_same_bytes(tmp_path, synth_dir, monkeypatch):
    import os

    real, pids = synth.render_image, tmp_path / "pids"

    def logged(*a, **k):  # forked children inherit it; each appends the pid that drew
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*a, **k)

    monkeypatch.setattr(synth, "render_image", logged)
    par = generate(tmp_path / "par", n=30, seed=3, height=64, width=400, progress=False,
                   workers=3)
    drawn_by = pids.read_text().split()
    assert len(drawn_by) == 30 and str(os.getpid()) not in drawn_by and len(set(drawn_by)) > 1
    assert digest(par) == digest(synth_dir)


def test_written_in_current_kaggle_format(synth_dir):
    lines = (synth_dir / "train.csv").read_text().splitlines()
    assert lines[0] == "ImageId,ClassId,EncodedPixels"
    assert all(len(l.split(",")) == 3 and l.split(",")[2] for l in lines[1:])
    idx = load_dataset(synth_dir)
    assert idx.is_synthetic and idx.info["seed"] == 3 and len(idx) == 30
    assert idx.shapes.tolist() == [[64, 400]] * 30
    assert idx.image(0).shape == (64, 400, 3)


@pytest.mark.parametrize("n", [40, 800, 12568])
def test_class_frequencies_follow_the_paper(n):
    y = assign_labels(n, seed=0)
    k = y.sum(1)
    clean = (k == 0).mean()
    assert 0.40 <= clean <= 0.47
    counts = y.sum(0)
    assert counts[2] == counts.max() and counts[1] == counts.min()  # class 3 common, 2 rare
    assert counts.min() >= 2
    multi = (k >= 2).sum() / (k >= 1).sum()
    assert 0.01 <= multi <= 0.10
    share = counts / counts.sum()
    paper = np.array([897, 247, 5150, 801]) / 7095
    if n >= 800:
        assert np.allclose(share, paper, atol=0.01)


def test_generated_set_keeps_its_labels(tmp_path):
    ds = generate(tmp_path / "f", n=120, seed=5, height=128, width=800, progress=False)
    idx = load_dataset(ds)
    expected = assign_labels(120, 5)
    order = [idx.image_ids.index(synth.image_id(5, i)) for i in range(120)]
    assert np.array_equal(idx.labels[order], expected)


def test_defects_are_visible_but_not_trivial(tmp_path):
    """Inside masks the image differs from around them (class 4 darker than a ring just outside
    its mask; classes 1-3 more fine structure than the rest of the image), but contrast varies:
    some defects are faint."""
    ds = generate(tmp_path / "v", n=160, seed=11, height=128, width=800, progress=False)
    idx = load_dataset(ds)
    from scipy import ndimage
    darker, detail, contrasts = [], {0: [], 1: [], 2: []}, []
    for i in range(len(idx)):
        g = idx.image(i)[..., 0].astype(np.float32)
        hp = np.abs(g - ndimage.uniform_filter(g, 7))
        m = idx.mask(i).astype(bool)
        for c in np.flatnonzero(idx.labels[i]):
            out = ~m[c]
            if c == 3:
                ring = ndimage.binary_dilation(m[c], iterations=8) & out
                darker.append(g[ring].mean() - g[m[c]].mean())
                contrasts.append(darker[-1])
            else:
                detail[c].append(hp[m[c]].mean() / hp[out].mean())
    assert np.median(darker) > 5
    for c, ratios in detail.items():
        assert np.median(ratios) > 1.1, (c, np.median(ratios))
    assert min(contrasts) < np.median(contrasts) / 2  # some class-4 defects are faint


def test_refuses_to_overwrite_and_force_replaces(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        generate(out, n=5, seed=0, height=64, width=400, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    generate(out, n=5, seed=0, height=64, width=400, force=True, progress=False)
    assert not (out / "precious.txt").exists() and (out / "train.csv").is_file()


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, cut_short):
    ref = generate(tmp_path / "ref", n=12, seed=2, height=64, width=400, progress=False)
    cut = cut_short(synth, "render_image", 7)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "res", n=12, seed=2, height=64, width=400, progress=False)
    partial = tmp_path / "res.partial"
    assert len(list((partial / "train_images").glob("*.jpg"))) == 6
    assert not (tmp_path / "res").exists()
    cut.at = None
    out = generate(tmp_path / "res", n=12, seed=2, height=64, width=400, progress=False)
    assert cut.calls == 7 + 6  # only the missing six were drawn
    assert digest(out) == digest(ref) and not partial.exists()
