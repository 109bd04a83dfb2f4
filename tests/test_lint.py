"""ruff (pyflakes, pycodestyle errors, bugbear, import order, at most 8 arguments per function) over the package,
the tests, the benchmarks and the examples, as configured in pyproject.toml; part of the suite so that the README's
test command and CI run it."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    assert Path(ruff).exists(), "ruff is missing: install the test extra (pip install -e '.[test]')"
    result = subprocess.run([ruff, "check", "--no-cache", "mova_export", "tests", "benchmarks", "examples", "cli.py"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
