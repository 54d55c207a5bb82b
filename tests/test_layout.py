"""Dependencies point one way: cli -> node -> (wire, cipherdb) <- relay, keyvault at the bottom.

Read from the source of every module (imports inside functions included), so a new import
that climbs the wrong way fails here rather than in a review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("keyvault", "wire", "cipherdb", "relay", "node", "cli")
# What each package may import of the project (besides itself).
ALLOWED: dict[str, set[str]] = {
    "keyvault": set(),
    "wire": set(),
    "cipherdb": set(),
    "relay": {"keyvault", "wire", "cipherdb"},
    "node": {"keyvault", "wire", "cipherdb"},
    "cli": {"keyvault", "wire", "node", "relay"},
}


def _project_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for item in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(item, ast.Import):
            names = [alias.name for alias in item.names]
        elif isinstance(item, ast.ImportFrom) and item.level == 0 and item.module:
            names = [item.module]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in PROJECT)
    return found


@pytest.mark.parametrize("package", PROJECT)
def test_imports_point_one_way(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        wrong = _project_imports(path) - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_the_client_library_does_not_need_the_server() -> None:
    for path in sorted((ROOT / "node").rglob("*.py")):
        assert "relay" not in _project_imports(path), path


def test_every_package_is_installed_and_type_checked() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    script = (ROOT / "scripts" / "test").read_text()
    for package in PROJECT:
        assert f'"{package}"' in pyproject, f"{package} is not in [tool.setuptools] packages"
        assert f" {package}" in script.split("step mypy", 1)[1].splitlines()[0]
