"""The protocol planner (tools/planner.py) and the checks the protocol scripts make before any work.

Issue 12, case 2: a finished run is reused only when its recorded config equals what is asked; otherwise the
script stops with the differing keys, and FORCE=1 reruns it. Case 8 (script side): an unknown trainer or
dataset is named as such; DATA and OUTPUT are checked before any run starts. Every error is one ``error:``
line and exit code 2. Execution uses the fake interpreter of test_scripts.py (it records its calls).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from test_scripts import PROTOCOLS, SCRIPTS, run_script, trainer_cfg

from tools.planner import CHANGED, FINISHED, PENDING, TRAINERS, PlanError, Request, plan, registered_trainers

TRAIN = "base2new/train_base/toyrs/shots_16/CoOp/mycfg/seed1"
TEST = "base2new/test_new/toyrs/shots_16/CoOp/mycfg/seed1"


def recorded(run_dir: Path, max_epoch: int = 3, subsample: str = "base", epoch: int | None = None) -> Path:
    """A finished run folder as train.py leaves it: results.json and the config it ran with (written out by
    hand, nested as yacs dumps it; its data root and output folder are elsewhere, which does not matter)."""
    run_dir.mkdir(parents=True)
    config = {
        "BENCH": {"CONFIG_NAME": "mycfg", "PROTOCOL": "base2new", "SOURCE_DATASET": ""},
        "DATASET": {"NAME": "ToyRS", "NUM_SHOTS": 16, "SUBSAMPLE_CLASSES": subsample, "ROOT": "/moved/data"},
        "OPTIM": {"MAX_EPOCH": max_epoch, "LR": 0.002},
        "INPUT": {"SIZE": [224, 224]},
        "OUTPUT_DIR": "/moved/output",
        "SEED": 1,
        "TRAINER": {"NAME": "CoOp"},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "results.json").write_text(f'{{"accuracy": 50.0, "epoch": {epoch or max_epoch}}}')
    return run_dir


def request(tmp_path: Path, **kw) -> Request:
    base = dict(protocol="base2new", trainer="CoOp", datasets=("toyrs",), config=str(trainer_cfg(tmp_path, 3)),
                seeds=(1,), data=tmp_path / "data", output=tmp_path / "out", python="python")  # fmt: skip
    base.update(kw)
    return Request(**base)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused input (exit code 2)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------------ the plan
def test_planner_imports_neither_torch_nor_dassl():
    code = ("import sys, tools.planner, tools.protocol, tools.sweep, tools.executors.local; "
            "bad = [m for m in ('torch', 'dassl', 'clip', 'submitit') if m in sys.modules]; "
            "assert not bad, bad")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_plan_steps_phases_and_dependencies(tmp_path):
    the_plan = plan(request(tmp_path, seeds=(1, 2), trainer="BiMoRS", config="", backbone="toy"))
    prepare, *runs = the_plan.steps
    assert prepare.key == "prepare/toyrs" and prepare.phase == "prepare" and not prepare.is_run
    assert [c[2] for c in prepare.commands] == ["tools.prepare_data", "tools.captions"]  # ToyRS first
    assert [(r.phase, r.key.split("/")[1], r.key[-1]) for r in runs] == [
        ("train", "train_base", "1"), ("eval", "test_new", "1"), ("train", "train_base", "2"), ("eval", "test_new", "2"),
    ]  # fmt: skip
    for train, test in (runs[:2], runs[2:]):
        assert train.deps == ("prepare/toyrs",)
        assert test.deps == ("prepare/toyrs", train.key)
        assert test.commands[0][test.commands[0].index("--model-dir") + 1] == str(train.output_dir)
    assert {r.status for r in runs} == {PENDING}


@pytest.mark.parametrize(("datasets", "asked", "expected"), [
    (("toyrs",), ("", ""), ("toy-blip2", "toy-bert")),  # ToyRS alone: the offline toy models
    (("toyrs",), ("my-blip", "my-bert"), ("my-blip", "my-bert")),  # CAPTIONER / CAPTION_ENCODER still win
    (("rsicd",), ("", ""), ("Salesforce/blip2-flan-t5-xl", "bert-base-uncased")),  # real data: the config's
])  # fmt: skip
def test_bimors_captioner_defaults(tmp_path, datasets, asked, expected):
    (tmp_path / "data").mkdir()
    the_plan = plan(request(tmp_path, trainer="BiMoRS", config="", datasets=datasets, captioner=asked[0],
                            caption_encoder=asked[1]))  # fmt: skip
    prepare, train = the_plan.steps[:2]
    captions = prepare.commands[-1]
    assert captions[captions.index("--captioner") + 1 :][:3] == (expected[0], "--encoder", expected[1])
    argv = train.commands[0]
    assert argv[argv.index("TRAINER.BIMORS.CAPTIONER") + 1] == expected[0]
    assert argv[argv.index("TRAINER.BIMORS.CAPTION_ENCODER") + 1] == expected[1]


def test_trainer_table_names_registered_trainers():
    assert set(TRAINERS) <= set(registered_trainers())
    assert {"ZeroshotCLIP", "CoOp", "CoCoOp", "MaPLe", "BiMoRS"} <= set(TRAINERS)


# ---------------------------------------------------------------------- issue 12, case 2: reuse or refuse
def test_finished_run_with_the_asked_config_is_reused(tmp_path):
    recorded(tmp_path / "out" / TRAIN)
    recorded(tmp_path / "out" / TEST, subsample="new")
    train, test = plan(request(tmp_path)).runs
    assert (train.status, test.status) == (FINISHED, FINISHED)


def test_finished_run_with_other_options_is_changed(tmp_path):
    recorded(tmp_path / "out" / TRAIN, max_epoch=3)
    train, test = plan(request(tmp_path, opts=("OPTIM.MAX_EPOCH", "5", "OPTIM.LR", "0.002"))).runs
    assert train.status == CHANGED and train.replace
    assert train.changes == ("OPTIM.MAX_EPOCH: 3 -> 5",)  # LR equal (0.002), data root and output not compared
    assert test.status == PENDING


def test_evaluation_reruns_when_its_training_reruns(tmp_path):
    recorded(tmp_path / "out" / TEST, subsample="new")  # the training folder is gone: it runs again
    train, test = plan(request(tmp_path)).runs
    assert (train.status, test.status, test.replace) == (PENDING, PENDING, True)


def test_evaluation_of_another_epoch_is_changed(tmp_path):
    recorded(tmp_path / "out" / TRAIN)
    recorded(tmp_path / "out" / TEST, subsample="new")
    _, test = plan(request(tmp_path, load_epoch=2)).runs
    assert test.status == CHANGED and test.changes == ("--load-epoch: 3 -> 2",)


def test_script_stops_with_the_differing_keys_then_force_reruns(tmp_path, fake_python):
    env, log = fake_python
    cfg = trainer_cfg(tmp_path, 3)
    old = recorded(tmp_path / "out" / TRAIN, max_epoch=3)
    recorded(tmp_path / "out" / TEST, subsample="new")
    (tmp_path / "data" / "ToyRS" / "images").mkdir(parents=True)
    args = ("toyrs", "1", "--", "OPTIM.MAX_EPOCH", "5")
    proc = run_script(PROTOCOLS / "base2new.sh", *args, tmp_path=tmp_path, TRAINER="CoOp", CFG=str(cfg), **env)
    line = error_line(proc)
    assert "OPTIM.MAX_EPOCH" in line and "3 -> 5" in line and "FORCE=1" in line and str(old) in line
    assert not log.exists()  # nothing ran
    # the same options as recorded: both runs are reused
    proc = run_script(PROTOCOLS / "base2new.sh", "toyrs", "1", tmp_path=tmp_path, TRAINER="CoOp", CFG=str(cfg), **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("skip (finished)") == 2
    assert [c.split()[0] for c in log.read_text().splitlines()] == ["-m"]  # only the table
    # FORCE=1: the changed training reruns into a cleared folder, and so does its evaluation
    log.unlink()
    proc = run_script(PROTOCOLS / "base2new.sh", *args, tmp_path=tmp_path, TRAINER="CoOp", CFG=str(cfg), FORCE="1", **env)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert [("--eval-only" in c, "OPTIM.MAX_EPOCH 5" in c) for c in calls[:2]] == [(False, True), (True, True)]
    assert f"deleting the old results of {old} before its rerun" in proc.stderr
    assert not (old / "config.yaml").exists()  # the fake train.py writes results.json only: the folder was cleared
    assert (old / "results.json").read_text().strip() == "{}"


def test_finished_run_without_config_is_reused_with_a_note(tmp_path):
    run = tmp_path / "out" / TRAIN
    run.mkdir(parents=True)
    (run / "results.json").write_text("{}")
    proc = run_script(PROTOCOLS / "base2new.sh", "toyrs", "1", tmp_path=tmp_path, DRY_RUN="1", TRAINER="CoOp",
                      CFG=str(trainer_cfg(tmp_path, 3)))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"{run} has results.json but no config.yaml" in proc.stderr
    assert "skip (finished)" in proc.stderr


# ------------------------------------------------------------- issue 12, case 8: names and locations first
def test_unknown_trainer_is_named_with_the_registered_ones(tmp_path):
    proc = run_script(SCRIPTS / "protocols" / "base2new.sh", "toyrs", tmp_path=tmp_path, DRY_RUN="1", TRAINER="Coop")
    line = error_line(proc)
    assert "unknown trainer 'Coop' (did you mean CoOp?)" in line
    assert all(name in line for name in registered_trainers())
    assert "(none)" not in line


def test_registered_trainer_without_configs_asks_for_a_config_file(tmp_path):
    """A trainer a module registers, with no default in the planner and no configs/trainers/<Name>/ folder."""
    (tmp_path / "trainers").mkdir()
    (tmp_path / "trainers" / "fresh.py").write_text("@TRAINER_REGISTRY.register()\nclass Fresh:\n    pass\n")
    (tmp_path / "configs" / "datasets").mkdir(parents=True)
    (tmp_path / "configs" / "datasets" / "toyrs.yaml").write_text("DATASET:\n  NAME: ToyRS\n")
    assert registered_trainers(tmp_path) == ["Fresh"]
    with pytest.raises(PlanError) as exc:
        plan(request(tmp_path, trainer="Fresh", config="", root=tmp_path))
    assert str(exc.value) == ("CFG is not set and the suite has no default config for Fresh; set CFG to the path "
                              "of a .yaml file (Fresh has no configs/trainers/Fresh/)")  # fmt: skip


def test_dataset_typo_without_data_is_an_unknown_dataset(tmp_path):
    proc = run_script(SCRIPTS / "coop" / "base2new.sh", "patternet", tmp_path=tmp_path, DRY_RUN="1", DATA=None)
    line = error_line(proc)
    assert "unknown dataset 'patternet'" in line and "patternnet" in line and "toyrs" in line
    assert "DATA" not in line


def test_missing_data_stops_before_any_run(tmp_path, fake_python):
    env, log = fake_python
    proc = run_script(SCRIPTS / "coop" / "base2new.sh", "patternnet", "1", tmp_path=tmp_path,
                      DATA=str(tmp_path / "nowhere"), **env)  # fmt: skip
    line = error_line(proc)
    assert f"DATA={tmp_path / 'nowhere'} does not exist" in line and "docs/datasets.md" in line
    assert not log.exists()


def test_output_that_cannot_hold_runs_stops_before_any_run(tmp_path, fake_python):
    env, log = fake_python
    (tmp_path / "data").mkdir()
    (tmp_path / "file").write_text("")
    for output, message in ((tmp_path / "file", "is not a folder"),
                            (tmp_path / "file" / "out", f"cannot be created in {tmp_path / 'file'} (Not a directory)"),
                            (Path("/proc/bimors/out"), "cannot be created in /proc (")):  # passes root's access()  # fmt: skip
        proc = run_script(SCRIPTS / "coop" / "base2new.sh", "patternnet", "1", tmp_path=tmp_path, OUTPUT=str(output),
                          **env)  # fmt: skip
        assert f"OUTPUT={output} {message}" in error_line(proc)
    assert not log.exists()


@contextlib.contextmanager
def read_only_folder(path: Path):
    """``path`` as a folder nobody may write into: a read-only tmpfs mount for root (whom permissions do not
    stop; the case of read-only shared storage), mode 0555 for anyone else."""
    path.mkdir()
    if os.geteuid() == 0:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True,
                              text=True, timeout=30)  # fmt: skip
        if proc.returncode:
            pytest.skip(f"cannot mount a read-only tmpfs as root here: {proc.stderr.strip()}")
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=True, timeout=30)
    else:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


@pytest.mark.parametrize("case", ["output-inside", "output", "toy-data"])
def test_read_only_data_and_output_are_named_before_any_run(tmp_path, fake_python, case):
    env, log = fake_python
    (tmp_path / "data").mkdir()
    with read_only_folder(tmp_path / "ro") as ro:
        denied = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
        if case == "toy-data":  # ToyRS is missing and must be generated into DATA
            args, location = ("toyrs", "1"), {"DATA": str(ro)}
            message = f"DATA={ro} is not writable ({denied}) and ToyRS must be generated into it"
        elif case == "output":
            args, location, message = ("patternnet", "1"), {"OUTPUT": str(ro)}, f"OUTPUT={ro} is not writable ({denied})"
        else:
            args, location = ("patternnet", "1"), {"OUTPUT": str(ro / "out")}
            message = f"OUTPUT={ro / 'out'} cannot be created in {ro} ({denied})"
        proc = run_script(SCRIPTS / "coop" / "base2new.sh", *args, tmp_path=tmp_path, **location, **env)
        assert message in error_line(proc)
    assert not log.exists()
