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
