"""What `pip install .` ships: every folder of Python code under bnao/ must be a package that setup.py's
``find_packages`` finds (a folder without ``__init__.py`` is skipped there, while an editable install still
imports it as a namespace package, so only a real install would show the gap)."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_every_code_folder_is_a_package_that_setup_finds():
    found = set(find_packages(where=str(ROOT), include=["bnao", "bnao.*"]))
    folders = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "bnao").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert folders - found == set(), f"folders with Python code that a non-editable install would leave out: {folders - found}"
    assert {"bnao.search", "bnao.rank", "bnao.supernet", "bnao.ops.fused"} <= found
