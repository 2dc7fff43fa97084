"""The paper's and the thesis's claims, each checked against the tables of a run.

A claim names the quantities it compares, reads them from the CSV tables a run's notebooks wrote
(a figures folder), says whether it holds there, and quotes what the paper or the thesis measured
for the same quantity (:mod:`paper`). :func:`claims_table` checks every claim on the committed
run, on the other seeds of the seed spread (``benchmarks/seed_spread.py``) and on the lecture
profile, so an ordering that a seed reverses is reported as noise, not as a finding.

    ev = claims.evaluate(claims.CLAIMS, {"cpu, seed 0": Path("figures/cpu"), ...})

Nothing here computes a result: every number comes from a table a notebook wrote.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import paper
from .experiments import (BEST_VARIANT, CAM_MASKS_PAPER, CAM_PAPER_ROW, GRID_NO_MASK,
                          SUPERVISED_ROW, network_row)

Tables = Callable[[str], "pd.DataFrame | None"]


def tables_of(folder: str | Path) -> Tables:
    """``name -> DataFrame`` of the CSV tables under ``folder`` (None where a table is missing),
    each read once."""
    folder, seen = Path(folder), {}

    def read(name: str):
        if name not in seen:
            p = folder / f"{name}.csv"
            seen[name] = pd.read_csv(p) if p.is_file() else None
        return seen[name]
    return read


def _variant_row(variant: str) -> Callable[[str], bool]:
    """Table 2's row of a CAM variant: ``"<variant> + <encoder>"``."""
    return lambda name: str(name).rsplit(" + ", 1)[0] == variant


@dataclass(frozen=True)
class Cell:
    """One number of one table: the ``column`` of the row whose ``key`` column matches ``row``
    (a name, or a test of the name)."""

    table: str
    row: str | Callable[[str], bool]
    column: str
    key: str = "experiment"

    def read(self, tables: Tables) -> float | None:
        t = tables(self.table)
        if t is None or self.column not in t:
            return None
        hit = t[t[self.key] == self.row] if isinstance(self.row, str) else t[t[self.key].map(self.row)]
        return float(hit[self.column].iloc[0]) if len(hit) else None


def _fmt(v: float) -> str:
    return f"{v:.3f}"


@dataclass(frozen=True)
class Claim:
    """What the paper (or thesis) claims, where, and the notebook that shows it; subclasses say
    how it is measured and when it holds."""

    text: str
    source: str
    notebook: str
    short: str = ""  # a few words for the summary paragraph

    def values(self, tables: Tables) -> dict[str, float] | None:
        raise NotImplementedError

    def holds(self, v: dict[str, float]) -> bool:
        raise NotImplementedError

    def ours(self, v: dict[str, float]) -> str:
        raise NotImplementedError

    def quoted(self) -> str:
        """The paper's or thesis's numbers for the same quantities."""
        raise NotImplementedError


@dataclass(frozen=True)
class Ordering(Claim):
    """``better`` scores above ``worse``; the paper measured ``paper_better`` and
    ``paper_worse``. ``ratio``: also give worse / better (a share of the better one)."""

    better: Cell | None = None
    worse: Cell | None = None
    paper_better: float = float("nan")
    paper_worse: float = float("nan")
    ratio: bool = False

    def values(self, tables):
        b, w = self.better.read(tables), self.worse.read(tables)
        return None if b is None or w is None else {"better": b, "worse": w}

    def holds(self, v):
        return v["better"] > v["worse"]

    def _pair(self, b: float, w: float) -> str:
        return f"{_fmt(b)} vs {_fmt(w)}" + (f" ({w / b:.0%})" if self.ratio and b else "")

    def ours(self, v):
        return self._pair(v["better"], v["worse"])

    def quoted(self):
        return self._pair(self.paper_better, self.paper_worse)


@dataclass(frozen=True)
class Level(Claim):
    """``quantity`` reaches the paper's ``paper_value``."""

    quantity: Cell | None = None
    paper_value: float = float("nan")

    def values(self, tables):
        q = self.quantity.read(tables)
        return None if q is None else {"value": q}

    def holds(self, v):
        return v["value"] >= self.paper_value

    def ours(self, v):
        return _fmt(v["value"])

    def quoted(self):
        return _fmt(self.paper_value)


