"""Tests of the protocol scripts (scripts/protocols/*.sh) and the per-trainer wrappers.

Most tests run the scripts with ``DRY_RUN=1`` and parse the printed train.py commands with train.py's
own argument parser. Execution paths (skipping finished runs, the pre-step, ToyRS generation, failures)
run the scripts with a fake interpreter that records its calls. The end-to-end runs need Dassl.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, requires_dassl

from tools.planner import TRAINERS
from train import build_parser

SCRIPTS = REPO_ROOT / "scripts"
PROTOCOLS = SCRIPTS / "protocols"
WRAPPER_PROTOCOLS = ("base2new", "crossdata", "domaingen")
# wrapper folder -> (trainer, base2new config, crossdata/domaingen config)
WRAPPERS = {
    "zsclip": ("ZeroshotCLIP", "vit_b16", "vit_b16"),
    "coop": ("CoOp", "vit_b16_ep50_ctxv1", "vit_b16_ep50_ctxv1"),
    "cocoop": ("CoCoOp", "vit_b16_c4_ep10_batch1_ctxv1", "vit_b16_c4_ep10_batch1_ctxv1"),
    "maple": ("MaPLe", "vit_b16_c2_ep5_batch4_2ctx", "vit_b16_c2_ep5_batch4_2ctx_cross_datasets"),
    "kgcoop": ("KgCoOp", "vit_b16_ep100_ctxv1", "vit_b16_ep100_ctxv1"),
    "promptsrc": ("PromptSRC", "vit_b16_c2_ep20_batch4_4+4ctx", "vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets"),
    "applenet": ("APPLeNet", "vit_b16_c4", "vit_b16_c4"),
    "clip_adapter": ("CLIP_Adapter", "vit_b16", "vit_b16"),
}
TRANSFER = {
    "crossdata": ("patternnet", ["rsicd", "resisc45", "mlrsnet"], "PatternNet"),
    "domaingen": ("patternnetv2", ["rsicdv2", "resisc45v2", "mlrsnetv2"], "PatternNetv2"),
}
# Environment variables of the scripts: cleared so the caller's shell cannot change a test's outcome.
SCRIPT_ENV = (
    "TRAINER", "CFG", "DATA", "OUTPUT", "PYTHON", "SHOTS", "BACKBONE", "OPTS", "LOAD_EPOCH", "EVAL_ONLY",
    "PRE_STEP", "DRY_RUN", "SOURCE", "TARGETS",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ helpers
def script_env(tmp_path: Path, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
    base.update(PYTHON=sys.executable, OUTPUT=str(tmp_path / "out"), DATA=str(tmp_path / "data"))
    base.update(env)
    return {k: v for k, v in base.items() if v is not None}


def run_script(script: Path, *args: str, tmp_path: Path, cwd: Path | None = None, **env: str):
    return subprocess.run(
        ["bash", str(script), *args], env=script_env(tmp_path, **env), cwd=cwd or tmp_path,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def dry_run(script: Path, *args: str, tmp_path: Path, **env: str) -> list[list[str]]:
    """Run ``script`` with DRY_RUN=1 and return the printed commands (one argv list per line)."""
    proc = run_script(script, *args, tmp_path=tmp_path, DRY_RUN="1", **env)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def train_runs(commands: list[list[str]]) -> list[tuple]:
    """The train.py commands parsed by train.py's parser: (args, opts as a list of (KEY, VALUE))."""
    runs = []
    for argv in commands:
        if len(argv) > 1 and argv[1] == "train.py":
            assert argv[0] == sys.executable
            args = build_parser().parse_args(argv[2:])
            assert len(args.opts) % 2 == 0, argv
            runs.append((args, list(zip(args.opts[::2], args.opts[1::2]))))
    return runs


def opt(opts: list[tuple[str, str]], key: str) -> str | None:
    """The value yacs would keep for ``key`` (the last one)."""
    values = [v for k, v in opts if k == key]
    return values[-1] if values else None


def trainer_cfg(tmp_path: Path, max_epoch: int | None = 7, name: str = "mycfg") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"OPTIM:\n  MAX_EPOCH: {max_epoch}\n" if max_epoch else "DATALOADER:\n  NUM_WORKERS: 0\n")
    return path


