"""train.py's command line: --help shows the suite's flags, trainers and configs, without Dassl or torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT, requires_dassl

import train
from tools.planner import trainer_catalogue

HELP_WITHOUT_HEAVY_IMPORTS = """
import builtins, sys
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] in ("dassl", "torch", "clip", "yacs"):
        raise ImportError("--help must not import " + name)
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
sys.path.insert(0, sys.argv[1])
import train
train.main(["--help"])
"""


@pytest.fixture(scope="module")
def help_text() -> str:
    proc = subprocess.run([sys.executable, "-c", HELP_WITHOUT_HEAVY_IMPORTS, str(REPO_ROOT)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_needs_neither_dassl_nor_torch_and_lists_the_suite(help_text):
    for flag in ("--trainer", "--config-file", "--dataset-config-file", "--root", "--seed", "--output-dir",
                 "--eval-only", "--model-dir", "--load-epoch", "--resume", "--backbone"):  # fmt: skip
        assert flag in help_text
    for hidden in ("--source-domains", "--target-domains", "--transforms", "--head"):
        assert hidden not in help_text
    for name in ("BiMoRS", "CoOp", "CoCoOp", "MaPLe", "ZeroshotCLIP", "ZeroshotCLIPEnsemble"):
        assert f"\n  {name} " in help_text
    assert "vit_b16_c4_ep10_batch4_ctxv1_compat" in help_text and "configs/trainers/" in help_text
    assert "patternnet" in help_text and "configs/datasets/" in help_text


def test_coop_flags_are_still_accepted():
    args = train.build_parser().parse_args(
        ["--source-domains", "a", "b", "--head", "h", "--transforms", "flip", "--trainer", "CoOp", "OPTIM.LR", "0.1"]
    )
    assert args.source_domains == ["a", "b"] and args.head == "h" and args.transforms == ["flip"]
    assert args.trainer == "CoOp" and args.opts == ["OPTIM.LR", "0.1"]


def test_an_inherited_trainer_without_configs_points_at_its_parents():
    assert trainer_catalogue()["ZeroshotCLIPEnsemble"][1] == "ZeroshotCLIP"
    lines = train._catalogue_help().splitlines()
    row = next(i for i, line in enumerate(lines) if line.split()[:1] == ["ZeroshotCLIPEnsemble"])
    assert lines[row + 1].split()[:2] == ["ZeroshotCLIP/:", "rn50,"]


@requires_dassl
def test_trainers_read_from_the_source_are_exactly_the_registered_ones():
    from dassl.engine import TRAINER_REGISTRY

    import trainers  # noqa: F401  (registers every trainer module)

    ours = {n for n in TRAINER_REGISTRY.registered_names() if TRAINER_REGISTRY.get(n).__module__.startswith("trainers.")}
    assert ours == set(trainer_catalogue())
    for name, (doc, _) in trainer_catalogue().items():
        assert doc == (TRAINER_REGISTRY.get(name).__doc__ or "").strip().split("\n")[0]
