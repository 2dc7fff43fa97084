import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.split(r"[<>=!~\[; ]", name.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(d) for d in meta["dependencies"]} | {_norm(d) for d in meta["optional-dependencies"]["test"]}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "- pip:")
    pip = [l.strip()[2:] for l in lines[start + 1:] if l.strip().startswith("- ")]
    assert "-e ." in pip, "environment.yml must install the package itself"
    assert {_norm(p) for p in pip if p != "-e ."} == wanted


def test_torch_is_not_pinned_to_the_local_wheel():
    # torch==2.13.0 would take the local CPU wheel that the registry's torchvision cannot load
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = [l.strip()[2:] for l in (ROOT / "environment.yml").read_text().splitlines()
           if l.strip().startswith("- ")]
    for dep in meta["dependencies"] + env:
        if _norm(dep) in ("torch", "torchvision"):
            assert "==" not in dep, dep


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