@dataclass(frozen=True)
class TopLosesClasses(Claim):
    """The thesis's warning: ranked by Dice over every mask, the top run of ``table`` draws no
    mask for at least one class (its Dice on that class's non-empty masks below 0.05), which
    the empty-empty pairs hide. The baseline row (no mask at all) is not a run."""

    table: str = "table4_architectures_losses"
    quoted_text: str = ""

    def values(self, tables):
        t = tables(self.table)
        if t is None:
            return None
        runs = t[t["model"] != GRID_NO_MASK]
        top = runs.loc[runs["Dice (all)"].idxmax()]
        lost = [c for c in str(top["lost classes"]).split(", ") if c not in ("-", "")]
        return {"Dice (all)": float(top["Dice (all)"]), "lost": float(len(lost)),
                "classes": float(len([c for c in t.columns if c.startswith("non-empty class ")]))}

    def holds(self, v):
        return v["lost"] >= 1

    def ours(self, v):
        return f"{_fmt(v['Dice (all)'])}, {v['lost']:.0f} of {v['classes']:.0f} classes lost"

    def quoted(self):
        return self.quoted_text


NONEMPTY = "Dice (non-empty masks)"
_T2, _T3, _T4 = "table2_cam_dice", "table3_segmentation", "table4_architectures_losses"
_B0 = "EfficientNet-b0 + HFlip"


def _thesis(model: str, column: str = NONEMPTY) -> Cell:
    return Cell(_T4, model, column, key="model")


# The thesis's nine runs other than its "best balanced" U-Net with focal loss: the best of them.
_THESIS_OTHERS = [m for m in paper.TABLE4 if m != "U-Net Focal loss"]


@dataclass(frozen=True)
class BestOf(Cell):
    """The largest ``column`` over the rows named in ``rows``."""

    rows: tuple[str, ...] = ()

    def read(self, tables):
        t = tables(self.table)
        if t is None:
            return None
        hit = t[t[self.key].isin(self.rows)]
        return float(hit[self.column].max()) if len(hit) else None


CLAIMS: list[Claim] = [
    Level("A classifier trained on image labels alone reaches the paper's mean ROC-AUC", "paper, Table 1", "01_classification",
          quantity=Cell("table1_classification_auc", "this run", "mean", key="source"),
          paper_value=float(np.mean(paper.TABLE1[_B0])), short="Table 1's AUC level"),
    Ordering("Grad-CAM++ makes better masks than Grad-CAM (Dice, non-empty masks)",
             "paper, Table 2", "03_postprocessing",
             better=Cell(_T2, _variant_row("Grad-CAM++"), NONEMPTY),
             worse=Cell(_T2, _variant_row("Grad-CAM"), NONEMPTY),
             paper_better=paper.TABLE2["Grad-CAM++"], paper_worse=paper.TABLE2["Grad-CAM"],
             short="Grad-CAM++ over Grad-CAM"),
    Ordering("Averaged weights (SWA) and augmentation smoothing improve Grad-CAM++'s masks",
             "paper, Table 2", "03_postprocessing",
             better=Cell(_T2, _variant_row(BEST_VARIANT), NONEMPTY),
             worse=Cell(_T2, _variant_row("Grad-CAM++"), NONEMPTY),
             paper_better=paper.TABLE2[BEST_VARIANT], paper_worse=paper.TABLE2["Grad-CAM++"],
             short="SWA and aug smoothing"),
    Ordering("A U-Net trained on true masks beats the CAM masks, which reach 75% of it",
             "paper, Table 3", "04_segmentation",
             better=Cell(_T3, SUPERVISED_ROW, NONEMPTY), worse=Cell(_T3, CAM_PAPER_ROW, NONEMPTY),
             paper_better=paper.TABLE3["U-Net on true masks (threshold 0.2, min_seg_len 0)"],
             paper_worse=paper.TABLE3["CAM masks (Grad-CAM++ + improvements)"], ratio=True,
             short="the supervised U-Net over the CAM masks"),
    Ordering("A U-Net trained on the CAM masks scores below the CAM masks themselves",
             "paper, Table 3", "04_segmentation",
             better=Cell(_T3, CAM_PAPER_ROW, NONEMPTY),
             worse=Cell(_T3, network_row(CAM_MASKS_PAPER, gate=True), NONEMPTY),
             paper_better=paper.TABLE3["CAM masks (Grad-CAM++ + improvements)"],
             paper_worse=paper.TABLE3["U-Net on CAM masks (threshold 0.2, min_seg_len 0)"],
             short="the U-Net on CAM masks below them"),
    TopLosesClasses("Dice over all masks ranks first a network that loses whole classes",
                    "thesis, Table 4", "05_architectures_losses",
                    quoted_text=(f"{paper.TABLE4['ResNet encoder-decoder BCE']['all']:.2f}, "
                                 f"classes {paper.TABLE4['ResNet encoder-decoder BCE']['lost']} "
                                 f"lost"), short="the thesis's lost classes"),
    Ordering("The U-Net with focal loss is the best balanced of the thesis's nine runs "
             "(Dice, non-empty masks, against the best other run)",
             "thesis, Table 4", "05_architectures_losses",
             better=_thesis("U-Net Focal loss"),
             worse=BestOf(_T4, "", NONEMPTY, key="model", rows=tuple(_THESIS_OTHERS)),
             paper_better=paper.TABLE4["U-Net Focal loss"]["full"],
             paper_worse=max(paper.TABLE4[m]["full"] for m in _THESIS_OTHERS),
             short="focal loss best balanced"),
]


