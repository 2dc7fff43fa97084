"""Writing figures and tables so that a reader can tell what produced each number.

Every table is written twice: ``<name>.csv`` (plain data, for code) and ``<name>.md`` (for people
and GitHub), the Markdown headed by a provenance line naming the profile, the data (synthetic or
real), the seed and the cam2mask version. No timestamps: the same run twice gives the same files.
"""
from __future__ import annotations

import io
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

from . import __version__
from .utils import atomic_write_bytes, atomic_write_text, read_json

# the packages whose versions can move a number (the rest of the environment is in the lock file)
VERSIONED = ("torch", "timm", "segmentation-models-pytorch", "grad-cam", "numpy")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The processor's model name with its family and model numbers (Linux: /proc/cpuinfo; a
    virtual machine may name only the vendor, "AMD EPYC", for processors of different
    generations), else what ``platform`` says."""
    try:
        info = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
        if "model name" in info:
            ids = [f"{k} {info[k]}" for k in ("cpu family", "model") if info.get(k)]
            return info["model name"] + (f", family {info['cpu family']} model {info['model']}"
                                         if len(ids) == 2 else "")
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(device: torch.device | str = "cpu") -> str:
    """What computes: the GPU's name on CUDA, else the CPU's model and the vector instructions
    torch's kernels use on it (AVX2, AVX512: they sum in different orders, so the same seed
    gives slightly different weights, and tables, on CPUs of the two kinds), with torch's thread
    count."""
    device = torch.device(device)
    if device.type == "cuda":
        what = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        what = f"CPU {cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"
    return f"{what}, {torch.get_num_threads()} torch threads"


def software() -> str:
    """The versions of the packages that make the numbers."""
    return ", ".join(f"{p} {_version(p)}" for p in VERSIONED)


@dataclass
class Provenance:
    """What made a table: profile, data, seed, cam2mask's and the key packages' versions, and the
    machine (a reviewer whose numbers differ can tell a different machine from a bug)."""

    profile: str
    data: str
    seed: int
    weights: str = ""
    software: str = field(default_factory=software)
    machine: str = field(default_factory=machine)

    def line(self) -> str:
        weights = f", weights: {self.weights}" if self.weights else ""
        return (f"_Profile `{self.profile}`, data: {self.data}, seed {self.seed}{weights}, "
                f"cam2mask {__version__}; {self.software}; {self.machine}._")


def provenance(profile, index, device: torch.device | str = "cpu") -> Provenance:
    """Provenance of results computed on ``index`` (a DatasetIndex) under ``profile``, on
    ``device``."""
    if index.is_synthetic:
        p = index.info.get("params", {})
        data = (f"SYNTHETIC steel-defect set (cam2mask synth, {len(index)} images "
                f"{p.get('height')}x{p.get('width')}, seed {index.info.get('seed')}, generator "
                f"v{index.info.get('generator_version')}), not Kaggle Severstal")
    else:
        data = f"{index.format}-format data at {index.root.name}/ ({len(index)} images)"
    return Provenance(profile=profile.name, data=data, seed=profile.seed,
                      weights=profile.weights(), machine=machine(device))


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub Markdown table (no extra dependency such as tabulate)."""
    def fmt(v):
        if isinstance(v, float):
            return "" if v != v else format(v, floatfmt)
        return str(v).replace("|", "\\|")
    cols = [str(c).replace("|", "\\|") for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def save_table(df: pd.DataFrame, folder: str | Path, name: str, title: str,
               prov: Provenance | None = None, note: str | None = None) -> Path:
    """Write ``name.csv`` and ``name.md`` under ``folder``; returns the Markdown path."""
    folder = Path(folder)
    atomic_write_text(folder / f"{name}.csv", df.to_csv(index=False))
    parts = [f"### {title}", ""]
    if prov is not None:
        parts += [prov.line(), ""]
    parts.append(markdown_table(df))
    if note:
        parts += ["", note]
    return atomic_write_text(folder / f"{name}.md", "\n".join(parts) + "\n")


def save_figure(fig, folder: str | Path, name: str, dpi: int = 110) -> Path:
    """Save a matplotlib figure as ``name.png`` (deterministic: no date metadata)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return atomic_write_bytes(Path(folder) / f"{name}.png", buf.getvalue())


# the report's sections: (heading, tables, figures), every file under the profile's figures folder
REPORT_SECTIONS = [
    ("Data", ["eda_class_counts"], ["eda_examples"]),
    ("Classification (Table 1)", ["table1_classification_auc"], ["cls_roc_curves"]),
    ("Masks from CAMs (Table 2)", ["table2_cam_dice", "table2_per_class"],
     ["cam_figures_10_13", "postprocess_gallery"]),
    ("Segmentation networks on true vs CAM masks (Table 3)",
     ["table3_segmentation", "table3_per_class"], ["table3_per_class_bars",
                                                   "segmentation_predictions_class3"]),
    ("Architectures x losses (Table 4)", ["table4_architectures_losses"],
     ["table4_per_class_bars", "table4_predictions_0"]),
    ("Beyond the paper: label-only refinement (Table 5)", ["table5_beyond_the_paper"],
     ["refine_predictions_class1"]),
]


def _table_text(path: Path) -> list[str]:
    """A table file's lines for the report: its heading one level down, its provenance line
    left out (the report states the provenance once, at the top)."""
    text = path.read_text(encoding="utf-8").strip().splitlines()
    out = [("#" + ln if ln.startswith("### ") else ln) for ln in text
           if not (ln.startswith("_Profile `") or ln.startswith("_Made with "))]
    return [ln for k, ln in enumerate(out) if ln or (k and out[k - 1])]  # no double blank lines


def build_report(figures: str | Path, out: str | Path, title: str, header: str,
                 timings: dict | None = None, opening: str | None = None,
                 appendix: list[tuple[str, Path, str]] = ()) -> Path:
    """Assemble ``out`` (Markdown) from the tables (``<name>.md``) and figures (``<name>.png``)
    the notebooks wrote under ``figures``, section by section (:data:`REPORT_SECTIONS`): first
    ``opening`` (the claims table and its summary), then the sections, then each ``appendix``
    entry ``(heading, table file, what it is)``, e.g. the seed spread and the real-steel
    benchmark, then the wall time of each notebook. A missing table or figure is named as
    missing, never invented; each table's provenance line is left out, the ``header`` states it
    once."""
    figures, out = Path(figures), Path(out)
    lines = [f"# {title}", "", header, ""]
    if opening:
        lines += ["## Which of the paper's claims hold", "", opening.strip(), ""]
    for heading, tables, figs in REPORT_SECTIONS:
        lines += [f"## {heading}", ""]
        for t in tables:
            p = figures / f"{t}.md"
            if p.is_file():
                lines += _table_text(p) + [""]
            else:
                lines += [f"_Table `{t}` was not produced (its notebook has not run in this "
                          f"profile)._", ""]
        for f in figs:
            p = figures / f"{f}.png"
            if p.is_file():
                rel = os.path.relpath(p, out.parent).replace(os.sep, "/")
                lines += [f"![{f}]({rel})", ""]
    for heading, path, what in appendix:
        lines += [f"## {heading}", "", what, ""]
        if Path(path).is_file():
            lines += _table_text(Path(path)) + [""]
        else:
            lines += [f"_Not measured yet: `{path}` is missing._", ""]
    if timings:
        lines += ["## Wall time per notebook", "", "| notebook | seconds |", "| --- | --- |"]
        lines += [f"| {k} | {v:.0f} |" for k, v in sorted(timings.items())]
        lines += [f"| total | {sum(timings.values()):.0f} |", "",
                  "_The latest execution of each notebook; one that reused finished work "
                  "(classifier folds, CAM caches, trained networks) is fast, so these are clean-run "
                  "times only after a clean run (`benchmarks/stage_times.py` makes one)._", ""]
    return atomic_write_text(out, "\n".join(lines).rstrip() + "\n")


# The real-data rows the README quotes (benchmarks/real_quality.py's table): how each row's
# name begins -> the README's shorter name.
REAL_DATA_ROWS = {
    "the paper's masks: the last layer's": "the paper's CAM masks (last layer, cut at 0.3)",
    "CAM masks, the paper's post-processing": "last layer x stride 8, cut as the paper does",
    "the same, a class with a grey cue": "label-only refinement of those maps",
    "U-Net self-trained on the default's masks": "**U-Net self-trained on the refined masks "
                                                 "(`cam2mask masks`)**",
    "supervised U-Net + the same classifier gate": "U-Net trained on the true masks (reference)",
}
REAL_DATA_SHARES = ("gap closed", "non-empty, share of supervised")
DEFECT_FREE = "defect-free images with a mask"


# the real development sets benchmarks/real_quality.py has measured: README name -> folder under
# figures/real_quality/ (the data lives beside the project, never in it)
REAL_DATA_SETS = {"NEU-Seg (steel)": "neu_seg_dev", "BSData (ball screws)": "bsdata_dev"}


def real_data_folders(figures_root: str | Path) -> dict:
    """:data:`REAL_DATA_SETS` as ``{name: figures_root/real_quality/<folder>}``."""
    return {k: Path(figures_root) / "real_quality" / v for k, v in REAL_DATA_SETS.items()}


def real_data_block(folders: dict) -> str:
    """The README's short table of real data: per data set (``{name: folder}``, each holding what
    ``benchmarks/real_quality.py`` wrote), the rows of :data:`REAL_DATA_ROWS`, the classifier's
    out-of-fold ROC-AUC beside them; read, not recomputed."""
    out, missing = [], []
    for name, folder in folders.items():
        table, run = Path(folder) / "real_quality.csv", Path(folder) / "real_quality.json"
        if not table.is_file():
            missing.append(f"_{name}: not measured yet (`{table.name}` is missing)._")
            continue
        df = pd.read_csv(table)
        made = read_json(run) if run.is_file() else {}
        auc = made.get("auc")
        for start, label in REAL_DATA_ROWS.items():
            hit = df[df["masks"].astype(str).str.startswith(start)]
            if not len(hit):
                continue
            r = hit.iloc[0]
            free = r.get(DEFECT_FREE, float("nan"))
            out.append({"data": name, "masks": label,
                        "Dice (defective images)": f"{r['Dice (defective images)']:.3f}",
                        "Dice (non-empty masks)": f"{r['Dice (non-empty masks)']:.3f}",
                        **{c: f"{r[c]:.0%}" for c in REAL_DATA_SHARES},
                        DEFECT_FREE: "no such images" if pd.isna(free) else f"{free:.0%}",
                        "classifier ROC-AUC": (", ".join(f"{a:.3f}" for a in auc) if auc
                                               else "n/a")})
    parts = [markdown_table(pd.DataFrame(out))] if out else []
    return "\n\n".join(parts + missing)


def per_class_table(rep, class_names) -> pd.DataFrame:
    s = rep.summary()
    return pd.DataFrame([{"class": c, "Dice (defective images)": s[f"class {c} (defective images)"],
                          "Dice (non-empty masks)": s[f"class {c} (non-empty masks)"],
                          "non-empty masks": int(rep.true_nonempty[:, k].sum())}
                         for k, c in enumerate(class_names)])
