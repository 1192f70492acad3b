"""BiMoRS protocol wrappers: the caption pre-step, the embedded offline default, and an end-to-end run."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, requires_dassl

SCRIPT = REPO_ROOT / "scripts" / "bimors" / "base2new.sh"
CLEARED = ("DATA", "BACKBONE", "CAPTIONER", "CAPTION_ENCODER", "OPTS", "PRE_STEP", "SHOTS", "CFG", "DRY_RUN")


def run(tmp_path, *args, timeout=900, **env):  # a guard against hangs only
    base = {k: v for k, v in os.environ.items() if k not in CLEARED}
    base.update(PYTHON=sys.executable, OUTPUT=str(tmp_path / "out"), **env)
    return subprocess.run(["bash", str(SCRIPT), *args], env=base, cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)


def test_embedded_default_is_an_offline_toyrs_smoke_run(tmp_path):
    proc = run(tmp_path, DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert "SMOKE RUN" in proc.stderr and "RANDOM" in proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    captions = [c for c in lines if c[1:3] == ["-m", "tools.captions"]]
    assert len(captions) == 1
    assert captions[0][captions[0].index("--captioner") + 1] == "toy-blip2"
    assert captions[0][captions[0].index("--encoder") + 1] == "toy-bert" and "toyrs" in captions[0]
    trains = [c for c in lines if "train.py" in c]
    assert len(trains) == 6  # seeds 1 2 3, train on base + test on new
    for cmd in trains:
        opts = {k: v for k, v in zip(cmd, cmd[1:]) if re.fullmatch(r"[A-Z_]+(\.[A-Z0-9_]+)+", k)}
        assert cmd[cmd.index("--trainer") + 1] == "BiMoRS"
        assert cmd[cmd.index("--dataset-config-file") + 1].endswith("toyrs.yaml")
        assert opts["MODEL.BACKBONE.NAME"] == "toy" and opts["TRAINER.BIMORS.CAPTIONER"] == "toy-blip2"
        assert opts["TRAINER.BIMORS.CAPTION_ENCODER"] == "toy-bert" and opts["DATASET.NUM_SHOTS"] == "16"
    # captions are computed before any training
    assert lines.index(captions[0]) < lines.index(trains[0])


def test_real_dataset_uses_published_captioner(tmp_path):
    proc = run(tmp_path, "patternnet", "1", DRY_RUN="1", DATA=str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stderr
    assert "SMOKE RUN" not in proc.stderr
    out = proc.stdout
    assert "--captioner Salesforce/blip2-flan-t5-xl --encoder bert-base-uncased patternnet" in out
    assert "TRAINER.BIMORS.CAPTIONER Salesforce/blip2-flan-t5-xl" in out and "MODEL.BACKBONE.NAME" not in out


def test_real_dataset_needs_data(tmp_path):
    proc = run(tmp_path, "patternnet", DRY_RUN="1")
    assert proc.returncode != 0 and "DATA" in proc.stderr


@requires_dassl
@pytest.mark.slow
def test_bimors_base2new_end_to_end_on_toyrs(tmp_path):
    """One seed, one epoch: captions computed, train on base, test on new, table printed."""
    proc = run(tmp_path, "toyrs", "1", "--", "OPTIM.MAX_EPOCH", "1", "DATALOADER.NUM_WORKERS", "0",
               "DATALOADER.TEST.BATCH_SIZE", "72", timeout=1800, DATA=str(tmp_path / "data"), BACKBONE="toy",
               CAPTIONER="toy-blip2", CAPTION_ENCODER="toy-bert", SHOTS="2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = "shots_2/BiMoRS/vit_b16_c4_ep10_batch4_ctxv1_toy/seed1"
    base = json.loads((tmp_path / "out/base2new/train_base/toyrs" / run_dir / "results.json").read_text())
    new = json.loads((tmp_path / "out/base2new/test_new/toyrs" / run_dir / "results.json").read_text())
    assert (base["subsample"], new["subsample"]) == ("base", "new")
    assert base["trainer"] == new["trainer"] == "BiMoRS" and new["epoch"] == 1
    assert (tmp_path / "data/ToyRS/captions/toy-blip2__toy-bert.safetensors").is_file()
    assert "HM" in proc.stdout and "ToyRS" in proc.stdout
