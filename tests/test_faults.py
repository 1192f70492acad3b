"""Fault injection (issue 12): every bad input or fault is a refusal with one clear line, or an honest record.

Each test names the case of issue 12 it covers. Runs use the toy backbone on ToyRS, on the CPU. The command-line
contract (exit status 2, one ``error:`` line on stderr, at most a short console output) is checked on
``python train.py`` subprocesses where the process matters (console size, a second process, kill by PID, a
read-only data root) and on ``train.main`` (which returns the exit status) elsewhere.

Read-only data roots: the tests run as root (here and in CI), and root ignores permission bits. The child process
therefore sees the data root through a read-only bind mount in its own mount namespace (``unshare --mount``), or,
where that is not allowed, runs without CAP_DAC_OVERRIDE (``setpriv``) on a folder made non-writable with chmod.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HAVE_DASSL, REPO_ROOT, requires_dassl
from test_prepare_data import CLASSES, add_row, zip_bytes
from test_splits import PNG, make_tree
from yacs.config import CfgNode

from datasets import storage
from datasets.catalog import ChecksumError, SplitError, add_dataset_config, resolve_dataset
from datasets.splits import few_shot, load_splits, read_split_file
from tools import prepare_data
from tools import results as R

if HAVE_DASSL:
    import train
    import trainers.base as base

TOYRS_CFG = str(REPO_ROOT / "configs/datasets/toyrs.yaml")
COOP_CFG = str(REPO_ROOT / "configs/trainers/CoOp/vit_b16.yaml")  # PREC fp16: falls back to fp32 on the CPU
ZS_CFG = str(REPO_ROOT / "configs/trainers/ZeroshotCLIP/vit_b16.yaml")
FAST = ["MODEL.BACKBONE.NAME", "toy", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "64",
        "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "USE_CUDA", "False"]  # fmt: skip
SHORT = ["OPTIM.MAX_EPOCH", "2", "DATASET.NUM_SHOTS", "2"]
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
CHILD_ENV.pop("BIMORS_DEBUG", None)
WAIT_S = 240  # bound on every wait for a child process (toy runs take seconds; the CPUs may be shared)


def argv(root, out, *opts, trainer="CoOp", config=COOP_CFG, seed: str | None = "1", eval_only=False, model_dir=None,
         load_epoch=None):  # fmt: skip
    """train.py arguments for a fast toy run."""
    args = ["--root", str(root), "--trainer", trainer, "--dataset-config-file", TOYRS_CFG, "--output-dir", str(out)]
    args += ["--seed", seed] if seed is not None else []
    args += ["--config-file", config] if config else []
    args += ["--eval-only"] if eval_only else []
    args += ["--model-dir", str(model_dir)] if model_dir else []
    args += ["--load-epoch", str(load_epoch)] if load_epoch else []
    return args + FAST + list(opts)


def run_train(args, env=None, prefix=()) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a child process (optionally behind ``prefix``, e.g. a read-only mount)."""
    return subprocess.run([*prefix, sys.executable, str(REPO_ROOT / "train.py"), *args], cwd=REPO_ROOT,
                          env=env or CHILD_ENV, capture_output=True, text=True, timeout=WAIT_S)  # fmt: skip


def one_error(stderr: str) -> str:
    """The ``error:`` line of a refused run: the first line of stderr (as a terminal shows it: a progress bar
    erased with carriage returns does not count), and the only one starting so."""
    shown = "\n".join(line.rsplit("\r", 1)[-1] for line in stderr.split("\n"))
    assert shown.startswith("error: ") and shown.count("error: ") == 1, stderr
    return shown.splitlines()[0]


def main_refuses(args, capsys) -> str:
    """Run ``train.main(args)``; it must return 2 and write one ``error:`` line; return that line."""
    assert train.main(args) == 2
    return one_error(capsys.readouterr().err)


def copy_toyrs(toyrs_root: Path, tmp_path: Path) -> Path:
    """A private copy of the session's ToyRS data root (for tests that damage it)."""
    root = tmp_path / "data"
    shutil.copytree(toyrs_root / "ToyRS", root / "ToyRS", ignore=shutil.ignore_patterns("captions", "split_fewshot"))
    return root


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``predicate`` (bounded by WAIT_S); fail early when ``proc`` ended."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S}s waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------ read-only folders
def _cannot_write(prefix: list[str], path: Path) -> bool:
    probe = subprocess.run([*prefix, "sh", "-c", f'touch "{path}/.probe"'], capture_output=True, text=True,
                           timeout=WAIT_S)  # fmt: skip
    return probe.returncode != 0 and re.search("Read-only file system|Permission denied", probe.stderr) is not None


