"""The claims table (cam2mask_lib.claims): each claim read from a run's CSV tables, judged over
seeds, and the same table in the README as in the committed figures."""
from pathlib import Path

import pandas as pd
import pytest

from cam2mask_lib import claims, report
from cam2mask_lib.experiments import (BEST_VARIANT, CAM_MASKS_PAPER, CAM_PAPER_ROW, GRID_NO_MASK,
                                      SUPERVISED_ROW, network_row)

ROOT = Path(__file__).resolve().parents[1]
NE = claims.NONEMPTY


def write_run(folder: Path, gradcam=0.30, gradcampp=0.35, best=0.40, sup=0.5, cam=0.4,
              on_cam=0.3, auc=0.9) -> Path:
    """A made-up run's tables, only the cells the claims read (a test fixture, not a result)."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"source": ["this run"], "mean": [auc]}).to_csv(
        folder / "table1_classification_auc.csv", index=False)
    pd.DataFrame({"experiment": ["Grad-CAM + enc", "Grad-CAM++ + enc", f"{BEST_VARIANT} + enc"],
                  NE: [gradcam, gradcampp, best]}).to_csv(folder / "table2_cam_dice.csv",
                                                         index=False)
    pd.DataFrame({"experiment": [SUPERVISED_ROW, CAM_PAPER_ROW,
                                 network_row(CAM_MASKS_PAPER, gate=True)],
                  NE: [sup, cam, on_cam]}).to_csv(folder / "table3_segmentation.csv", index=False)
    models = [GRID_NO_MASK, "U-Net Focal loss", "ResNet encoder-decoder BCE"]
    pd.DataFrame({"model": models, "Dice (all)": [0.74, 0.6, 0.8], NE: [0.0, 0.3, 0.2],
                  "lost classes": ["1, 2, 3, 4", "-", "1, 2"],
                  "non-empty class 1": [0, 0, 0], "non-empty class 2": [0, 0, 0]}).to_csv(
        folder / "table4_architectures_losses.csv", index=False)
    return folder


def test_each_claim_reads_its_cells_and_judges_them(tmp_path):
    ev = claims.evaluate(claims.CLAIMS, {"a": write_run(tmp_path / "a")})
    verdicts = {c.text: ev.held(k, ["a"]) for k, c in enumerate(ev.claims)}
    assert all(n == 1 for _, n in verdicts.values()), verdicts
    held = [h for h, _ in verdicts.values()]
    # AUC 0.9 < the paper's 0.993; every ordering of the fixture holds; focal (0.3) beats BCE (0.2)
    assert held == [0, 1, 1, 1, 1, 1, 1]


def test_an_ordering_one_seed_reverses_is_noise_and_a_missing_table_is_not_measured(tmp_path):
    runs = {"seed 0": write_run(tmp_path / "s0"),
            "seed 1": write_run(tmp_path / "s1", gradcam=0.36, gradcampp=0.35),
            "seed 2": write_run(tmp_path / "s2", sup=0.3)}
    ev = claims.evaluate(claims.CLAIMS, runs)
    table = claims.claims_table(ev, "seed 0", list(runs))
    col = table["reproduced (default profile)"]
    assert col[1] == "holds in 2 of 3 seeds: noise"            # Grad-CAM++ > Grad-CAM
    assert col[3] == "holds in 2 of 3 seeds: noise"            # supervised > CAM masks
    assert col[0] == "does not hold in any of 3 seeds"
    assert col[2] == "holds in all 3 seeds"
    (tmp_path / "s0" / "table1_classification_auc.csv").unlink()
    ev = claims.evaluate(claims.CLAIMS, {"seed 0": tmp_path / "s0"})
    assert claims.claims_table(ev, "seed 0", ["seed 0"]).iloc[0]["ours"] == "not measured"


def test_the_paper_number_stands_beside_the_same_quantity():
    t3 = next(c for c in claims.CLAIMS if isinstance(c, claims.Ordering) and c.ratio)
    assert t3.better.column == t3.worse.column == NE       # paper Dice <-> our non-empty Dice
    assert t3.better.row == SUPERVISED_ROW and "gate" in SUPERVISED_ROW


def test_replace_block_refuses_text_without_markers():
    text = f"a\n{claims.BEGIN}\nold\n{claims.END}\nb\n"
    assert claims.replace_block(text, "new") == f"a\n{claims.BEGIN}\nnew\n{claims.END}\nb\n"
    assert claims.quoted_block(claims.replace_block(text, "new")) == "new"
    with pytest.raises(ValueError):
        claims.replace_block("no markers here", "new")


def test_the_readme_quotes_the_claims_and_real_data_tables_of_the_committed_figures():
    """Notebook 07 writes both blocks; a hand edit, or committed figures without a re-run of
    notebook 07, fails here."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert claims.quoted_block(readme) == claims.claims_block(
        ROOT / "figures" / "cpu", ROOT / "figures" / "seed_spread").strip()
    real = report.real_data_folders(ROOT / "figures")
    assert claims.quoted_block(readme, "<!-- real-data:begin -->", "<!-- real-data:end -->") \
        == report.real_data_block(real).strip()


def test_readme_is_short_enough_to_read():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 300
