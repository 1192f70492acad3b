"""train.py end to end with Dassl: zero-shot evaluation, BiMoRS training, checkpoints, exact resume."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import HAVE_DASSL, REPO_ROOT, kill_in_epoch, requires_dassl, write_random_caption_store

pytestmark = [requires_dassl]
if HAVE_DASSL:
    import train
    import trainers.base as trainer_base

BIMORS_CFG = str(REPO_ROOT / "configs/trainers/BiMoRS/vit_b16_c4_ep10_batch4_ctxv1.yaml")
TOYRS_CFG = str(REPO_ROOT / "configs/datasets/toyrs.yaml")
FAST = ["MODEL.BACKBONE.NAME", "toy", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "64",
        "DATALOADER.TRAIN_X.BATCH_SIZE", "4"]
TOY_CAPTIONS = ["TRAINER.BIMORS.CAPTIONER", "toy-blip2", "TRAINER.BIMORS.CAPTION_ENCODER", "toy-bert"]


def _run(root, out, trainer, config, *extra, eval_only=False, model_dir=None, epoch=None, code=0):
    argv = ["--root", str(root), "--seed", "1", "--trainer", trainer, "--dataset-config-file", TOYRS_CFG,
            "--output-dir", str(out)]
    if config:
        argv += ["--config-file", config]
    if eval_only:
        argv += ["--eval-only"] + (["--model-dir", str(model_dir)] if model_dir else [])
        argv += ["--load-epoch", str(epoch)] if epoch else []
    assert train.main(argv + [*FAST, *extra]) == code
    return json.loads((out / "results.json").read_text()) if code == 0 else None


def _error_line(capsys) -> str:
    """What train.main wrote to stderr: one ``error:`` line first (its fix may follow on the next line)."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error: ") == 1, err
    return err


def test_zeroshot_writes_log_and_results(toyrs_root, tmp_path):
    result = _run(toyrs_root, tmp_path / "zs", "ZeroshotCLIP", None, eval_only=True)
    log = (tmp_path / "zs" / "log.txt").read_text()
    assert "* accuracy:" in log and "RANDOM weights" in log
    assert result["trainer"] == "ZeroshotCLIP" and result["dataset"] == "ToyRS" and result["n_test"] == 144
    assert 0.0 <= result["accuracy"] <= 100.0 and len(result["per_class"]) == 8
    assert (tmp_path / "zs" / "config.yaml").is_file()
    assert f"{result['accuracy']:.1f}%" in log


@pytest.fixture(scope="module")
def bimors_run(toyrs_root, tmp_path_factory):
    write_random_caption_store(toyrs_root)
    out = tmp_path_factory.mktemp("bimors") / "run"
    result = _run(toyrs_root, out, "BiMoRS", BIMORS_CFG, "OPTIM.MAX_EPOCH", "3", "DATASET.NUM_SHOTS", "4",
                  "DATASET.SUBSAMPLE_CLASSES", "base", "BENCH.PROTOCOL", "base2new", *TOY_CAPTIONS)
    return out, result


def test_bimors_trains_and_records(bimors_run):
    out, result = bimors_run
    assert result["trainer"] == "BiMoRS" and result["subsample"] == "base" and result["epoch"] == 3
    assert result["protocol"] == "base2new" and result["config"] == "vit_b16_c4_ep10_batch4_ctxv1"
    assert result["shots"] == 4 and len(result["per_class"]) == 4


def test_checkpoint_is_weights_only(bimors_run):
    out, _ = bimors_run
    ckpt = torch.load(out / "prompt_learner" / "model.pth.tar-3", weights_only=True)
    assert ckpt["epoch"] == 3 and "ctx" in ckpt["state_dict"] and "caption_proj.weight" in ckpt["state_dict"]
    assert ckpt["scheduler"]["last_epoch"] == 3 and ckpt["optimizer"]["param_groups"][0]["lr"] > 0
    assert not (out / "prompt_learner" / trainer_base.RESUME_FILE).exists()  # removed once the final one exists


def test_eval_only_reload_reproduces_results(bimors_run, toyrs_root, tmp_path):
    out, result = bimors_run
    again = _run(toyrs_root, tmp_path / "eval", "BiMoRS", BIMORS_CFG, "DATASET.NUM_SHOTS", "4",
                 "DATASET.SUBSAMPLE_CLASSES", "base", *TOY_CAPTIONS, eval_only=True, model_dir=out, epoch=3)
    assert again["accuracy"] == result["accuracy"] and again["per_class"] == result["per_class"]
    assert again["epoch"] == 3