def read_only(path: Path) -> list[str]:
    """A command prefix under which ``path`` cannot be written by the child, or skip saying why not.

    As root: a read-only bind mount of ``path`` in a private mount namespace, else a child without
    CAP_DAC_OVERRIDE on a chmod-ed tree. As another user: the chmod alone.
    """
    if shutil.which("unshare"):
        script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
        prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(path)]
        if _cannot_write(prefix, path):
            return prefix
    subprocess.run(["chmod", "-R", "a-w", str(path)], check=True)
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    if (not prefix or shutil.which(prefix[0])) and _cannot_write(prefix, path):
        return prefix
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=True)
    pytest.skip("cannot make a folder read-only for a child process: neither a read-only bind mount (unshare "
                "--mount) nor dropping CAP_DAC_OVERRIDE (setpriv) works here, and root ignores permission bits")


# =========================================================================================== case 1
@requires_dassl
def test_fingerprint_has_what_shapes_training_and_nothing_else(toyrs_root, tmp_path):
    cfg = train.setup_cfg(train.build_parser().parse_args(argv(toyrs_root, tmp_path, *SHORT)))
    fp = base.run_fingerprint(cfg)
    for key in ("SEED", "DATASET.NAME", "DATASET.NUM_SHOTS", "DATASET.SUBSAMPLE_CLASSES", "TRAINER.NAME",
                "TRAINER.COOP.N_CTX", "TRAINER.COOP.CSC", "OPTIM.LR", "OPTIM.MAX_EPOCH", "OPTIM.WARMUP_EPOCH",
                "MODEL.BACKBONE.NAME", "INPUT.TRANSFORMS", "DATALOADER.TRAIN_X.BATCH_SIZE"):  # fmt: skip
        assert key in fp, key
    assert fp["SEED"] == 1 and fp["DATASET.NUM_SHOTS"] == 2 and fp["MODEL.BACKBONE.NAME"] == "toy"
    for key in ("DATASET.ROOT", "OUTPUT_DIR", "DATALOADER.NUM_WORKERS", "TEST.FINAL_MODEL", "TRAINER.MAPLE.N_CTX"):
        assert key not in fp, key  # where things live, how fast, or another trainer's keys
    assert base.fingerprint_diff(fp, {**fp, "OPTIM.LR": 0.5}) == [f"OPTIM.LR: checkpoint {fp['OPTIM.LR']}, this run 0.5"]


@requires_dassl
def test_resume_refuses_a_checkpoint_of_another_run(toyrs_root, tmp_path, capsys):
    """Case 1: a --seed 2 (and another LR, another N_CTX) run in a folder where a seed-1 run stopped is refused,
    naming what differs and the two ways out; the folder's record (config.yaml) is left alone."""
    out = tmp_path / "run"
    assert train.main(argv(toyrs_root, out, *SHORT, "TEST.NO_TEST", "True")) == 0
    recorded = (out / "config.yaml").read_text()
    line = main_refuses(argv(toyrs_root, out, *SHORT, "TEST.NO_TEST", "True", "OPTIM.LR", "0.5",
                             "TRAINER.COOP.N_CTX", "8", seed="2"), capsys)  # fmt: skip
    assert f"{out} holds a checkpoint of another run (model.pth.tar-2, epoch 2)" in line
    for diff in ("SEED: checkpoint 1, this run 2", "OPTIM.LR: checkpoint 0.002, this run 0.5",
                 "TRAINER.COOP.N_CTX: checkpoint 16, this run 8"):  # fmt: skip
        assert diff in line
    assert "another --output-dir" in line and f"delete {out}" in line
    assert (out / "config.yaml").read_text() == recorded
    assert "error: " + line.removeprefix("error: ") in (out / "log.txt").read_text()  # also in the run's log

    ckpt_path = out / "prompt_learner" / "model.pth.tar-2"  # a checkpoint of an older version: no record
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["run_config"]
    torch.save(ckpt, ckpt_path)
    line = main_refuses(argv(toyrs_root, out, *SHORT, "TEST.NO_TEST", "True"), capsys)
    assert "without a record of its run's config" in line and "another --output-dir" in line


# =========================================================================================== case 3 + 9
KILLABLE = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import trainers.base as base
import train

original = base.PromptTrainer.after_epoch


def after_epoch(self):
    original(self)
    if self.epoch == 0:  # the epoch-1 resume checkpoint is written: say so, then wait to be killed
        Path(sys.argv[1]).write_text("epoch 1 saved")
        time.sleep(3600)