def wrapper_lines(folder: str, protocol: str) -> list[str]:
    return (SCRIPTS / folder / f"{protocol}.sh").read_text().splitlines()


# ----------------------------------------------------------------------------------------------- wrappers
@pytest.mark.parametrize("protocol", WRAPPER_PROTOCOLS)
@pytest.mark.parametrize("folder", sorted(WRAPPERS))
def test_wrapper_is_trainer_exec(folder, protocol):
    """A wrapper names its trainer and hands over to the protocol; the planner knows the trainer's configs."""
    trainer, cfg, xcfg = WRAPPERS[folder]
    assert wrapper_lines(folder, protocol) == [
        "#!/usr/bin/env bash",
        f"export TRAINER={trainer}",
        f'exec bash "$(dirname "$0")/../protocols/{protocol}.sh" "$@"',
    ]
    spec = TRAINERS[trainer]
    assert spec.default_config(protocol) == (cfg if protocol == "base2new" else xcfg)
    assert spec.eval_only == (trainer == "ZeroshotCLIP")


@pytest.mark.parametrize("protocol", (*WRAPPER_PROTOCOLS, "fewshot"))
@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_default_config_exists(trainer, protocol):
    name = TRAINERS[trainer].default_config(protocol)
    cfg_dir = REPO_ROOT / "configs" / "trainers" / trainer
    assert (cfg_dir / f"{name}.yaml").is_file(), f"{trainer}'s default config {name} is not in {cfg_dir}"


@pytest.mark.parametrize("protocol", WRAPPER_PROTOCOLS)
@pytest.mark.parametrize("folder", sorted(WRAPPERS))
def test_wrapper_dry_run_runs_its_trainer(folder, protocol, tmp_path):
    trainer = WRAPPERS[folder][0]
    args = ("toyrs", "4") if protocol == "base2new" else ("4",)
    env = {} if protocol == "base2new" else {"SOURCE": "toyrs", "TARGETS": "toyrs"}
    cfg = trainer_cfg(tmp_path, max_epoch=None if trainer == "ZeroshotCLIP" else 3)
    runs = train_runs(
        dry_run(SCRIPTS / folder / f"{protocol}.sh", *args, tmp_path=tmp_path, CFG=str(cfg), **env)
    )
    assert len(runs) == 2
    for args_, opts in runs:
        assert args_.trainer == trainer
        assert args_.seed == 4
        assert opt(opts, "BENCH.PROTOCOL") == protocol
        assert f"/{protocol}/" in args_.output_dir
    train, test = runs
    assert train[0].eval_only == (trainer == "ZeroshotCLIP")
    assert test[0].eval_only
    if trainer == "ZeroshotCLIP":  # nothing trained: nothing to load
        assert test[0].model_dir == "" and test[0].load_epoch is None
    else:
        assert test[0].model_dir == train[0].output_dir and test[0].load_epoch == 3