@dataclass
class Evaluation:
    """Every claim on every run: ``values[claim index][run label]`` (None where the run lacks
    the table)."""

    claims: list[Claim]
    runs: list[str]
    values: list[dict[str, dict | None]]

    def held(self, k: int, runs: list[str]) -> tuple[int, int]:
        """In how many of ``runs`` (those that measured it) claim ``k`` holds, of how many."""
        vs = [self.values[k][r] for r in runs if self.values[k].get(r) is not None]
        return sum(self.claims[k].holds(v) for v in vs), len(vs)


def evaluate(claims: list[Claim], runs: dict[str, str | Path]) -> Evaluation:
    """Read every claim's quantities from every run's figures folder (``label -> folder``)."""
    vals = []
    for c in claims:
        vals.append({label: c.values(tables_of(folder)) for label, folder in runs.items()})
    return Evaluation(list(claims), list(runs), vals)


def _verdict(held: int, n: int) -> str:
    if n == 0:
        return "not measured"
    if held == n:
        return "holds" if n == 1 else f"holds in all {n} seeds"
    if held == 0:
        return "does not hold" if n == 1 else f"does not hold in any of {n} seeds"
    return f"holds in {held} of {n} seeds: noise"


def claims_table(ev: Evaluation, main: str, seeds: list[str],
                 lecture: list[str] | None = None) -> pd.DataFrame:
    """One row per claim: the paper's numbers, ours on the ``main`` run, whether it holds over
    the ``seeds`` runs (``main`` among them) and over the ``lecture`` runs, and the notebook."""
    rows = []
    for k, c in enumerate(ev.claims):
        v = ev.values[k].get(main)
        row = {"claim": c.text, "source": c.source, "paper / thesis": c.quoted(),
               "ours": c.ours(v) if v is not None else "not measured",
               "reproduced (default profile)": _verdict(*ev.held(k, seeds))}
        if lecture is not None:
            row["lecture profile"] = _verdict(*ev.held(k, lecture))
        row["notebook"] = c.notebook
        rows.append(row)
    return pd.DataFrame(rows)


def seed_folders(spread: str | Path, profile_figures: str | Path, own_seed: int = 0
                 ) -> dict[str, Path]:
    """``"seed S" -> folder``: the profile's own figures for its own seed, and each
    ``seed<S>/`` folder that ``benchmarks/seed_spread.py`` kept under ``spread``."""
    out = {f"seed {own_seed}": Path(profile_figures)}
    spread = Path(spread)
    if spread.is_dir():
        for d in sorted(spread.glob("seed*")):
            s = d.name.removeprefix("seed")
            if s.isdigit() and int(s) != own_seed and (d / "table1_classification_auc.csv").is_file():
                out[f"seed {int(s)}"] = d
    return out


def lecture_folders(spread: str | Path) -> dict[str, Path]:
    """``"lecture seed S" -> folder``: every seed of the lecture profile that
    ``benchmarks/seed_spread.py --profile lecture`` kept under ``spread``."""
    spread = Path(spread)
    return {f"lecture seed {d.name.removeprefix('seed')}": d
            for d in sorted(spread.glob("seed*"))
            if (d / "table1_classification_auc.csv").is_file()}