base.PromptTrainer.after_epoch = after_epoch
sys.exit(train.main(sys.argv[2:]))
"""


@requires_dassl
def test_second_process_refused_killed_lock_taken_over_and_log_continued(toyrs_root, tmp_path):
    """Case 3: a second process in a run folder is refused naming the first; a run killed by PID (SIGKILL) leaves
    a stale lock that the next run takes over with a note. Case 9: that run continues log.txt after a marked
    line, so the log's last accuracy is the resumed run's. And the resumed weights equal an uninterrupted run's,
    bit for bit."""
    args = argv(toyrs_root, tmp_path / "run", *SHORT)
    reference = tmp_path / "reference"
    assert train.main(argv(toyrs_root, reference, *SHORT)) == 0

    ready = tmp_path / "ready"
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen([sys.executable, "-c", KILLABLE.format(repo=str(REPO_ROOT)), str(ready), *args],
                                 cwd=REPO_ROOT, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    try:
        wait_for(ready.exists, "the first run's epoch-1 checkpoint", first)
        lock = tmp_path / "run" / train.LOCK_FILE
        assert lock.read_text().strip() == str(first.pid)

        second = run_train(args)
        assert second.returncode == 2
        line = one_error(second.stderr)
        assert line == (f"error: {tmp_path / 'run'} is in use by another run (process {first.pid}): wait for it to "
                        "finish, or give this run another --output-dir")  # fmt: skip
        assert len((second.stdout + second.stderr).splitlines()) <= 3
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=WAIT_S)
    assert first.returncode == -signal.SIGKILL
    assert lock.read_text().strip() == str(first.pid)  # left behind by the killed process

    third = run_train(args)
    assert third.returncode == 0, third.stderr
    assert f"Taking over the lock {lock} of process {first.pid}, which ended without releasing it" in third.stdout
    assert "Resumed prompt_learner" in third.stdout and "continuing at epoch 2" in third.stdout
    assert lock.read_text() == ""  # released normally

    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.glob("log.txt*")) == ["log.txt"]  # no log.txt-<time>
    log = (run_dir / "log.txt").read_text()
    assert log.count(train.RESUME_MARK) == 1  # the refused second process never wrote into it
    killed, resumed = log.split(train.RESUME_MARK)
    assert "epoch [1/2]" in killed and "* accuracy:" not in killed
    assert "epoch [2/2]" in resumed and "epoch [1/2]" not in resumed
    accuracy = json.loads((run_dir / "results.json").read_text())["accuracy"]
    assert R.parse_log(log)[0] == pytest.approx(accuracy, abs=0.05)  # what CoOp's parse scripts read (1 decimal)

    a = torch.load(reference / "prompt_learner" / "model.pth.tar-2", weights_only=True)
    b = torch.load(run_dir / "prompt_learner" / "model.pth.tar-2", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


@requires_dassl
def test_fixed_temporary_names_cannot_collide(toyrs_root, tmp_path, capsys):
    """Case 3: temporary files are unique per process. Entries with the old fixed temporary names (which a second
    writer would have shared) are left alone and do not stop the run. Case 10: the CPU precision fallback is said
    once, in the run's header (no warning of its own), and recorded in results.json with the toy backbone."""
    out = tmp_path / "run"
    for stale in (out / "results.json.tmp", out / "prompt_learner" / "model.pth.tar-2.tmp"):
        stale.mkdir(parents=True)  # a directory: writing a file of that name fails
    assert train.main(argv(toyrs_root, out, *SHORT)) == 0
    result = json.loads((out / "results.json").read_text())
    assert torch.load(out / "prompt_learner" / "model.pth.tar-2", weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in out.rglob("*.tmp")) == ["model.pth.tar-2.tmp", "results.json.tmp"]
    stdout = capsys.readouterr().out
    notes = [line for line in stdout.splitlines() if "needs a GPU" in line]
    assert notes == [f"[INFO train] CoOp (vit_b16) on ToyRS (all classes), 2 shots, seed 1, backbone toy, precision "
                     f"fp32 (fp16 needs a GPU), output {out}"]  # fmt: skip
    assert result["precision"] == "fp32" and result["backbone"] == "toy"


