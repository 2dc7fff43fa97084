"""Execute the notebooks in order with papermill: ``cam2mask reproduce``.

Every notebook ``notebooks/NN_name.ipynb`` has a cell tagged ``parameters``; the runner injects
``profile``, ``data_dir``, ``seed``, ``figures_dir`` and ``artifacts_dir`` (plus any ``--set``
values). For the default profile the executed notebooks replace the ones in ``notebooks/`` (so
they render with outputs on GitHub); for other profiles they go to ``artifacts/<profile>/notebooks``.
A notebook is executed into a temporary file and moved into place only when it succeeds, so a
failure never clobbers the last good copy: the failed copy is kept under
``artifacts/<profile>/failed/`` and the error names the notebook and the cell.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import nbformat
import papermill as pm
from papermill.exceptions import PapermillExecutionError
from tqdm import tqdm

from .profiles import artifacts_dir, figures_dir, get_profile
from .utils import UserError, read_json, repo_root, write_json

DEFAULT_PROFILE = "cpu"


class ReproduceError(UserError, RuntimeError):
    """A notebook failed; the message names it, the cell and the error."""


@dataclass
class NotebookRun:
    name: str
    output: Path
    seconds: float


def list_notebooks(folder: str | Path | None = None, only: Iterable[str] | None = None) -> list[Path]:
    """``NN_*.ipynb`` notebooks of ``folder`` in order; ``only`` keeps those whose number (``00``)
    or name (``00_data_eda``) is listed, and rejects a selector that matches nothing."""
    folder = Path(folder) if folder else repo_root() / "notebooks"
    books = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not books:
        raise ReproduceError(f"no NN_*.ipynb notebooks in {folder}")
    if only:
        keep = []
        for sel in only:
            sel = str(sel).strip().removesuffix(".ipynb")
            hit = [p for p in books if p.stem == sel or p.stem.split("_", 1)[0] == sel.zfill(2)]
            if not hit:
                raise ReproduceError(f"--only {sel!r} matches no notebook; have "
                                     f"{[p.stem for p in books]}")
            keep += [p for p in hit if p not in keep]
        books = sorted(keep)
    return books


def _strip_volatile(path: Path, final: Path) -> None:
    """Drop timestamps and temp paths papermill records, so re-running gives small diffs."""
    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get("papermill", {})
    for k in ("start_time", "end_time", "duration", "input_path", "environment_variables"):
        meta.pop(k, None)
    meta["output_path"] = final.name
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        pm = cell.metadata.get("papermill", {})
        for k in ("start_time", "end_time", "duration"):
            pm.pop(k, None)
    nbformat.write(nb, path)


def run_notebook(nb: Path, out: Path, parameters: dict, failed_dir: Path,
                 kernel_name: str | None = None, progress: bool = True) -> float:
    """Execute one notebook into ``out`` (atomically); returns its wall time in seconds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.running.ipynb")
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(nb), str(tmp), parameters=parameters, cwd=str(nb.parent),
                            kernel_name=kernel_name, progress_bar=progress, log_output=False)
    except PapermillExecutionError as e:
        failed_dir.mkdir(parents=True, exist_ok=True)
        keep = failed_dir / nb.name
        if tmp.exists():
            os.replace(tmp, keep)
        src = (e.source or "").strip().splitlines()
        first = src[0] if src else ""
        raise ReproduceError(
            f"{nb.name} failed in cell {e.cell_index} (execution count {e.exec_count}: "
            f"{first!r}): {e.ename}: {e.evalue}\nexecuted copy with the traceback: {keep}"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _strip_volatile(tmp, out)
    os.replace(tmp, out)
    return time.perf_counter() - t0


def reproduce(profile: str = DEFAULT_PROFILE, only: Iterable[str] | None = None,
              data_dir: str | None = None, notebooks_dir: str | Path | None = None,
              output_dir: str | Path | None = None, figures: str | Path | None = None,
              artifacts: str | Path | None = None, extra: dict | None = None,
              kernel_name: str | None = None, progress: bool = True,
              overrides: dict | None = None) -> list[NotebookRun]:
    """Execute the notebooks in order in ``profile``; stop at the first failure. ``overrides``:
    profile fields (dotted names, see :func:`profiles.get_profile`), checked before any notebook
    runs and passed to every notebook."""
    prof = get_profile(profile, **(overrides or {}))
    books = list_notebooks(notebooks_dir, only)
    existing = {nb.stem for nb in list_notebooks(notebooks_dir, None)}
    art = artifacts_dir(prof, artifacts).resolve()
    figs = figures_dir(prof, figures).resolve()
    if output_dir is None:
        output_dir = (Path(notebooks_dir or repo_root() / "notebooks") if prof.name == DEFAULT_PROFILE
                      else art / "notebooks")
    output_dir = Path(output_dir).resolve()
    # folders are passed only when they are not the profile's defaults, which every notebook
    # resolves itself: the committed notebooks then carry no absolute path of the machine
    # that executed them
    params = {"profile": prof.name, "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
              "seed": prof.seed,
              "figures_dir": None if figs == figures_dir(prof).resolve() else str(figs),
              "artifacts_dir": None if art == artifacts_dir(prof).resolve() else str(art),
              "overrides": dict(overrides or {})}
    params.update(extra or {})
    runs: list[NotebookRun] = []
    timings_path = art / "timings.json"
    bar = tqdm(books, desc=f"reproduce [{prof.name}]", unit="notebook", disable=not progress)
    for nb in bar:
        bar.set_postfix_str(nb.stem)
        out = output_dir / nb.name
        secs = run_notebook(nb.resolve(), out, params, art / "failed", kernel_name=kernel_name,
                            progress=progress)
        runs.append(NotebookRun(nb.stem, out, secs))
        bar.write(f"  {nb.stem}: {secs:.1f} s -> {out}")
        # wall seconds per notebook, latest run of each, written as each one finishes so that
        # the report notebook sees the times of the notebooks before it in the same run
        timings = read_json(timings_path) if timings_path.is_file() else {}
        timings = {k: v for k, v in timings.items() if k in existing}  # no renamed notebook's
        timings[nb.stem] = round(secs, 2)
        write_json(timings_path, timings)
    return runs
