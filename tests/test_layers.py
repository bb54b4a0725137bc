"""The import layers of pyproject.toml's import-linter contracts hold, and a wrong import breaks them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def copy_of_tree(tmp_path):
    for pkg in ("trainables", "analysis", "sweeper"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[test]')")
def test_the_layers_hold_and_a_reaching_up_import_breaks_them(copy_of_tree):
    ok = _lint(copy_of_tree)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the trial layer reaching up into the orchestrator: exactly what the contracts forbid
    (copy_of_tree / "trainables" / "scratch.py").write_text("from sweeper import orchestrate  # noqa\n")
    bad = _lint(copy_of_tree)
    assert bad.returncode != 0 and "BROKEN" in bad.stdout, bad.stdout


@pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[test]')")
def test_a_cycle_inside_a_package_breaks_the_contracts(copy_of_tree):
    (copy_of_tree / "analysis" / "pareto_cycle.py").write_text("from . import report  # noqa\n")
    text = (copy_of_tree / "analysis" / "report.py").read_text()
    (copy_of_tree / "analysis" / "report.py").write_text("from . import pareto_cycle  # noqa\n" + text)
    bad = _lint(copy_of_tree)
    assert bad.returncode != 0 and "No cycles are allowed in analysis" in bad.stdout, bad.stdout