# =========================================================================================== case 4
def test_few_shot_file_is_verified(tmp_path):
    """Case 4: a few-shot file edited by hand (an entry relabelled, a test image moved into train) is refused; one
    written before files had a checksum is accepted only when it holds the seed's draws."""
    splits = {
        "train": [(f"c{c}/t{i}.png", c, f"c{c}") for c in range(3) for i in range(6)],
        "val": [(f"c{c}/v{i}.png", c, f"c{c}") for c in range(3) for i in range(3)],
        "test": [(f"c{c}/x{i}.png", c, f"c{c}") for c in range(3) for i in range(3)],
    }
    drawn = few_shot(splits, 2, seed=1, cache_dir=tmp_path)
    path = tmp_path / "shot_2-seed_1.json"
    data = json.loads(path.read_text())
    assert data["checksum"].startswith("sha256:")
    assert few_shot(splits, 2, seed=1, cache_dir=tmp_path) == drawn  # read back, verified

    edits = {
        "relabelled": lambda d: d["train"][0].__setitem__(1, 2),
        "test image in train": lambda d: d["train"].__setitem__(0, list(splits["test"][0])),
    }
    for name, edit in edits.items():
        changed = json.loads(json.dumps(data))
        edit(changed)
        path.write_text(json.dumps(changed))
        with pytest.raises(SplitError) as err:
            few_shot(splits, 2, seed=1, cache_dir=tmp_path)
        assert str(err.value) == (
            f"Few-shot file {path} was changed after it was drawn (its checksum does not match). Delete {path}: "
            "the next run draws it again from the split with seed 1 (the original draws)."
        ), name

    legacy = {k: v for k, v in data.items() if k != "checksum"}
    path.write_text(json.dumps(legacy))
    assert few_shot(splits, 2, seed=1, cache_dir=tmp_path) == drawn
    legacy["train"][0][1] = 2
    path.write_text(json.dumps(legacy))
    with pytest.raises(SplitError, match="differs from the draws of seed 1: it was edited"):
        few_shot(splits, 2, seed=1, cache_dir=tmp_path)


@requires_dassl
def test_edited_few_shot_file_stops_train(toyrs_root, tmp_path, capsys):
    root = copy_toyrs(toyrs_root, tmp_path)
    spec = resolve_dataset("toyrs", root)
    few_shot(load_splits(spec), 2, 1, spec.fewshot_dir)
    path = spec.fewshot_dir / "shot_2-seed_1.json"
    data = json.loads(path.read_text())
    data["train"][0][1] = (data["train"][0][1] + 1) % 8
    path.write_text(json.dumps(data))
    line = main_refuses(argv(root, tmp_path / "out", *SHORT), capsys)
    assert line == f"error: Few-shot file {path} was changed after it was drawn (its checksum does not match). " \
                   f"Delete {path}: the next run draws it again from the split with seed 1 (the original draws)."


@requires_dassl
def test_class_folder_not_in_the_split_is_refused(toyrs_root, tmp_path, capsys):
    """Case 4: a class folder added after the split was made is not ignored silently."""
    root = copy_toyrs(toyrs_root, tmp_path)
    make_tree(root / "ToyRS" / "images", ["lighthouse"], 5)
    line = main_refuses(argv(root, tmp_path / "out", *SHORT), capsys)
    assert line == (f"error: 1 class folders under {root / 'ToyRS' / 'images'} are not in the split "
                    f"{root / 'ToyRS' / 'split_generated.json'}: lighthouse. The classes of ToyRS are fixed by the "
                    "catalogue: move them out of images/.")  # fmt: skip


