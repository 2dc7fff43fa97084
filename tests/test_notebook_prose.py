"""Notebook prose states no result by hand: a number in a markdown cell of notebooks 01-06 is a
parameter, a formula's constant or one of the paper's own numbers (cam2mask_lib.paper), never a
result of the run, which the notebook renders from the values it computed. And every numbered
notebook ends with "What you should see"."""
import re
from pathlib import Path

import nbformat
import pytest

from cam2mask_lib import paper

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0[0-6]_*.ipynb"))


def _paper_values() -> set[float]:
    vals: set[float] = set()

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (tuple, list)):
            for x in v:
                walk(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            vals.add(float(v))
    for name in ("TABLE1", "TABLE2", "TABLE3", "TABLE4", "CLASS_COUNTS", "TOTAL_IMAGES",
                 "DEFECT_FREE_IMAGES", "DEFECTIVE_IMAGES", "CLASSES_PER_IMAGE"):
        walk(getattr(paper, name))
    t3 = paper.TABLE3
    cam, sup, on_cam = (t3["CAM masks (Grad-CAM++ + improvements)"],
                        t3["U-Net on true masks (threshold 0.2, min_seg_len 0)"],
                        t3["U-Net on CAM masks (threshold 0.2, min_seg_len 0)"])
    vals.add(round((4 * 6666 - paper.DEFECTIVE_IMAGES) / (4 * 6666), 3))    # the empty mask's Dice
    return vals


def _paper_percentages() -> set[float]:
    t3 = paper.TABLE3
    cam, sup, on_cam = (t3["CAM masks (Grad-CAM++ + improvements)"],
                        t3["U-Net on true masks (threshold 0.2, min_seg_len 0)"],
                        t3["U-Net on CAM masks (threshold 0.2, min_seg_len 0)"])
    out = {round(100 * cam / sup), round(100 * on_cam / sup)}              # the paper's ratios
    out |= {round(100 * n / paper.TOTAL_IMAGES, 1) for n in                 # its class shares
            [*paper.CLASS_COUNTS.values(), paper.DEFECT_FREE_IMAGES]}
    return out


PAPER, PAPER_PCT = _paper_values(), _paper_percentages()
# a result-like number: three or more decimals, or a percentage of two digits or with decimals
# (a one-digit whole percentage is a parameter: "at most 1% of the image")
NUMBER = re.compile(r"(?<![\w.$])(\d+\.\d{3,}|(?:\d{2,}(?:\.\d+)?|\d\.\d+)\s?\\?%)")


def result_numbers(markdown: str) -> list[str]:
    """The result-like numbers of a markdown cell that are not the paper's, outside formulas
    ($...$) and code spans."""
    text = re.sub(r"\$\$.*?\$\$|\$[^$]*\$|`[^`]*`", " ", markdown, flags=re.S)
    out = []
    for m in NUMBER.finditer(text):
        v = float(re.sub(r"[^\d.]", "", m.group(1)))
        known = PAPER_PCT if "%" in m.group(1) else PAPER
        if not any(abs(v - p) < (0.06 if "%" in m.group(1) else 6e-4) for p in known):
            out.append(m.group(1))
    return out


def test_the_checker_finds_a_typed_result_and_spares_the_papers():
    assert result_numbers("the supervised network scores 0.8407 here") == ["0.8407"]
    assert result_numbers("CAM masks reach 89% of it") == ["89%"]
    assert result_numbers("the paper's 0.465 and 0.621, 75%; threshold 0.3; $0.734$") == []


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if not p.name.startswith("00")],
                         ids=lambda p: p.stem)
def test_no_markdown_cell_states_a_result_by_hand(path):
    nb = nbformat.read(path, as_version=4)
    bad = {i: result_numbers(c.source) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"}
    assert not {i: b for i, b in bad.items() if b}, f"{path.name}: cells with typed results"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_numbered_notebook_ends_with_what_you_should_see(path):
    nb = nbformat.read(path, as_version=4)
    heads = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "markdown" and re.search(r"^## What you should see", c.source, re.M)]
    assert heads, f"{path.name}: no '## What you should see' section"
    rest = nb.cells[heads[-1] + 1:]
    assert any(c.cell_type == "code" and "display(Markdown(" in c.source for c in rest), \
        f"{path.name}: 'What you should see' is not rendered from computed values"
