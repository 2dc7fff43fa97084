import subprocess
import sys

import pytest

from cam2mask_lib.utils import ConfigError

from cam2mask_lib.cli import main
from cam2mask_lib.pipeline import load_data
from cam2mask_lib.profiles import PROFILES, get_profile


def test_profiles_and_overrides():
    assert {"smoke", "lecture", "cpu", "paper"} <= set(PROFILES)
    p = get_profile("cpu", classifier={"epochs": 3, "image_size": [64, 400]})
    assert p.classifier.epochs == 3 and p.image_size == (64, 400) and p.name == "cpu"
    assert get_profile("cpu").classifier.epochs == PROFILES["cpu"].classifier.epochs  # not mutated
    # dotted names reach nested sections; the profile's seed and device reach every stage
    q = get_profile("cpu", seed=5, **{"segmentation.net.loss": "focal", "grid.epochs": 4})
    assert q.segmentation.net.loss == "focal" and q.grid.epochs == 4
    assert q.classifier.seed == q.segmentation.net.seed == 5
    assert q.segmentation.size == PROFILES["cpu"].segmentation.size  # the rest kept
    with pytest.raises(ConfigError, match="unknown profile 'gpu'"):
        get_profile("gpu")
    with pytest.raises(ConfigError, match=r"unknown profile field\(s\) \['epoch'\]"):
        get_profile("cpu", epoch=3)
    with pytest.raises(ConfigError, match=r"unknown segmentation.net field\(s\) \['los'\]"):
        get_profile("cpu", **{"segmentation.net.los": "focal"})
    with pytest.raises(ValueError, match="n_folds=1"):
        get_profile("cpu", n_folds=1)


def test_paper_profile_needs_real_data(tmp_path):
    with pytest.raises(ValueError, match="needs real data"):
        load_data(get_profile("paper"), artifacts=tmp_path)


def test_help_for_every_command():
    out = subprocess.run([sys.executable, "-m", "cam2mask_lib", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("synth", "check", "train", "masks", "reproduce"):
        assert cmd in out
        sub = subprocess.run([sys.executable, "-m", "cam2mask_lib", cmd, "--help"],
                             capture_output=True, text=True, check=True).stdout
        assert "default" in sub or cmd == "check", cmd


def test_help_names_each_default_once():
    """Every option's help says its default at most once, and never "(default: None)"."""
    import re

    from cam2mask_lib.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subs.items():
        for action in sub._actions:
            text = sub._get_formatter()._expand_help(action) if action.help else ""
            assert text.count("default") <= 1, (name, action.option_strings, text)
            assert "(default: None)" not in text and "(default: False)" not in text, (name, text)
        # a default the help does not name is still said
        out = sub.format_help()
        assert not re.search(r"\(default: [^)]*\) \(default:", out), name
    masks = " ".join(subs["masks"].format_help().split())
    assert "the training recipe (default: cpu)" in masks and "dataset folder (default" not in masks


def test_cli_synth_check_and_errors(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s"), "--n", "6", "--height", "64",
                 "--width", "400"]) == 0
    assert main(["check", str(tmp_path / "s")]) == 0
    assert "synthetic steel-defect set" in capsys.readouterr().out
    # refuse to overwrite a folder holding something else
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["synth", "--out", str(tmp_path / "busy"), "--n", "3"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "w"), "--n", "3", "--workers", "0"]) == 2
    assert "workers=0" in capsys.readouterr().err and not (tmp_path / "w").exists()
    # a bad row is reported with file and line, exit 2
    with open(tmp_path / "s" / "train.csv", "a") as f:
        f.write("nope.jpg,1,1 2\n")
    assert main(["check", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "train.csv, line" in err and "nope.jpg" in err
    assert main(["reproduce", "--profile", "nosuch"]) == 2
    assert "unknown profile" in capsys.readouterr().err


def test_grid_holds_out_its_own_folds(tmp_path):
    """Notebook 05's grid scores the grid's ``folds`` where given (the paper profile: fold 0, one
    split as in the thesis), else the segmentation stage's; fold numbers out of range are refused
    when the profile is made, before any work."""
    import numpy as np

    from cam2mask_lib.experiments import grid_context
    from cam2mask_lib.pipeline import Context
    from cam2mask_lib.seg_stage import seg_folds

    def folds_of(name="paper", **overrides):
        ctx = Context(profile=get_profile(name, **overrides), index=None,
                      folds=np.arange(10) % 5, figures=tmp_path, artifacts=tmp_path, prov=None)
        return seg_folds(ctx), seg_folds(grid_context(ctx))

    assert folds_of() == ([0, 1, 2, 3, 4], [0])
    assert folds_of(**{"segmentation.folds": [1, 2]}) == ([1, 2], [0])
    assert folds_of("cpu") == ([0], [0])  # no grid folds: the stage's
    assert folds_of("cpu", **{"segmentation.folds": [1, 2]}) == ([1, 2], [1, 2])
    assert folds_of(**{"grid.folds": [3, 4]}) == ([0, 1, 2, 3, 4], [3, 4])
    for bad in ({"grid.folds": [5]}, {"segmentation.folds": [-1]}, {"grid.folds": []}):
        with pytest.raises(ConfigError, match="folds=.*expected fold numbers 0..4"):
            get_profile("paper", **bad)
