"""Every wrapper's ``DRY_RUN=1`` output equals the one recorded from the bash protocol scripts.

``tests/golden/dry_run.json`` holds the commands that the scripts printed before the protocol logic moved
into the Python planner (``tools.planner``), for every ``scripts/<trainer>/<protocol>.sh`` and for
``scripts/protocols/fewshot.sh``, on real datasets (defaults), on ToyRS with every option that changes a
command, and with a finished run in place. Paths are written with ``{PYTHON}`` and ``{TMP}`` placeholders.
Changed on purpose since the recording: BiMoRS on ToyRS alone captions with the toy captioner and encoder
(``bimors-*-toy``; tools.planner.TOY_CAPTION_MODELS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

GOLDEN = Path(__file__).with_name("golden") / "dry_run.json"
CLEARED = (
    "TRAINER", "CFG", "DATA", "OUTPUT", "PYTHON", "SHOTS", "BACKBONE", "OPTS", "LOAD_EPOCH", "EVAL_ONLY",
    "PRE_STEP", "DRY_RUN", "SOURCE", "TARGETS", "CAPTIONER", "CAPTION_ENCODER", "FORCE",
)  # fmt: skip
WRAPPERS = ("zsclip", "coop", "cocoop", "maple", "kgcoop", "promptsrc", "applenet", "clip_adapter", "bimors")
PROTOCOLS = ("base2new", "crossdata", "domaingen")
TOY = {"BACKBONE": "toy", "SHOTS": "4", "OPTS": "TRAIN.PRINT_FREQ 1", "DATA": None}


def _cases() -> dict[str, tuple[str, list[str], dict[str, str | None], str | None]]:
    """name -> (script relative to scripts/, arguments, environment, finished run folder relative to OUTPUT)."""
    cases = {}
    for folder in WRAPPERS:
        for protocol in PROTOCOLS:
            script = f"{folder}/{protocol}.sh"
            real = ["patternnet", "1", "2"] if protocol == "base2new" else ["1", "2"]
            cases[f"{folder}-{protocol}-real"] = (script, real, {}, None)
            toy_args = ["toyrs", "3"] if protocol == "base2new" else ["3"]
            toy_env = dict(TOY) if protocol == "base2new" else dict(TOY, SOURCE="toyrs", TARGETS="toyrs")
            cases[f"{folder}-{protocol}-toy"] = (script, [*toy_args, "--", "OPTIM.LR", "0.1"], toy_env, None)
    cases["coop-base2new-load-epoch-pre-step"] = (
        "coop/base2new.sh", ["rsicd", "1", "--", "OPTIM.MAX_EPOCH", "4"],
        {"LOAD_EPOCH": "2", "PRE_STEP": "echo pre --x"}, None,
    )  # fmt: skip
    cases["maple-crossdata-targets"] = ("maple/crossdata.sh", ["2"], {"SOURCE": "rsicd", "TARGETS": "aid ucmerced"},
                                        None)  # fmt: skip
    cases["coop-base2new-finished"] = (
        "coop/base2new.sh", ["patternnet", "1", "2"], {},
        "base2new/train_base/patternnet/shots_16/CoOp/vit_b16_ep50_ctxv1/seed1",
    )  # fmt: skip
    cases["bimors-base2new-smoke"] = ("bimors/base2new.sh", [], {"DATA": None}, None)
    cases["bimors-base2new-captioner"] = ("bimors/base2new.sh", ["rsicd", "1"],
                                          {"CAPTIONER": "toy-blip2", "CAPTION_ENCODER": "toy-bert"}, None)  # fmt: skip
    for protocol in PROTOCOLS:
        cases[f"protocols-{protocol}"] = (f"protocols/{protocol}.sh", ["toyrs", "2"] if protocol == "base2new" else ["2"],
                                          {"TRAINER": "MaPLe", "CFG": "vit_b16_c2_ep5_batch4_2ctx", "SOURCE": "toyrs",
                                           "TARGETS": "toyrs"}, None)  # fmt: skip
    cases["fewshot-real"] = ("protocols/fewshot.sh", ["rsicd", "1"], {"TRAINER": "CoOp", "CFG": "vit_b16_ep50_ctxv1"},
                             None)  # fmt: skip
    cases["fewshot-toy"] = (
        "protocols/fewshot.sh", ["toyrs", "1", "2"],
        {"TRAINER": "CoCoOp", "CFG": "vit_b16_c4_ep10_batch1_ctxv1", "SHOTS": "2 1", "PRE_STEP": "echo pre",
         "DATA": None, "BACKBONE": "ViT-B/32"}, None,
    )  # fmt: skip
    return cases


CASES = _cases()


def dry_run_output(name: str, tmp_path: Path) -> str:
    """The commands printed by case ``name``, with the interpreter and ``tmp_path`` as placeholders."""
    script, args, env, finished = CASES[name]
    base = {k: v for k, v in os.environ.items() if k not in CLEARED}
    base.update(PYTHON=sys.executable, OUTPUT=str(tmp_path / "out"), DATA=str(tmp_path / "data"), DRY_RUN="1")
    base.update(env)
    if finished:
        (tmp_path / "out" / finished).mkdir(parents=True)
        (tmp_path / "out" / finished / "results.json").write_text("{}")
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / script), *args], env={k: v for k, v in base.items() if v is not None},
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.replace(sys.executable, "{PYTHON}").replace(str(tmp_path), "{TMP}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_dry_run_equals_recorded_commands(name, tmp_path):
    expected = json.loads(GOLDEN.read_text())[name]
    assert dry_run_output(name, tmp_path).splitlines() == expected


def test_every_wrapper_has_a_recorded_case():
    wrappers = {
        p.relative_to(REPO_ROOT / "scripts").as_posix()
        for p in (REPO_ROOT / "scripts").glob("*/*.sh")
        if p.stem in (*PROTOCOLS, "fewshot")
    }
    recorded = {script for script, *_ in CASES.values()}
    assert wrappers - recorded == set()
    assert set(json.loads(GOLDEN.read_text())) == set(CASES)
