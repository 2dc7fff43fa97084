import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cam2mask_lib import synth


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic Severstal-format set shared by the tests (read-only: copy to modify)."""
    return synth.generate(tmp_path_factory.mktemp("synth") / "ds", n=30, seed=3, height=64,
                          width=400, progress=False)


@pytest.fixture
def severstal_dir(tmp_path):
    """Factory for a Severstal-format folder: images given as {name: (h, w)}, CSV text as given."""
    def make(csv_text: str, images: dict[str, tuple[int, int]], csv_name="train.csv"):
        root = tmp_path / "sev"
        (root / "train_images").mkdir(parents=True)
        for name, (h, w) in images.items():
            Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / "train_images" / name)
        (root / csv_name).write_text(csv_text)
        return root
    return make


@pytest.fixture
def copy_of(tmp_path):
    def make(src: Path) -> Path:
        dst = tmp_path / ("copy_" + src.name)
        shutil.copytree(src, dst)
        return dst
    return make


@pytest.fixture(scope="session")
def generic(tmp_path_factory):
    """A generic-format set shared by the tests (read-only: copy to modify): 24 images of odd
    sizes; class 'dark' = a dark box, class 'bright' = a bright box, some images defect-free."""
    root = tmp_path_factory.mktemp("generic") / "ds"
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for c in ("dark", "bright"):
        (root / "masks" / c).mkdir(parents=True)
    rows = ["image,dark,bright"]
    for k in range(24):
        h, w = int(rng.integers(40, 70)), int(rng.integers(90, 150))
        img = rng.normal(120, 10, (h, w)).clip(0, 255)
        labels = [k % 3 == 0, k % 4 == 1]
        for c, (flag, val) in enumerate(zip(labels, (30, 230))):
            m = np.zeros((h, w), np.uint8)
            if flag:
                y, x = int(rng.integers(0, h - 15)), int(rng.integers(0, w - 25))
                m[y:y + 15, x:x + 25] = 1
                img[m == 1] = val
                Image.fromarray(m * 255).save(root / "masks" / ("dark", "bright")[c]
                                              / f"im{k:02d}.png")
        ext = "png" if k % 2 else "jpg"
        Image.fromarray(img.astype(np.uint8)).convert("RGB").save(
            root / "images" / f"im{k:02d}.{ext}")
        rows.append(f"im{k:02d},{int(labels[0])},{int(labels[1])}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def load_benchmark():
    """Import ``benchmarks/<name>.py`` (a script folder, not a package) as a module."""
    import importlib.util

    from cam2mask_lib.utils import repo_root

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, repo_root() / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


def pytest_collection_modifyitems(items):
    """A test that executes notebooks is slow too: ``pytest -m "not slow"`` leaves it out."""
    for item in items:
        if item.get_closest_marker("notebook"):
            item.add_marker(pytest.mark.slow)


class _CutShort:
    """Stands in for ``owner.name``: counts its calls and raises ``KeyboardInterrupt`` on call
    number ``at`` (a run stopped by the user); set ``at = None`` to let every call through."""

    def __init__(self, real, at: int):
        self.real, self.at, self.calls = real, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


@pytest.fixture
def cut_short(monkeypatch):
    """``cut_short(owner, "name", at)``: interrupt ``owner.name``'s ``at``-th call (the fixture
    puts the real one back at the end of the test); returns the stand-in."""
    def patch(owner, name: str, at: int) -> _CutShort:
        stand_in = _CutShort(getattr(owner, name), at)
        monkeypatch.setattr(owner, name, stand_in)
        return stand_in
    return patch
