"""Property: `cam2mask check` on a randomly corrupted copy of a small valid data set (CSV cells,
RLE strings, image bytes, file names) exits 0 or 2, never with a traceback, and on 2 names a file
of the data set."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cam2mask_lib.cli import main
from cam2mask_lib.data import rle_encode


@pytest.fixture(scope="module")
def valid_sets(tmp_path_factory):
    """A Severstal-format and a generic-format set of 4 small images each, both valid."""
    root = tmp_path_factory.mktemp("valid")
    rng = np.random.default_rng(0)
    sev = root / "sev"
    (sev / "train_images").mkdir(parents=True)
    rows = ["ImageId,ClassId,EncodedPixels"]
    gen = root / "gen"
    (gen / "images").mkdir(parents=True)
    (gen / "masks" / "pit").mkdir(parents=True)
    labels = ["image,pit,scratch"]
    for k in range(4):
        img = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
        Image.fromarray(img).save(sev / "train_images" / f"i{k}.jpg")
        Image.fromarray(img).save(gen / "images" / f"i{k}.png")
        m = np.zeros((32, 48), np.uint8)
        m[4:9 + k, 5:20] = 1
        rows.append(f"i{k}.jpg,{1 + k % 4},{rle_encode(m)}")
        pit = k % 2
        if pit:
            Image.fromarray(m * 255).save(gen / "masks" / "pit" / f"i{k}.png")
        labels.append(f"i{k},{pit},0")
    (sev / "train.csv").write_text("\n".join(rows) + "\n")
    (gen / "labels.csv").write_text("\n".join(labels) + "\n")
    assert main(["check", str(sev)]) == 0 and main(["check", str(gen)]) == 0
    return {"severstal": sev, "generic": gen}


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _corrupt_csv(text: str, data) -> str:
    lines = text.split("\n")
    i = data.draw(st.integers(0, len(lines) - 1), label="line")
    cells = lines[i].split(",")
    # the last cell (an RLE, or a label) half of the time: where most parsing happens
    j = data.draw(st.one_of(st.just(len(cells) - 1), st.integers(0, len(cells) - 1)), label="cell")
    cells[j] = data.draw(st.one_of(
        st.text(max_size=12),
        st.sampled_from(["", "-1", "0 0", "1 99999999999999999999", "3 2 1 2", "1", "x y",
                         "\ufeff", '"', "1,2", "nan", "2", "0", "..", "a/b", " 1 1 "]),
    ), label="value")
    lines[i] = ",".join(cells)
    if data.draw(st.booleans(), label="extra comma"):
        lines[i] += ","
    return "\n".join(lines)


def _corrupt_bytes(raw: bytes, data) -> bytes:
    kind = data.draw(st.sampled_from(["truncate", "flip", "empty", "garbage"]), label="bytes")
    if not raw and kind in ("truncate", "flip"):  # already emptied by an earlier corruption
        kind = "garbage"
    if kind == "truncate":
        return raw[:data.draw(st.integers(0, max(0, len(raw) - 1)))]
    if kind == "flip":
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            k = data.draw(st.integers(0, len(b) - 1))
            b[k] ^= 0xFF
        return bytes(b)
    if kind == "empty":
        return b""
    return data.draw(st.binary(min_size=1, max_size=64))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_check_never_tracebacks(valid_sets, tmp_path_factory, data, capsys):
    fmt = data.draw(st.sampled_from(sorted(valid_sets)), label="format")
    root = tmp_path_factory.mktemp("fuzz") / fmt
    shutil.copytree(valid_sets[fmt], root)
    for _ in range(data.draw(st.integers(1, 3), label="corruptions")):
        files = _files(root)
        if not files:
            break
        f = data.draw(st.sampled_from(files), label="file")
        what = data.draw(st.sampled_from(["content", "rename", "delete"]), label="what")
        if what == "rename":
            new = data.draw(st.sampled_from(["x.png", "i0.txt", "I0.JPG", "..png", "a b.png",
                                             "i1.png", "i1.jpg"]), label="name")
            if not (f.parent / new).exists():
                f.rename(f.parent / new)
        elif what == "delete":
            f.unlink()
        elif f.suffix == ".csv":
            f.write_text(_corrupt_csv(f.read_text(), data))
        else:
            f.write_bytes(_corrupt_bytes(f.read_bytes(), data))
    capsys.readouterr()
    code = main(["check", str(root)])  # an exception here fails the test: a traceback
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert str(root) in err, err