# ----------------------------------------------------------------------------------------------- base2new
def test_base2new_dry_run_commands(tmp_path):
    cfg = trainer_cfg(tmp_path)
    commands = dry_run(
        PROTOCOLS / "base2new.sh", "patternnet", "1", "2", "--", "OPTIM.LR", "0.1",
        tmp_path=tmp_path, TRAINER="CoOp", CFG=str(cfg),
    )  # fmt: skip
    runs = train_runs(commands)
    assert len(runs) == 4
    out, data = tmp_path / "out" / "base2new", str(tmp_path / "data")
    for i, seed in enumerate((1, 2)):
        (train, train_opts), (test, test_opts) = runs[2 * i], runs[2 * i + 1]
        tail = f"patternnet/shots_16/CoOp/mycfg/seed{seed}"
        assert train.output_dir == str(out / "train_base" / tail)
        assert test.output_dir == str(out / "test_new" / tail)
        for args, opts in ((train, train_opts), (test, test_opts)):
            assert (args.root, args.seed, args.trainer) == (data, seed, "CoOp")
            assert args.dataset_config_file == "configs/datasets/patternnet.yaml"
            assert (REPO_ROOT / args.dataset_config_file).is_file()
            assert args.config_file == str(cfg)
            assert opt(opts, "DATASET.NUM_SHOTS") == "16"
            assert opt(opts, "BENCH.PROTOCOL") == "base2new"
            assert opts[-1] == ("OPTIM.LR", "0.1")  # pass-through options come last
            assert opt(opts, "MODEL.BACKBONE.NAME") is None
        assert not train.eval_only and train.model_dir == "" and train.load_epoch is None
        assert opt(train_opts, "DATASET.SUBSAMPLE_CLASSES") == "base"
        assert test.eval_only and test.model_dir == train.output_dir and test.load_epoch == 7
        assert opt(test_opts, "DATASET.SUBSAMPLE_CLASSES") == "new"
    # the table of this dataset comes last
    assert commands[-1] == [
        sys.executable, "-m", "tools.results", str(out / "train_base" / "patternnet"),
        str(out / "test_new" / "patternnet"), "--protocol", "base2new", "--seeds", "1", "2",
    ]  # fmt: skip


