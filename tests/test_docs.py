"""The study site builds with `mkdocs build --strict`: a broken link, a nav entry without a page, a
docstring mkdocstrings cannot render, or a notebook mkdocs-jupyter cannot convert fails the build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_mkdocs_build_strict(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"  # the venv's mkdocs, next to its python
    assert mkdocs.exists(), f"mkdocs is not installed next to {sys.executable}"
    site = tmp_path / "site"
    out = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for page in (
        "index.html",
        "m0_config/index.html",
        "interview/m0_config/index.html",
        "benchmarks/index.html",
    ):
        assert (site / page).is_file(), page
    notebook = site / "notebooks" / "m0_config" / "index.html"
    assert notebook.is_file() and "from m0_config" in notebook.read_text(encoding="utf-8")
    api = (site / "api" / "m0_config" / "index.html").read_text(encoding="utf-8")
    assert "EngineConfig" in api and "from_llm_kwargs" in api  # mkdocstrings rendered the module
