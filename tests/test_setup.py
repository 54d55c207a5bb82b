"""The setup a newcomer relies on: every script the docs name exists and answers, and the
environment is installed from the lock, which matches pyproject.toml."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HELP_DEADLINE = 60  # seconds; `--help` must answer, not hang
UV = ROOT / ".uv" / "bin" / "uv"


def _tracked() -> set[str]:
    out = subprocess.run(
        ["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return {line.split("\t", 1)[1] for line in out.splitlines()}


def _mode(path: str) -> str:
    out = subprocess.run(
        ["git", "ls-files", "-s", "--", path], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return out.split()[0]


def _named_scripts() -> list[str]:
    names: set[str] = set()
    for doc in DOCS:
        for match in re.finditer(r"(?<![\w/.])(scripts/[A-Za-z0-9_.-]+|\.ci/run)\b", doc.read_text()):
            name = match.group(1).rstrip(".")
            if not (ROOT / name).is_dir():
                names.add(name)
    return sorted(names)


def test_the_docs_name_the_main_scripts() -> None:
    named = _named_scripts()
    for script in ("scripts/demo", "scripts/test", "scripts/bench", "scripts/lock", "scripts/tornet"):
        assert script in named


@pytest.mark.parametrize("script", _named_scripts())
def test_every_script_the_docs_name_is_tracked_and_executable(script: str) -> None:
    assert script in _tracked(), f"{script} is named in the docs but not committed"
    if script.endswith((".py", ".sh", ".txt")):
        return  # a module or a file that a command reads, not a command
    assert _mode(script) == "100755", f"{script} is committed without its executable bit"
    assert os.access(ROOT / script, os.X_OK)


@pytest.mark.parametrize(
    "script", [s for s in _named_scripts() if not s.endswith((".py", ".sh", ".txt")) and s != ".ci/run"]
)
def test_every_script_answers_help(script: str) -> None:
    done = subprocess.run(
        [str(ROOT / script), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HELP_DEADLINE,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), f"{script} --help printed nothing"
    assert "Traceback" not in done.stdout + done.stderr


def _lock() -> dict[str, object]:
    with open(ROOT / "uv.lock", "rb") as f:
        return tomllib.load(f)


def _locked_versions() -> dict[str, str]:
    packages = _lock()["package"]
    assert isinstance(packages, list)
    return {p["name"]: p["version"] for p in packages if "version" in p and p["name"] != "veil"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_environment_is_installed_from_the_lock() -> None:
    """Every package in this environment that the lock names has exactly the locked version."""
    locked = _locked_versions()
    installed = {_canon(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    checked = 0
    for name, version in locked.items():
        if _canon(name) in installed:
            assert installed[_canon(name)] == version, f"{name}: installed {installed[_canon(name)]}, locked {version}"
            checked += 1
    for needed in ("msgspec", "trio", "cryptography", "pytest", "mypy", "stem", "prompt-toolkit"):
        assert _canon(needed) in installed and needed in locked
    assert checked >= 30


def test_every_lock_entry_has_hashes() -> None:
    packages = _lock()["package"]
    assert isinstance(packages, list)
    for p in packages:
        if p["name"] == "veil":
            continue
        files = list(p.get("wheels", [])) + ([p["sdist"]] if "sdist" in p else [])
        assert files, p["name"]
        assert all(str(f.get("hash", "")).startswith("sha256:") for f in files), p["name"]


def test_the_bootstrap_uv_is_pinned_with_hashes() -> None:
    text = (ROOT / "scripts" / "uv-requirements.txt").read_text()
    match = re.search(r"^uv==(\S+)", text, re.M)
    assert match, "scripts/uv-requirements.txt pins no uv version"
    assert len(re.findall(r"--hash=sha256:[0-9a-f]{64}", text)) >= 5
    if UV.exists():
        out = subprocess.run([str(UV), "--version"], capture_output=True, text=True, check=True).stdout
        assert out.split()[1] == match.group(1)


needs_uv = pytest.mark.skipif(not UV.exists(), reason="uv is not installed in .uv/ (scripts/test installs it)")


def _uv_lock_check(project: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    env["UV_PYTHON_DOWNLOADS"] = "never"
    return subprocess.run(
        [str(UV), "lock", "--check", "--offline", "--python", sys.executable],
        cwd=project, capture_output=True, text=True, timeout=120, env=env,
    )


@needs_uv
def test_the_lock_matches_pyproject() -> None:
    done = _uv_lock_check(ROOT)
    assert done.returncode == 0, done.stderr


@needs_uv
def test_a_pyproject_that_disagrees_with_the_lock_fails_the_check(tmp_path: Path) -> None:
    """The check above is not vacuous: change one requirement and the same check fails."""
    shutil.copy(ROOT / "uv.lock", tmp_path / "uv.lock")
    text = (ROOT / "pyproject.toml").read_text()
    changed = re.sub(r'"msgspec>=[^"]+"', '"msgspec>=0.20"', text)
    assert changed != text
    (tmp_path / "pyproject.toml").write_text(changed)
    (tmp_path / "README.md").write_text("readme\n")
    done = _uv_lock_check(tmp_path)
    assert done.returncode != 0
    # With the package index in uv's cache it says so; with an empty cache (a fresh
    # machine) it tries to resolve the changed requirement offline, and cannot: uv only
    # resolves when pyproject.toml and the lock disagree, so either way the check caught it.
    assert "needs to be updated" in done.stderr or "No solution found" in done.stderr, done.stderr