def test_base2new_defaults_seeds_and_toyrs_data(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cfg = trainer_cfg(tmp_path)
    proc = run_script(
        PROTOCOLS / "base2new.sh", "toyrs", tmp_path=tmp_path, cwd=cwd,
        DRY_RUN="1", TRAINER="CoOp", CFG=str(cfg), DATA=None,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines()]
    data = str(cwd / "data")
    assert commands[0] == [sys.executable, "-m", "tools.prepare_data", "toyrs", "--root", data]
    runs = train_runs(commands)
    assert [a.seed for a, _ in runs] == [1, 1, 2, 2, 3, 3]
    assert {a.root for a, _ in runs} == {data}


@pytest.mark.parametrize(
    ("env", "extra", "epoch"),
    [
        ({}, [], 7),  # OPTIM.MAX_EPOCH of the config
        ({}, ["--", "OPTIM.MAX_EPOCH", "2", "OPTIM.MAX_EPOCH", "1"], 1),  # the last option wins, as in yacs
        ({"LOAD_EPOCH": "3"}, ["--", "OPTIM.MAX_EPOCH", "1"], 3),  # explicit LOAD_EPOCH wins
    ],
)
def test_base2new_load_epoch(tmp_path, env, extra, epoch):
    cfg = trainer_cfg(tmp_path)
    runs = train_runs(dry_run(PROTOCOLS / "base2new.sh", "toyrs", "1", *extra, tmp_path=tmp_path,
                              TRAINER="CoOp", CFG=str(cfg), **env))  # fmt: skip
    assert [a.load_epoch for a, _ in runs] == [None, epoch]


def test_base2new_backbone_shots_opts(tmp_path):
    cfg = trainer_cfg(tmp_path)
    runs = train_runs(dry_run(
        PROTOCOLS / "base2new.sh", "toyrs", "5", "--", "DATALOADER.NUM_WORKERS", "0", tmp_path=tmp_path,
        TRAINER="CoOp", CFG=str(cfg), BACKBONE="ViT-B/32", SHOTS="4", OPTS="OPTIM.LR 0.5 TRAIN.PRINT_FREQ 1",
    ))  # fmt: skip
    (train, train_opts), (test, test_opts) = runs
    assert train.output_dir.endswith("base2new/train_base/toyrs/shots_4/CoOp/mycfg_ViTB32/seed5")
    assert test.model_dir == train.output_dir
    for opts in (train_opts, test_opts):
        assert opt(opts, "MODEL.BACKBONE.NAME") == "ViT-B/32"
        assert opt(opts, "DATASET.NUM_SHOTS") == "4"
        assert opts[-3:] == [("OPTIM.LR", "0.5"), ("TRAIN.PRINT_FREQ", "1"), ("DATALOADER.NUM_WORKERS", "0")]


def test_base2new_skips_finished_runs(tmp_path):
    cfg = trainer_cfg(tmp_path)
    done = tmp_path / "out/base2new/train_base/toyrs/shots_16/CoOp/mycfg/seed1"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    (tmp_path / "out/base2new/train_base/toyrs/shots_16/CoOp/mycfg/seed2").mkdir(parents=True)  # unfinished
    runs = train_runs(dry_run(PROTOCOLS / "base2new.sh", "toyrs", "1", "2", tmp_path=tmp_path,
                              TRAINER="CoOp", CFG=str(cfg)))  # fmt: skip
    assert [(a.seed, a.eval_only) for a, _ in runs] == [(1, True), (2, False), (2, True)]
    assert runs[0][0].model_dir == str(done)


def test_eval_only_trainer_loads_nothing(tmp_path):
    cfg = trainer_cfg(tmp_path, max_epoch=None)  # zero-shot configs need no OPTIM.MAX_EPOCH
    runs = train_runs(
        dry_run(SCRIPTS / "zsclip" / "base2new.sh", "toyrs", "1", tmp_path=tmp_path, CFG=str(cfg))
    )
    assert [(a.eval_only, a.model_dir, a.load_epoch) for a, _ in runs] == [(True, "", None), (True, "", None)]
    assert [opt(o, "DATASET.SUBSAMPLE_CLASSES") for _, o in runs] == ["base", "new"]
    assert runs[0][0].output_dir.endswith("train_base/toyrs/shots_16/ZeroshotCLIP/mycfg/seed1")


def test_config_name_resolves_in_configs_trainers(tmp_path):
    """CFG without .yaml names a file of configs/trainers/<TRAINER>/ (used here: any existing one)."""
    found = sorted((REPO_ROOT / "configs" / "trainers").glob("*/*.yaml"))
    path = found[0]
    runs = train_runs(dry_run(PROTOCOLS / "base2new.sh", "toyrs", "1", tmp_path=tmp_path, TRAINER=path.parent.name,
                              CFG=path.stem, LOAD_EPOCH="1"))  # fmt: skip
    assert runs[0][0].config_file == f"configs/trainers/{path.parent.name}/{path.name}"
    assert f"/{path.parent.name}/{path.stem}/seed1" in runs[0][0].output_dir


# --------------------------------------------------------------------------------------- crossdata, domaingen
@pytest.mark.parametrize("protocol", sorted(TRANSFER))
def test_transfer_dry_run_commands(tmp_path, protocol):
    source, targets, source_name = TRANSFER[protocol]
    cfg = trainer_cfg(tmp_path)
    commands = dry_run(PROTOCOLS / f"{protocol}.sh", "2", "--", "OPTIM.LR", "0.1", tmp_path=tmp_path,
                       TRAINER="MaPLe", CFG=str(cfg))  # fmt: skip
    runs = train_runs(commands)
    assert len(runs) == 1 + len(targets)
    out = tmp_path / "out" / protocol
    (train, train_opts), evals = runs[0], runs[1:]
    assert train.output_dir == str(out / "train" / source / "shots_16/MaPLe/mycfg/seed2")
    assert train.dataset_config_file == f"configs/datasets/{source}.yaml"
    assert not train.eval_only
    assert opt(train_opts, "BENCH.SOURCE_DATASET") is None
    for target, (args, opts) in zip(targets, evals):
        assert args.dataset_config_file == f"configs/datasets/{target}.yaml"
        assert (REPO_ROOT / args.dataset_config_file).is_file()
        assert args.output_dir == str(out / "test" / target / "shots_16/MaPLe/mycfg/seed2")
        assert args.eval_only and args.model_dir == train.output_dir and args.load_epoch == 7
        assert opt(opts, "BENCH.SOURCE_DATASET") == source_name
    for args, opts in runs:
        assert args.seed == 2
        assert opt(opts, "DATASET.SUBSAMPLE_CLASSES") == "all"
        assert opt(opts, "DATASET.NUM_SHOTS") == "16"
        assert opt(opts, "BENCH.PROTOCOL") == protocol
        assert opts[-1] == ("OPTIM.LR", "0.1")
    assert commands[-1] == [
        sys.executable,
        "-m",
        "tools.results",
        str(out),
        "--protocol",
        protocol,
        "--seeds",
        "2",
    ]


def test_transfer_source_targets_override_on_toyrs(tmp_path):
    cfg = trainer_cfg(tmp_path)
    proc = run_script(
        PROTOCOLS / "crossdata.sh", "1", tmp_path=tmp_path, cwd=tmp_path, DRY_RUN="1", TRAINER="CoOp",
        CFG=str(cfg), DATA=None, SOURCE="toyrs", TARGETS="toyrs", PRE_STEP="echo captions --x",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines()]
    data = str(tmp_path / "data")
    assert commands[:2] == [  # once per distinct dataset, before any run
        [sys.executable, "-m", "tools.prepare_data", "toyrs", "--root", data],
        ["echo", "captions", "--x", "toyrs", "--root", data, "--shots", "16", "--seeds", "1"],
    ]
    runs = train_runs(commands)
    assert [a.output_dir.split("/crossdata/")[1].split("/")[:2] for a, _ in runs] == [
        ["train", "toyrs"], ["test", "toyrs"],
    ]  # fmt: skip
    assert opt(runs[1][1], "BENCH.SOURCE_DATASET") == "ToyRS"


# -------------------------------------------------------------------------------------------------- fewshot
@pytest.mark.parametrize(("shots", "expected"), [(None, [1, 2, 4, 8, 16]), ("8 2", [8, 2])])
def test_fewshot_dry_run_commands(tmp_path, shots, expected):
    cfg = trainer_cfg(tmp_path)
    runs = train_runs(dry_run(PROTOCOLS / "fewshot.sh", "rsicd", "1", "2", tmp_path=tmp_path,
                              TRAINER="CoOp", CFG=str(cfg), SHOTS=shots))  # fmt: skip
    assert [(a.seed, int(opt(o, "DATASET.NUM_SHOTS"))) for a, o in runs] == [
        (seed, k) for seed in (1, 2) for k in expected
    ]
    for args, opts in runs:
        k, seed = opt(opts, "DATASET.NUM_SHOTS"), args.seed
        assert args.output_dir == str(tmp_path / f"out/fewshot/train/rsicd/shots_{k}/CoOp/mycfg/seed{seed}")
        assert not args.eval_only
        assert opt(opts, "DATASET.SUBSAMPLE_CLASSES") == "all"
        assert opt(opts, "BENCH.PROTOCOL") == "fewshot"


# --------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("script", "args", "env", "message"),
    [
        ("base2new", ["patternnet"], {"DATA": None}, "export DATA="),
        ("crossdata", [], {"DATA": None, "SOURCE": "toyrs"}, "export DATA="),  # targets are not toy
        ("base2new", ["nope"], {}, "unknown dataset 'nope'"),
        ("base2new", [], {}, "missing DATASET"),
        ("base2new", ["toyrs"], {"TRAINER": None}, "TRAINER is not set"),
        (
            "base2new",
            ["toyrs"],
            {"CFG": "no_such_cfg"},
            "configs/trainers/CoOp/no_such_cfg.yaml does not exist",
        ),
        ("base2new", ["toyrs", "1", "--", "OPTIM.LR"], {}, "KEY VALUE pairs"),
        ("base2new", ["toyrs", "OPTIM.LR", "0.1"], {}, "seed 'OPTIM.LR' is not a positive integer"),
        ("base2new", ["toyrs", "--", "optim.lr", "0.1"], {}, "'optim.lr' is not a config key"),
        ("base2new", ["toyrs", "--", "DATASET.NUM_SHOTS", "2"], {}, "SHOTS=N"),
        ("base2new", ["toyrs", "--", "MODEL.BACKBONE.NAME", "toy"], {}, "BACKBONE=NAME"),
        ("base2new", ["toyrs", "--", "DATASET.SUBSAMPLE_CLASSES", "all"], {}, "set by the base2new protocol"),
        ("base2new", ["toyrs"], {"SHOTS": "4 8"}, "must be one number"),
        ("fewshot", ["toyrs"], {"SHOTS": "4 x"}, "must be positive integers"),
        ("base2new", ["toyrs"], {"PYTHON": "/no/such/python"}, "PYTHON=/no/such/python is not a command"),
        ("base2new", ["toyrs"], {"CFG": "@nomax"}, "set LOAD_EPOCH=N"),
    ],
)
def test_bad_input_is_named(tmp_path, script, args, env, message):
    env = {"TRAINER": "CoOp", "CFG": str(trainer_cfg(tmp_path)), **env}
    if env.get("CFG") == "@nomax":
        env["CFG"] = str(trainer_cfg(tmp_path, max_epoch=None, name="nomax"))
    proc = run_script(PROTOCOLS / f"{script}.sh", *args, tmp_path=tmp_path, DRY_RUN="1", **env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr  # one line
    assert message in proc.stderr
    assert "train.py" not in proc.stdout


def test_help_documents_the_environment(tmp_path):
    proc = run_script(SCRIPTS / "coop" / "crossdata.sh", "--help", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for word in ("Usage:", "SOURCE", "TARGETS", "DATA", "PRE_STEP", "DRY_RUN", "LOAD_EPOCH", "BACKBONE"):
        assert word in proc.stdout


def test_no_comment_after_line_continuation():
    """A comment after a trailing backslash ends the command and silently drops the following flags."""
    for path in sorted(SCRIPTS.rglob("*.sh")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            assert not re.search(r"\\\s*#", line), f"{path}:{i + 1}: comment after a continuation"
            if line.rstrip().endswith("\\") and i + 1 < len(lines):
                assert not lines[i + 1].lstrip().startswith("#"), (
                    f"{path}:{i + 2}: comment line in a continuation"
                )


# ------------------------------------------------------------------------- execution with a fake interpreter
def test_execution_order_pre_step_and_skip(tmp_path, fake_python):
    env, log = fake_python
    (tmp_path / "data" / "ToyRS" / "images").mkdir(parents=True)  # ToyRS exists: not generated again
    pre = tmp_path / "bin" / "pre"
    pre.write_text('#!/usr/bin/env bash\nprintf "pre %s\\n" "$*" >> "$FAKE_LOG"\n')
    pre.chmod(pre.stat().st_mode | stat.S_IEXEC)
    cfg = trainer_cfg(tmp_path)
    common = dict(TRAINER="CoOp", CFG=str(cfg), SOURCE="toyrs", TARGETS="toyrs", PRE_STEP=f"{pre} --flag",
                  **env)  # fmt: skip
    proc = run_script(PROTOCOLS / "crossdata.sh", "1", "2", tmp_path=tmp_path, **common)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    data = tmp_path / "data"
    assert calls[0] == f"pre --flag toyrs --root {data} --shots 16 --seeds 1 2"
    kinds = [c.split()[0] + ("-eval" if "--eval-only" in c else "") for c in calls[1:]]
    assert kinds == ["train.py", "train.py-eval", "train.py", "train.py-eval", "-m"]
    assert calls[-1].startswith(f"-m tools.results {tmp_path / 'out' / 'crossdata'} --protocol crossdata")
    assert not any("prepare_data" in c for c in calls)
    # a second run finds every folder finished: only the pre-step and the table run
    log.unlink()
    proc = run_script(PROTOCOLS / "crossdata.sh", "1", "2", tmp_path=tmp_path, **common)
    assert proc.returncode == 0, proc.stderr
    assert [c.split()[0] for c in log.read_text().splitlines()] == ["pre", "-m"]
    assert proc.stderr.count("skip (finished)") == 4


def test_failed_training_stops_the_protocol(tmp_path, fake_python):
    env, log = fake_python
    cfg = trainer_cfg(tmp_path)
    proc = run_script(PROTOCOLS / "base2new.sh", "toyrs", "1", "2", tmp_path=tmp_path, TRAINER="CoOp",
                      CFG=str(cfg), FAKE_FAIL="train_base/toyrs/shots_16/CoOp/mycfg/seed1", **env)  # fmt: skip
    assert proc.returncode == 3
    calls = log.read_text().splitlines()
    assert calls[0] == f"-m tools.prepare_data toyrs --root {tmp_path / 'data'}"  # ToyRS missing: generated
    assert len(calls) == 2 and calls[1].startswith("train.py") and "--eval-only" not in calls[1]


# ----------------------------------------------------------------------------------------------- end to end
def _toyrs_data(tmp_path: Path) -> Path:
    """A data root with ToyRS (generated by the script itself when tools.prepare_data exists)."""
    data = tmp_path / "data"
    if not (REPO_ROOT / "tools" / "prepare_data.py").is_file():
        from datasets.toyrs import generate

        generate(data / "ToyRS" / "images", progress=False)
    return data


FAST_OPTS = ["--", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "50"]


@requires_dassl
@pytest.mark.dassl
@pytest.mark.slow
def test_zsclip_base2new_end_to_end(tmp_path):
    repo_cfg = REPO_ROOT / "configs" / "trainers" / "ZeroshotCLIP" / "vit_b16.yaml"
    cfg = repo_cfg if repo_cfg.is_file() else trainer_cfg(tmp_path, max_epoch=None, name="vit_b16")
    data = _toyrs_data(tmp_path)
    env = dict(CFG=str(cfg), DATA=str(data), BACKBONE="toy", SHOTS="2")
    proc = run_script(SCRIPTS / "zsclip" / "base2new.sh", "toyrs", "1", *FAST_OPTS, tmp_path=tmp_path, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tail = "toyrs/shots_2/ZeroshotCLIP/vit_b16_toy/seed1/results.json"
    base = json.loads((tmp_path / "out/base2new/train_base" / tail).read_text())
    new = json.loads((tmp_path / "out/base2new/test_new" / tail).read_text())
    for record, subsample in ((base, "base"), (new, "new")):
        assert record["trainer"] == "ZeroshotCLIP" and record["dataset"] == "ToyRS"
        assert (record["protocol"], record["subsample"], record["shots"]) == ("base2new", subsample, 2)
        assert record["backbone"] == "toy" and record["seed"] == 1
        assert len(record["per_class"]) == 4  # 8 ToyRS classes: 4 base, 4 new
    assert set(base["per_class"]).isdisjoint(new["per_class"])
    assert "HM" in proc.stdout  # the Base/New/HM table
    rerun = run_script(SCRIPTS / "zsclip" / "base2new.sh", "toyrs", "1", *FAST_OPTS, tmp_path=tmp_path, **env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stderr.count("skip (finished)") == 2


@requires_dassl
@pytest.mark.dassl
@pytest.mark.slow
def test_coop_base2new_end_to_end(tmp_path):
    data = _toyrs_data(tmp_path)
    env = dict(DATA=str(data), BACKBONE="toy", SHOTS="2")
    args = ["toyrs", "1", *FAST_OPTS, "OPTIM.MAX_EPOCH", "1"]
    proc = run_script(SCRIPTS / "coop" / "base2new.sh", *args, tmp_path=tmp_path, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg_dir = f"{WRAPPERS['coop'][1]}_toy"
    train_dir = tmp_path / "out/base2new/train_base/toyrs/shots_2/CoOp" / cfg_dir / "seed1"
    assert (train_dir / "prompt_learner" / "model.pth.tar-1").is_file()
    base = json.loads((train_dir / "results.json").read_text())
    new = json.loads(
        (tmp_path / "out/base2new/test_new/toyrs/shots_2/CoOp" / cfg_dir / "seed1/results.json").read_text()
    )
    assert (base["subsample"], base["epoch"], base["trainer"]) == ("base", 1, "CoOp")
    assert (new["subsample"], new["epoch"], new["protocol"]) == ("new", 1, "base2new")
    assert "HM" in proc.stdout
    # the config train.py recorded answers for the runs: other options stop the script, naming the key
    args[args.index("OPTIM.MAX_EPOCH") + 1] = "2"
    proc = run_script(SCRIPTS / "coop" / "base2new.sh", *args, tmp_path=tmp_path, **env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: 2 finished runs recorded other values of"), proc.stderr
    assert "OPTIM.MAX_EPOCH: 1 -> 2" in proc.stderr and "FORCE=1" in proc.stderr
