"""Small shared helpers: atomic writes, stable hashing, repository paths."""
from __future__ import annotations

import hashlib
import json
import os
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


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def stable_hash(obj: Any, n: int = 12) -> str:
    """Short hash of a JSON-serialisable object, independent of dict order: keys for caches."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:n]


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