def test_generic_dataset_ready_line_and_new_class_folder(tmp_path, capsys):
    """Case 4: the "ready" line names the dataset (its folder), not ImageFolderRS; a class folder added to a
    generated split is refused with the way to include it."""
    yaml = tmp_path / "scenes.yaml"
    yaml.write_text('DATASET:\n  NAME: "ImageFolderRS"\n  FOLDER: "MyScenes"\n')
    images = tmp_path / "MyScenes" / "images"
    make_tree(images, ["field", "lake", "town"], 10)
    assert prepare_data.main([str(yaml), "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"MyScenes is ready in {tmp_path / 'MyScenes'}: 3 classes")
    make_tree(images, ["port"], 10)
    assert prepare_data.main([str(yaml), "--root", str(tmp_path)]) == 1
    split = tmp_path / "MyScenes" / "split_generated.json"
    assert one_error(capsys.readouterr().err) == (
        f"error: 1 class folders under {images} are not in the split {split}: port. To train on them, delete "
        f"{split} (the next run generates the split again from the folders on disk, which changes every draw); "
        "otherwise move them out of images/."
    )
    split.unlink()
    assert prepare_data.main([str(yaml), "--root", str(tmp_path)]) == 0
    assert "4 classes" in capsys.readouterr().out


# =========================================================================================== case 5
@requires_dassl
def test_more_shots_than_images_is_recorded(toyrs_root, tmp_path, capsys):
    """Case 5: 64 shots when each ToyRS class has 29 training images: a loud warning, and results.json records the
    29 per class next to the 64 asked for."""
    out = tmp_path / "zs"
    assert train.main(argv(toyrs_root, out, "DATASET.NUM_SHOTS", "64", trainer="ZeroshotCLIP", config=ZS_CFG,
                           eval_only=True)) == 0  # fmt: skip
    spec = resolve_dataset("toyrs", toyrs_root)
    train_counts: dict[str, int] = {}
    for _, _, cls in load_splits(spec)["train"]:
        train_counts[spec.display_name(cls)] = train_counts.get(spec.display_name(cls), 0) + 1
    assert set(train_counts.values()) == {29}
    result = json.loads((out / "results.json").read_text())
    assert result["shots"] == 64 and result["shots_per_class"] == train_counts
    assert "[WARNING datasets.remote_sensing] !!! DATASET.NUM_SHOTS is 64, but 8 of 8 classes have fewer training " \
           "images" in capsys.readouterr().out


@requires_dassl
@pytest.mark.parametrize("seed", ["0", "-3", None])
def test_seed_must_be_positive(seed, toyrs_root, tmp_path, capsys):
    """Case 5: --seed 0 (CoOp's command line made it -1, unseeded), negative seeds and no seed are refused."""
    line = main_refuses(argv(toyrs_root, tmp_path / "out", *SHORT, seed=seed), capsys)
    shown = seed if seed is not None else "-1"
    assert line.startswith(f"error: SEED is {shown}: pass --seed N with a positive integer (the protocols use 1 2 3)")
    assert not (tmp_path / "out").exists()  # refused before anything is written


@requires_dassl
def test_zero_epochs_is_refused(toyrs_root, tmp_path, capsys):
    """Case 5: OPTIM.MAX_EPOCH 0 wrote results of an untrained model; now it names --eval-only."""
    line = main_refuses(argv(toyrs_root, tmp_path / "out", "OPTIM.MAX_EPOCH", "0"), capsys)
    assert line == ("error: OPTIM.MAX_EPOCH is 0: a training run needs at least 1 epoch; to evaluate a model without "
                    "training it, pass --eval-only (with --model-dir to load trained weights).")  # fmt: skip


# =========================================================================================== case 6 + 10
@requires_dassl
def test_missing_data_root_is_a_short_error(tmp_path):
    """Case 6: `python train.py` with a missing data root: a short header, one error line with the fix, exit 2,
    at most 15 lines; the config and environment only in log.txt, with the error. Case 10: no pkg_resources
    warning (which `import clip` alone does print in this environment)."""
    assert "pkg_resources is deprecated" in subprocess.run(
        [sys.executable, "-c", "import clip"], capture_output=True, text=True, timeout=WAIT_S).stderr
    out = tmp_path / "out"
    proc = run_train(argv(tmp_path / "nodata", out, *SHORT))
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 15, lines
    line = one_error(proc.stderr)
    assert line == (f"error: Dataset ToyRS not found: {tmp_path / 'nodata' / 'ToyRS'} does not exist. Prepare it "
                    f"with: python -m tools.prepare_data toyrs --root {tmp_path / 'nodata'}")  # fmt: skip
    assert proc.stderr.splitlines()[1] == f"(log: {out / 'log.txt'}; BIMORS_DEBUG=1 shows the traceback)"
    assert proc.stdout.splitlines()[0] == (f"[INFO train] CoOp (vit_b16) on ToyRS (all classes), 2 shots, seed 1, "
                                           f"backbone toy, precision fp32 (fp16 needs a GPU), output {out}")  # fmt: skip
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "pkg_resources" not in text and "Environment" not in text
    log = (out / "log.txt").read_text()
    assert "Config:\n" in log and "Environment:\n" in log and "PyTorch version" in log
    assert log.rstrip().endswith(line)

    debug = run_train(argv(tmp_path / "nodata", tmp_path / "debug", *SHORT), env={**CHILD_ENV, "BIMORS_DEBUG": "1"})
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "DatasetNotFoundError" in debug.stderr


@requires_dassl
@pytest.mark.parametrize("opts, expected", [
    (["MODEL.BACKBONE.NAME", "ViT-X/99"], "error: Unknown backbone 'ViT-X/99'. Valid names: "),
    (["MODEL.BACKBONE.NAME", "ViT-B/16", "MODEL.BACKBONE.PATH", "/nonexistent/clip.pt"],
     "error: MODEL.BACKBONE.PATH /nonexistent/clip.pt does not exist. Point it at an OpenAI .pt file"),
])  # fmt: skip
def test_backbone_errors_are_one_line(opts, expected, toyrs_root, tmp_path, capsys):
    """Case 6: a backbone that cannot be loaded is an expected error (one line, exit 2), not a traceback."""
    assert main_refuses(argv(toyrs_root, tmp_path / "out", *SHORT, *opts), capsys).startswith(expected)


def test_smoke_run_table_says_its_numbers_mean_nothing(tmp_path, capsys, caplog):
    """Case 10: runs with the toy backbone (as results.json records them) get the smoke-run warning in the table
    and in the log (stderr); runs with a real backbone do not."""
    for backbone, folder in (("toy", "smoke"), ("ViT-B/16", "real")):
        for seed in (1, 2):
            run_dir = tmp_path / folder / f"seed{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "results.json").write_text(json.dumps({
                "trainer": "CoOp", "dataset": "ToyRS", "protocol": "fewshot", "shots": 2, "seed": seed,
                "backbone": backbone, "config": "vit_b16", "accuracy": 40.0 + seed}))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="tools.results"):
        assert R.main([str(tmp_path / "smoke")]) == 0
    out = capsys.readouterr().out
    assert f"- {R.SMOKE_TITLE} (CoOp (vit_b16, toy)): they test the pipeline, they are not results." in out
    assert f"{R.SMOKE_TITLE} (toy backbone rows)" in caplog.messages
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tools.results"):
        assert R.main([str(tmp_path / "real")]) == 0
    assert "SMOKE" not in capsys.readouterr().out and not any("SMOKE" in m for m in caplog.messages)


