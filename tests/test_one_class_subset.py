"""benchmarks/one_class_subset.py: a one-class set drawn by the labels, with its masks, that
`cam2mask masks` reads; bad options refused before anything is written."""

import numpy as np
import pytest

from cam2mask_lib.data import load_dataset


@pytest.fixture(scope="module")
def sub(load_benchmark):
    return load_benchmark("one_class_subset")


def test_draws_by_label_and_carries_the_masks(sub, generic, tmp_path, capsys):
    src = load_dataset(generic)  # 'dark': 8 of 24 images
    out = tmp_path / "s"
    sub.main(["--data", str(generic), "--class", "dark", "--name", "pit", "--positives", "5",
              "--negatives", "7", "--out", str(out)])
    assert "5 images with 'dark' (as 'pit') and 7 without it" in capsys.readouterr().out
    new = load_dataset(out)
    assert new.class_names == ["pit"] and len(new) == 12 and new.labels.sum() == 5
    for i, key in enumerate(new.image_ids):
        j = src.image_ids.index(key)
        assert new.labels[i, 0] == src.labels[j, 0]
        assert (new.image_paths[i].read_bytes() == src.image_paths[j].read_bytes())
        assert np.array_equal(new.mask(i)[0], src.mask(j)[0])
    # the same seed draws the same images; another seed others
    again = tmp_path / "again"
    sub.main(["--data", str(generic), "--class", "dark", "--name", "pit", "--positives", "5",
              "--negatives", "7", "--out", str(again)])
    assert (again / "labels.csv").read_text() == (out / "labels.csv").read_text()
    other = tmp_path / "other"
    sub.main(["--data", str(generic), "--class", "dark", "--positives", "5", "--negatives", "7",
              "--seed", "1", "--out", str(other)])
    assert load_dataset(other).image_ids != new.image_ids


@pytest.mark.parametrize("extra, said", [
    (["--class", "pit", "--positives", "1", "--negatives", "1"], "has the classes"),
    (["--class", "dark", "--positives", "9", "--negatives", "1"], "choose 1 to 8"),
    (["--class", "dark", "--positives", "0", "--negatives", "1"], "choose 1 to 8"),
    (["--class", "dark", "--positives", "1", "--negatives", "17"], "choose 0 to 16"),
    (["--class", "dark", "--name", "a/b", "--positives", "1", "--negatives", "1"],
     "cannot name a folder"),
])
def test_bad_options_write_nothing(sub, generic, tmp_path, extra, said):
    out = tmp_path / "s"
    with pytest.raises(SystemExit, match=said):
        sub.main(["--data", str(generic), "--out", str(out)] + extra)
    assert not out.exists() and not (tmp_path / "s.partial").exists()


def test_an_existing_folder_is_not_overwritten(sub, generic, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not an empty folder"):
        sub.main(["--data", str(generic), "--class", "dark", "--positives", "1",
                  "--negatives", "1", "--out", str(out)])
    assert (out / "notes.txt").read_text() == "mine"
