"""The layering of docs/design.md section 2: imports go one way, and models/ stays pure PyTorch."""

from __future__ import annotations

import ast

import pytest
from conftest import REPO_ROOT

PROJECT = {"common", "models", "datasets", "trainers", "tools", "train"}
# package -> what its modules may import (project packages, and whether Dassl is allowed)
ALLOWED = {
    "common": ({"common"}, False),  # its modules may use each other (io.py raises common.errors' base class)
    "models": ({"common", "models"}, False),
    "datasets": ({"common", "datasets"}, False),
    "trainers": ({"common", "models", "datasets", "trainers"}, True),
}  # tools/ and train.py sit on top: they may import any of these
DASSL_ADAPTERS = {"datasets/remote_sensing.py"}  # the one Dassl module of datasets/


def imported_roots(path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth (function-level imports included)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_one_way(package):
    allowed, dassl_ok = ALLOWED[package]
    wrong = {}
    for path in sorted((REPO_ROOT / package).glob("*.py")):
        rel = str(path.relative_to(REPO_ROOT))
        roots = imported_roots(path)
        bad = (roots & PROJECT) - allowed
        if "dassl" in roots and not (dassl_ok or rel in DASSL_ADAPTERS):
            bad.add("dassl")
        if bad:
            wrong[rel] = sorted(bad)
    assert not wrong, f"imports against the layering: {wrong}"


def test_the_rule_sees_a_violation(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from datasets.captions import TOY_ENCODER\n    import dassl.engine\n")
    assert imported_roots(module) == {"os", "datasets", "dassl"}
