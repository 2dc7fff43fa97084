import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.split(r"[<>=!~\[; ]", name.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _locked() -> dict[str, str]:
    """requirements.lock: package -> pinned version (every pin carries at least one hash)."""
    text = (ROOT / "requirements.lock").read_text()
    pins = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^\s\\;]+)", block)
        if m:
            assert "--hash=sha256:" in block, f"{m.group(1)} is pinned without a hash"
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def test_every_dependency_is_locked_with_a_hash_and_environment_yml_uses_the_lock():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(d) for d in meta["dependencies"]} | {_norm(d) for d in meta["optional-dependencies"]["test"]}
    pins = _locked()
    assert wanted <= set(pins), sorted(wanted - set(pins))
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "- pip:")
    pip = [l.strip()[2:] for l in lines[start + 1:] if l.strip().startswith("- ")]
    assert pip == ["-r requirements.lock"], pip
    make = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r requirements.lock" in make and "--no-deps -e ." in make


def test_torch_and_torchvision_are_locked_together_not_to_the_local_wheel():
    # torch==2.13.0 would take the local CPU wheel that the registry's torchvision cannot load
    pins = _locked()
    assert pins["torch"] != "2.13.0" and "+cpu" not in pins["torch"]
    assert "torchvision" in pins


def test_the_installed_packages_are_the_locked_ones():
    """The environment running the tests is the lock's (so the tables it makes are comparable)."""
    from importlib import metadata

    pins = _locked()
    for name in ("torch", "timm", "segmentation-models-pytorch", "grad-cam", "numpy"):
        assert metadata.version(name) == pins[name], name


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme)
    assert m, "README must show the test command after <!-- test-command -->"
    command = m.group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert any(line.strip() == command for line in ci.splitlines()), (command, ci)


def test_console_script_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["scripts"]["cam2mask"] == "cam2mask_lib.cli:main"