def _summary(ev: Evaluation, seeds: list[str], lecture: list[str], profile: str = "cpu") -> str:
    """One paragraph: how many claims hold in every seed, which are noise, which fail."""
    held = [ev.held(k, seeds) for k in range(len(ev.claims))]
    every = [k for k, (h, n) in enumerate(held) if n and h == n]
    never = [k for k, (h, n) in enumerate(held) if n and h == 0]
    noise = [k for k, (h, n) in enumerate(held) if n and 0 < h < n]

    def names(ks):
        return "; ".join(ev.claims[k].short or ev.claims[k].text for k in ks) or "none"
    n = max((n for _, n in held), default=0)
    where = f"in all {n} seeds" if n > 1 else "in the one run"
    def verb(ks):
        return "holds" if len(ks) == 1 else "hold"
    text = (f"Of the {len(ev.claims)} claims checked, {len(every)} {verb(every)} {where} of the "
            f"`{profile}` profile, {len(noise)} {verb(noise)} in some seeds only (noise at this "
            f"scale: {names(noise)}) and {len(never)} {verb(never)} in none ({names(never)}).")
    if lecture:
        lec = [ev.held(k, lecture) for k in range(len(ev.claims))]
        kept = sum(1 for k in every if lec[k][1] and lec[k][0] == lec[k][1])
        text += (f" The lecture profile keeps {kept} of those {len(every)} in all its "
                 f"{max(m for _, m in lec)} seeds.")
    return text


def claims_block(profile_figures: str | Path, spread_root: str | Path, profile: str = "cpu",
                 lecture: bool = True) -> str:
    """The claims table (Markdown) with its one-paragraph summary, read from the profile's
    figures, the other seeds ``benchmarks/seed_spread.py`` kept under
    ``<spread_root>/<profile>/`` and the lecture profile's seeds under ``<spread_root>/lecture/``:
    what the report opens with and the README quotes."""
    from .report import markdown_table
    seeds = seed_folders(Path(spread_root) / profile, profile_figures)
    lecture = lecture_folders(Path(spread_root) / "lecture") if lecture else {}
    ev = evaluate(CLAIMS, {**seeds, **lecture})
    table = claims_table(ev, "seed 0", list(seeds), list(lecture) or None)
    table = table.rename(columns={"ours": f"ours ({profile}, seed 0)",
                                  "reproduced (default profile)":
                                      f"holds ({profile}, seeds {', '.join(s.split()[-1] for s in seeds)})"})
    return (markdown_table(table) + "\n\n" + _summary(ev, list(seeds), list(lecture), profile) + " "
            "Each of our numbers is the same quantity as the paper's beside it (the Dice on "
            "non-empty masks wherever the paper's Dice is quoted); the data are SYNTHETIC "
            "(`cam2mask synth`), the encoders start from random weights.")


BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"


def replace_block(text: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    """``text`` with what stands between the ``begin`` and ``end`` markers replaced by
    ``block``; a text without both markers is an error (nothing is appended silently)."""
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"no {begin} ... {end} markers to replace")
    return text[:i + len(begin)] + "\n" + block.strip() + "\n" + text[j:]


def quoted_block(text: str, begin: str = BEGIN, end: str = END) -> str:
    """What stands between the markers (stripped)."""
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"no {begin} ... {end} markers")
    return text[i + len(begin):j].strip()


def notebook_claims(notebook: str, profile_figures: str | Path, profile: str, seed: int = 0,
                    spread_root: str | Path | None = None) -> str:
    """The claims a notebook shows, as Markdown bullets for its "What you should see": each claim,
    the paper's numbers, this run's, and in how many seeds of ``profile``'s seed spread it holds
    (``spread_root``, default ``figures/seed_spread`` of the checkout; the run itself only where
    no spread was measured for the profile, and then said so)."""
    from .utils import repo_root
    spread_root = Path(spread_root) if spread_root is not None else \
        repo_root() / "figures" / "seed_spread"
    seeds = seed_folders(spread_root / profile, profile_figures, own_seed=seed)
    mine = [c for c in CLAIMS if c.notebook == notebook]
    ev = evaluate(mine, seeds)
    lines = []
    for k, c in enumerate(mine):
        v = ev.values[k][f"seed {seed}"]
        if v is None:
            lines.append(f"- {c.text} ({c.source}): not measured in this run.")
            continue
        held, n = ev.held(k, list(seeds))
        here = "holds" if c.holds(v) else "does not hold"
        spread = (f"over the {n} seeds of the `{profile}` profile's seed spread it "
                  f"{_verdict(held, n)}" if n > 1 else
                  f"no seed spread was measured for the `{profile}` profile, so one run cannot "
                  f"tell this from noise")
        lines.append(f"- {c.text} ({c.source}: {c.quoted()}). This run: {c.ours(v)}, so it "
                     f"{here} here; {spread}.")
    return "\n".join(lines)