def test_eval_only_without_checkpoint_names_folder(toyrs_root, tmp_path, capsys):
    write_random_caption_store(toyrs_root)  # (this test must not depend on another one having written it)
    (tmp_path / "empty" / "prompt_learner").mkdir(parents=True)
    _run(toyrs_root, tmp_path / "eval", "BiMoRS", BIMORS_CFG, *TOY_CAPTIONS, eval_only=True,
         model_dir=tmp_path / "empty", epoch=7, code=2)
    assert re.search("model.pth.tar-7.*prompt_learner", _error_line(capsys))


def test_caption_dimension_mismatch_with_checkpoint(bimors_run, toyrs_root, tmp_path, capsys):
    out, _ = bimors_run
    root = tmp_path / "data"
    shutil.copytree(toyrs_root / "ToyRS", root / "ToyRS", ignore=shutil.ignore_patterns("captions"))
    write_random_caption_store(root, dim=16)
    _run(root, tmp_path / "eval", "BiMoRS", BIMORS_CFG, "DATASET.SUBSAMPLE_CLASSES", "base", *TOY_CAPTIONS,
         eval_only=True, model_dir=out, epoch=3, code=2)
    assert re.search("24-d caption vectors.*16-d", _error_line(capsys))


def test_missing_captions_error_names_command(toyrs_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(toyrs_root / "ToyRS", root / "ToyRS", ignore=shutil.ignore_patterns("captions"))
    _run(root, tmp_path / "out", "BiMoRS", BIMORS_CFG, *TOY_CAPTIONS, code=2)
    err = _error_line(capsys)
    assert "no caption vectors for ToyRS" in err and "python -m tools.captions ToyRS" in err


def test_resume_continues_exactly(toyrs_root, tmp_path, monkeypatch):
    """Kill a run after its first epoch, re-run the same command: same schedule and same final weights."""
    write_random_caption_store(toyrs_root)
    args = ("OPTIM.MAX_EPOCH", "3", "DATASET.NUM_SHOTS", "2", *TOY_CAPTIONS)
    full = tmp_path / "full"
    _run(toyrs_root, full, "BiMoRS", BIMORS_CFG, *args)

    kill_in_epoch(monkeypatch, 1)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        _run(toyrs_root, part, "BiMoRS", BIMORS_CFG, *args)
    assert (part / "prompt_learner" / trainer_base.RESUME_FILE).is_file()
    monkeypatch.undo()
    _run(toyrs_root, part, "BiMoRS", BIMORS_CFG, *args)
    assert "Resumed prompt_learner" in "".join(p.read_text() for p in part.glob("log.txt*"))

    a = torch.load(full / "prompt_learner" / "model.pth.tar-3", weights_only=True)
    b = torch.load(part / "prompt_learner" / "model.pth.tar-3", weights_only=True)
    assert a["scheduler"] == b["scheduler"]
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    for key, value in a["state_dict"].items():
        assert torch.allclose(value, b["state_dict"][key], atol=1e-6), key


def test_lr_schedule_follows_dassl_semantics():
    """Constant warm-up for WARMUP_EPOCH epochs, then cosine over MAX_EPOCH restarted at 0 (Dassl's recount)."""
    import math

    from dassl.config import get_cfg_default

    cfg = get_cfg_default()
    cfg.OPTIM.merge_from_list(["LR", 0.009, "MAX_EPOCH", 10, "LR_SCHEDULER", "cosine", "WARMUP_EPOCH", 1,
                               "WARMUP_TYPE", "constant", "WARMUP_CONS_LR", 1e-5])
    param = torch.nn.Parameter(torch.zeros(1))
    optim = torch.optim.SGD([param], lr=0.009)
    sched = trainer_base.build_lr_scheduler(optim, cfg.OPTIM)
    seen = []
    for _ in range(10):
        seen.append(optim.param_groups[0]["lr"])
        optim.step()
        sched.step()
    expected = [1e-5] + [0.009 * 0.5 * (1 + math.cos(math.pi * e / 10)) for e in range(9)]
    assert seen == pytest.approx(expected, rel=1e-12)


def test_missing_dassl_prints_install_command(monkeypatch, capsys):
    real = train.importlib.util.find_spec
    monkeypatch.setattr(train.importlib.util, "find_spec", lambda name, *a: None if name == "dassl" else real(name, *a))
    assert train.main(["--trainer", "CoOp"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps --no-build-isolation" in err and "c61a1b5" in err