# =========================================================================================== case 7
def test_split_checksum_advice_names_options_that_exist(tmp_path, capsys):
    """Case 7: the checksum error no longer suggests a --allow-split-mismatch that does not exist."""
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": [["a/1.png", 0, "a"]], "val": [], "test": []}))
    with pytest.raises(ChecksumError) as err:
        read_split_file(path, "0" * 32, prepare="python -m tools.prepare_data fake --root R")
    text = str(err.value)
    assert "--allow-split-mismatch" not in text
    assert "delete it, then run `python -m tools.prepare_data fake --root R`" in text
    assert "add `DATASET.ALLOW_SPLIT_MISMATCH True` to the train.py command" in text
    assert "(tools.prepare_data: --allow-checksum-mismatch)" in text
    assert "ALLOW_SPLIT_MISMATCH" in add_dataset_config(CfgNode()).DATASET  # the advised train.py key exists
    assert read_split_file(path, "0" * 32, allow_mismatch=True)["train"] == [("a/1.png", 0, "a")]  # and works
    with pytest.raises(SystemExit):
        prepare_data.main(["--help"])
    assert "--allow-checksum-mismatch" in capsys.readouterr().out  # prepare_data's option exists


@requires_dassl
def test_missing_and_truncated_images_are_restored_by_verify(toyrs_root, tmp_path, capsys):
    """Case 7: missing images used to advise a prepare_data rerun that skipped (images/ exists). The advice is now
    --verify, which checks every image and rebuilds the damaged and missing ones."""
    root = copy_toyrs(toyrs_root, tmp_path)
    images = root / "ToyRS" / "images"
    gone, cut = images / "forest" / "forest_007.png", images / "river" / "river_011.png"
    gone.unlink()
    cut.write_bytes(cut.read_bytes()[:60])
    line = main_refuses(argv(root, tmp_path / "out", *SHORT), capsys)
    assert "forest/forest_007.png" in line and line.endswith(
        f"Run `python -m tools.prepare_data toyrs --root {root} --verify`: it checks every image and restores "
        "missing or damaged ones from the download")

    assert prepare_data.main(["toyrs", "--root", str(root), "--verify"]) == 0
    original = toyrs_root / "ToyRS" / "images"
    assert gone.read_bytes() == (original / "forest" / "forest_007.png").read_bytes()
    assert cut.read_bytes() == (original / "river" / "river_011.png").read_bytes()
    assert not (root / "ToyRS" / "images.broken").exists()


def test_verify_restores_a_damaged_hard_linked_image_from_the_archive(tmp_path, monkeypatch):
    """Case 7: arranged images are hard links into the extracted download, so a damaged image is damaged there
    too: --verify extracts the (md5-checked) archive again."""
    add_row(monkeypatch)
    downloads = tmp_path / "FakeRS" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "fake.zip").write_bytes(zip_bytes({f"{c}/{c}_{i}.png": PNG for c in CLASSES for i in range(10)}))
    spec, _ = prepare_data.prepare("FakeRS", tmp_path)
    damaged = spec.image_dir / "lake" / "lake_3.png"
    extracted = downloads / "fake.zip.extracted" / "lake" / "lake_3.png"
    with open(damaged, "r+b") as fh:  # truncate in place: the extracted copy (same inode) is damaged too
        fh.truncate(20)
    assert extracted.stat().st_size == 20
    prepare_data.prepare("FakeRS", tmp_path)  # without --verify only presence is checked
    prepare_data.prepare("FakeRS", tmp_path, verify=True)
    assert damaged.read_bytes() == PNG and extracted.read_bytes() == PNG


