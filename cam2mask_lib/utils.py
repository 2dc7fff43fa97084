"""Small shared helpers: atomic writes, stable hashing, repository paths."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader never sees a half-written file and an interrupted write leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON, readable by any parser: an undefined number (a ROC-AUC without positives, a
    Dice without non-empty masks) is written as null, not as Python's non-standard NaN."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def stable_hash(obj: Any, n: int = 12) -> str:
    """Short hash of a JSON-serialisable object, independent of dict order: keys for caches."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:n]


def config_key(cfg: Any, skip: tuple[str, ...] = ()) -> dict:
    """What a configuration's results depend on, by one rule for every cache key: each field of
    the dataclass ``cfg`` that is not in ``skip`` (where and how fast the work runs, not what it
    makes) and differs from its default. A field added later at its default leaves the keys, and
    so the caches, made before it as they were."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in skip:
            continue
        value = getattr(cfg, f.name)
        default = (f.default if f.default is not dataclasses.MISSING else f.default_factory()
                   if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if value != default:
            out[f.name] = (config_key(value) if dataclasses.is_dataclass(value)
                           else list(value) if isinstance(value, tuple) else value)
    return out


def file_digest(path: str | os.PathLike, n: int = 16) -> str:
    """sha256 of a file's bytes (first ``n`` hex digits): a cache key that notices a file
    replaced at the same path."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:n]


def check_weights_file(path: str | os.PathLike | None, option: str) -> None:
    """A local weights file named by ``option`` must exist (checked before any work starts)."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{option}={str(path)!r}: no such file; expected a local weights file "
                          f"(a state dict saved with torch.save, or .safetensors)")


def describe_weights(pretrained: bool, weights_path: str | os.PathLike | None, hub: str) -> str:
    """How an encoder starts, for tables: a local file (name and digest), ``hub``'s ImageNet
    weights, or random initialisation."""
    if weights_path is not None:
        p = Path(weights_path)
        digest = file_digest(p) if p.is_file() else "missing"
        return f"ImageNet weights from {p.name} (sha256 {digest[:8]})"
    return f"ImageNet weights ({hub})" if pretrained else "RANDOM initialisation"


def display_path(path: str | os.PathLike) -> str:
    """A path as printed in notebooks and reports: relative to the repository when inside it
    (executed notebooks then carry no machine's absolute paths), else as given."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(repo_root()))
    except ValueError:
        return str(p)


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The cam2mask checkout containing ``start`` (default: the working directory), found by
    walking up to a folder holding both ``pyproject.toml`` and ``cam2mask_lib/``. Falls back to the
    folder above this package (editable installs), then to the working directory."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() and (d / "cam2mask_lib").is_dir():
            return d
    pkg_parent = Path(__file__).resolve().parent.parent
    if (pkg_parent / "pyproject.toml").is_file():
        return pkg_parent
    return here


def dev_data() -> Path:
    """The real development set the benchmarks read by default: NEU-Seg dev beside the checkout
    (``../shared/data/neu_seg_dev``); not part of the project, and absent on most machines."""
    return repo_root().parent / "shared" / "data" / "neu_seg_dev"


class UserError(Exception):
    """Something the user gave cannot work (data, a setting, an existing output). The command
    line reports these as a one-line message naming the file or option; any other exception is a
    bug and keeps its traceback."""


class ConfigError(UserError, ValueError):
    """A setting or option that cannot work: an unknown name, a value out of range."""


def chunks(rows, size: int):
    """Consecutive slices of ``rows`` of ``size`` (the last one shorter)."""
    return (rows[s:s + size] for s in range(0, len(rows), size))


def bars(progress) -> bool:
    """Progress bars only on a terminal: ``progress`` is True, False or ``"lines"``."""
    return progress is True and sys.stderr.isatty()


def say(progress, message: str) -> None:
    """One plain progress line (stage, fold, epoch) where no bar is drawn but progress is wanted:
    ``progress="lines"`` (``--no-progress``), or True without a terminal (CI, a batch queue, a
    log file)."""
    if progress == "lines" or (progress is True and not sys.stderr.isatty()):
        print(message, file=sys.stderr, flush=True)
