"""The code base is lint-clean (ruff, configured in pyproject.toml), so CI's `pytest -q` runs the linter too."""
import shutil
import subprocess
import sys

from conftest import REPO


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or [sys.executable, "-m", "ruff"]
    command = [ruff] if isinstance(ruff, str) else ruff
    result = subprocess.run([*command, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_imports_without_path_edits():
    """Kernels and tests import the installed package (pip install -e .), never through sys.path edits."""
    offenders = [str(p.relative_to(REPO)) for folder in ("kernels", "benchmarks", "tests", "src")
                 for p in (REPO / folder).rglob("*.py") if "sys.path.insert" in p.read_text()
                 and p.name != "test_lint.py"]
    assert offenders == []