def test_damaged_checkpoints_are_named_for_what_they_are(tmp_path):
    """Case 7: a truncated or foreign file is "damaged or not a checkpoint", a bare tensor is not an IndexError."""
    from trainers.base import CheckpointError, load_checkpoint_file

    good = tmp_path / "good.pth.tar"
    torch.save({"state_dict": {"ctx": torch.zeros(2, 3)}, "epoch": 1}, good)
    cases = {
        "truncated.pth.tar": good.read_bytes()[: len(good.read_bytes()) // 2],
        "text.pth.tar": b"this is not a checkpoint\n",
        "empty.pth.tar": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=r"is damaged or not a checkpoint \(.*\): delete it, or restore it"):
            load_checkpoint_file(tmp_path / name)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth.tar")
    with pytest.raises(CheckpointError, match=r"holds a Tensor, not a checkpoint \(a dict with 'state_dict'"):
        load_checkpoint_file(tmp_path / "tensor.pth.tar")
    torch.save({"ctx": torch.zeros(3)}, tmp_path / "bare.pth.tar")
    with pytest.raises(CheckpointError, match="holds a dict without 'state_dict', not a checkpoint"):
        load_checkpoint_file(tmp_path / "bare.pth.tar")
    torch.save({"state_dict": {}, "epoch": 1, "meta": Path("x")}, tmp_path / "pickled.pth.tar")
    with pytest.raises(CheckpointError, match="holds pickled Python objects, which are not loaded"):
        load_checkpoint_file(tmp_path / "pickled.pth.tar")
    assert load_checkpoint_file(good)["epoch"] == 1


@requires_dassl
def test_damaged_checkpoint_stops_evaluation_with_one_line(toyrs_root, tmp_path, capsys):
    folder = tmp_path / "model" / "prompt_learner"
    folder.mkdir(parents=True)
    torch.save(torch.zeros(3), folder / "model.pth.tar-1")
    line = main_refuses(argv(toyrs_root, tmp_path / "out", eval_only=True, model_dir=tmp_path / "model",
                             load_epoch=1), capsys)  # fmt: skip
    assert line.startswith(f"error: Checkpoint {folder / 'model.pth.tar-1'} holds a Tensor, not a checkpoint")


@requires_dassl
def test_unreadable_image_is_named_with_the_fix(toyrs_root, tmp_path, capsys):
    """Case 7: a truncated image crashed the loader without naming it; now one line names it and --verify, also
    when it is read in a DataLoader worker process."""
    root = copy_toyrs(toyrs_root, tmp_path)
    spec = resolve_dataset("toyrs", root)
    rel = load_splits(spec)["test"][0][0]
    image = spec.image_dir / rel
    image.write_bytes(image.read_bytes()[:70])
    args = argv(root, tmp_path / "out", "DATALOADER.NUM_WORKERS", "1", trainer="ZeroshotCLIP", config=ZS_CFG,
                eval_only=True)  # fmt: skip
    line = main_refuses(args, capsys)
    assert line.startswith(f"error: cannot read image {image} (")
    assert line.endswith(f"Run `python -m tools.prepare_data toyrs --root {root} --verify`: it checks every image "
                         "and restores missing or damaged ones from the download.")  # fmt: skip


# =========================================================================================== case 8
@requires_dassl
def test_read_only_data_root_puts_few_shot_files_in_the_user_cache(toyrs_root, tmp_path, monkeypatch):
    """Case 8 (dataset side): a new shot count on a read-only data root no longer fails: the few-shot file goes
    to the user cache, with a note, and is found there afterwards."""
    root = copy_toyrs(toyrs_root, tmp_path)
    cache = tmp_path / "cache"
    prefix = read_only(root)
    env = {**CHILD_ENV, storage.CACHE_ENV: str(cache)}
    proc = run_train(argv(root, tmp_path / "out", "DATASET.NUM_SHOTS", "3", trainer="ZeroshotCLIP", config=ZS_CFG,
                          eval_only=True), env=env, prefix=prefix)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    folder = root / "ToyRS" / "split_fewshot"
    [written] = cache.glob("*/split_fewshot/shot_3-seed_1.json")
    assert re.fullmatch(r"ToyRS-[0-9a-f]{10}", written.parent.parent.name)
    assert f"{folder} is read-only: the few-shot split goes to {written} instead" in proc.stdout, proc.stdout
    assert not (folder / "shot_3-seed_1.json").exists()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["shots_per_class"] == {
        name: 3 for name in ("farmland", "water", "road", "buildings", "forest", "desert", "parking lot", "river")}
    monkeypatch.setenv(storage.CACHE_ENV, str(cache))
    spec = resolve_dataset("toyrs", root)
    assert storage.existing(spec.fewshot_dir / written.name) == written  # found there by the next run


def test_read_only_data_root_puts_the_caption_store_in_the_user_cache(toyrs_root, tmp_path, monkeypatch):
    """Case 8 (dataset side): tools.captions on a read-only data root writes the store to the user cache (with a
    note), where the trainer's loader finds it."""
    from datasets.captions import load_caption_features

    root = copy_toyrs(toyrs_root, tmp_path)
    spec = resolve_dataset("toyrs", root)
    few_shot(load_splits(spec), 1, 1, spec.fewshot_dir)  # drawn while writable: only the captions are new
    cache = tmp_path / "cache"
    prefix = read_only(root)
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "tools.captions", "toyrs", "--root", str(root), "--captioner", "toy-blip2",
         "--encoder", "toy-bert", "--subset", "protocol", "--shots", "1", "--seeds", "1", "--workers", "0"],
        cwd=REPO_ROOT, env={**CHILD_ENV, storage.CACHE_ENV: str(cache)}, capture_output=True, text=True,
        timeout=WAIT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    primary = root / "ToyRS" / "captions"
    monkeypatch.setenv(storage.CACHE_ENV, str(cache))
    fallback = storage.fallback_for(primary)
    assert f"{primary} is read-only: caption stores go to {fallback} instead" in proc.stderr
    assert not primary.exists() or not any(primary.iterdir())
    store = load_caption_features(root / "ToyRS", "toy-blip2", "toy-bert", dataset="toyrs")
    assert store.path == fallback / "toy-blip2__toy-bert.safetensors" and len(store) == 160


# =========================================================================================== case 11
def _plot_tables(tmp_path: Path) -> list:
    def run(trainer, sub, seed, acc):
        run_dir = tmp_path / trainer / sub / f"seed{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({
            "trainer": trainer, "dataset": "ToyRS", "protocol": "base2new", "subsample": sub, "shots": 2,
            "seed": seed, "backbone": "toy", "config": "c", "accuracy": acc}))  # fmt: skip

    for seed, (b, n) in {1: (40.0, 30.0), 2: (46.0, 20.0), 3: (43.0, 25.0)}.items():
        run("BiMoRS", "base", seed, b)
        run("BiMoRS", "new", seed, n)
    run("CoOp", "base", 1, 33.0)  # one seed only: no error bar, and incomplete (seeds 2 and 3 missing)
    run("CoOp", "new", 1, 22.0)
    return R.build_tables(R.aggregate(R.collect_runs([tmp_path]).runs))


def test_plot_is_as_honest_as_the_table(tmp_path):
    """Case 11: a single-seed group has no (flat, std-0-looking) error bar and is labelled n=1; the table's †
    marks incomplete bars; the heading names protocol, backbone and the smoke run; the legend is under the
    panels, at a readable size, inside the figure."""
    from matplotlib.container import BarContainer

    tables = _plot_tables(tmp_path / "runs")
    fig = R.figure(tables)
    sub = fig.subfigs[0]
    heading = sub._suptitle.get_text()
    assert heading.startswith("base2new: accuracy (%) on base and new classes") and "backbone toy" in heading
    assert R.SMOKE_TITLE in heading.replace("\n", " ")
    base_panel = sub.axes[0]
    assert base_panel.get_title() == "Base"
    bars = {c.get_label(): c for c in base_panel.containers if isinstance(c, BarContainer)}
    coop, bimors = bars["CoOp (c, toy)"], bars["BiMoRS (c, toy)"]
    assert coop.errorbar.lines[2][0].get_segments()[0].size == 0  # no error bar at all for the single seed
    segment = bimors.errorbar.lines[2][0].get_segments()[0]
    std = statistics.stdev([40.0, 46.0, 43.0])
    assert segment[:, 1].tolist() == pytest.approx([43.0 - std, 43.0 + std])
    assert [t.get_text() for t in base_panel.texts] == ["n=1" + R.INCOMPLETE_MARK]
    legend = sub.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["CoOp (c, toy)", "BiMoRS (c, toy)"]
    assert legend.get_texts()[0].get_fontsize() >= 9.0  # readable: no x-small legend in a side strip
    assert "n=1: a single seed, so no error bar" in legend.get_title().get_text()
    out = R.plot(tables, tmp_path / "plot.png")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box, frame = legend.get_window_extent(renderer), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
