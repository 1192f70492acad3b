"""Sweeps (tools/sweep.py) and the local executor (tools/executors/local.py).

The pool runs real processes: small Python programs that record what they saw (fake GPU ids on this CPU
machine), the fake interpreter of conftest.py for the command line, and real train.py runs on ToyRS for the
kill-and-rerun test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, requires_dassl

from tools.executors.local import make_slots, run_pool, summarize
from tools.planner import PHASES, TRAINERS, Step

SWEEPS = REPO_ROOT / "configs" / "sweeps"


def sweep_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m tools.sweep ARGS`` (the timeout only guards against a hang)."""
    base = {k: v for k, v in os.environ.items() if k not in ("DATA", "CUDA_VISIBLE_DEVICES")}
    return subprocess.run([sys.executable, "-m", "tools.sweep", *args], cwd=REPO_ROOT, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def table(text: str, first: str) -> dict[str, list[str]]:
    """Rows of the table whose header starts with ``first``: {row name: cells}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first])
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        name, *cells = line.split()
        rows[name] = cells
    return rows


def write_sweep(path: Path, **node) -> Path:
    path.write_text(yaml.safe_dump(node))
    return path


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------- plan
def test_paper_sweep_plan_counts_runs_per_phase(tmp_path):
    proc = sweep_cli("plan", str(SWEEPS / "bimors_paper.yaml"), "--output", str(tmp_path / "paper"))
    assert proc.returncode == 0, proc.stderr
    phases = table(proc.stdout, "phase")
    # 5 trainers x 3 seeds: base2new 4 datasets x (train + eval); each transfer 1 training + 3 evaluations
    assert phases["train"] == ["90", "0", "0", "90"] and phases["eval"] == ["150", "0", "0", "150"]
    assert phases["prepare"] == ["8", "-", "-", "8"]  # BiMoRS's captions of the 8 datasets
    assert phases["features"] == ["8", "-", "-", "8"]  # the feature cache of the 8 datasets, filled once each
    assert phases["total"] == ["256", "0", "0", "256"]
    protocols = table(proc.stdout, "protocol")
    assert protocols == {"base2new": ["60", "60", "120"], "crossdata": ["15", "45", "60"], "domaingen": ["15", "45", "60"]}
    assert "DATA is not set" in proc.stdout  # plan needs no data; the commands show <DATA>


def test_smoke_sweep_plan_lists_its_commands(tmp_path):
    proc = sweep_cli("plan", str(SWEEPS / "smoke.yaml"), "--output", str(tmp_path / "smoke"), "--data",
                     str(tmp_path / "data"), "--commands")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # ToyRS + captions, the feature cache, 18 trainings, 18 evals
    assert table(proc.stdout, "phase")["total"] == ["38", "0", "0", "38"]
    commands = [line.split() for line in proc.stdout.splitlines() if line.startswith(sys.executable)]
    assert [c[1:3] for c in commands[:2]] == [["-m", "tools.prepare_data"], ["-m", "tools.captions"]]
    assert commands[2][1:4] == ["-m", "tools.features", "fill"]
    trains = [c for c in commands if c[1] == "train.py"]
    assert len(trains) == 36 and all(c[c.index("--root") + 1] == str(tmp_path / "data") for c in trains)
    assert {c[c.index("--trainer") + 1] for c in trains} == set(TRAINERS)  # every trainer of the suite
    # one fill per trainer reading the cache and per subsample, whatever the seed; none for the prompted encoders
    fills = " ".join(commands[2]).split(" --and ")
    cached = {name for name, spec in TRAINERS.items() if spec.cached_features}
    assert len(fills) == 2 * len(cached) and cached == {"ZeroshotCLIP", "CoOp", "CoCoOp", "KgCoOp", "APPLeNet",
                                                        "CLIP_Adapter", "BiMoRS"}  # fmt: skip
    assert {f.split("--trainer ")[1].split()[0] for f in fills} == cached


@pytest.mark.parametrize(
    ("node", "args", "message"),
    [
        ({"trainers": ["CoOp"], "protocols": {"base2new": {"datasets": ["toyrs"]}}, "seed": [1]}, [],
         "unknown key 'seed' in the sweep"),
        ({"trainers": ["CoOp"], "protocols": {"base2novel": {"datasets": ["toyrs"]}}}, [], "unknown protocol 'base2novel'"),
        ({"trainers": ["CoOp"], "protocols": {"crossdata": {"datasets": ["toyrs"]}}}, [], "takes 'source' and 'targets'"),
        ({"trainers": ["Coop"], "protocols": {"base2new": {"datasets": ["toyrs"]}}}, [], "unknown trainer 'Coop'"),
        ({"trainers": ["CoOp"], "protocols": {"base2new": {"datasets": ["toyrs"]}}}, ["--trainers", "MaPLe"],
         "has no trainer MaPLe; its trainers: CoOp"),
        ({"trainers": ["CoOp", {"trainer": "CoOp", "opts": {"OPTIM.LR": 0.1}}], "protocols": {"base2new": {"datasets": ["toyrs"]}}},
         [], "with different commands"),  # the same folders, other options
        ({"trainers": ["CoOp"], "protocols": {"base2new": {"datasets": ["toyrs"]}}, "opts": {"DATASET.NUM_SHOTS": 4}}, [],
         "set the shots with SHOTS=N"),
    ],
)  # fmt: skip
def test_bad_sweep_is_one_error_line(tmp_path, node, args, message):
    path = write_sweep(tmp_path / "bad.yaml", **node)
    proc = sweep_cli("plan", str(path), "--output", str(tmp_path / "out"), *args)
    assert message in error_line(proc)


def test_features_phase_fills_each_dataset_once_before_the_runs_that_read_it(tmp_path):
    from tools.planner import recorded_changes
    from tools.sweep import load_sweep

    node = {"backbone": "toy", "seeds": [1, 2], "trainers": ["CoOp", "MaPLe", "BiMoRS"],
            "protocols": {"base2new": {"datasets": ["toyrs"]}, "crossdata": {"source": "patternnet", "targets": ["rsicd"]}}}
    plan = load_sweep(write_sweep(tmp_path / "s.yaml", **node)).plan()
    features = {s.key: s for s in plan.steps if s.phase == "features"}
    assert set(features) == {"features/toyrs", "features/patternnet", "features/rsicd"}
    assert all(s.deps == (f"prepare/{s.dataset}",) for s in features.values())  # after BiMoRS's captions
    for run in plan.runs:
        reads = run.output_dir.parts[-3] != "MaPLe"  # MaPLe prompts its image encoder: it reads no cached features
        assert (f"features/{run.dataset}" in run.deps) == reads, run.key
    fills = {k: " ".join(s.commands[0]).split(" --and ") for k, s in features.items()}
    # one fill per trainer reading the cache and per evaluated split, shared by both seeds
    assert len(fills["features/toyrs"]) == 4 and len(fills["features/patternnet"]) == len(fills["features/rsicd"]) == 2
    assert all("--seed 1 " in f and "--trainer MaPLe" not in f for f in fills["features/toyrs"])
    order = [s.phase for s in plan.steps]  # prepare steps, then the fills, then the runs
    assert order == [p for p in PHASES[:2] for _ in range(order.count(p))] + [s.phase for s in plan.runs]

    off = load_sweep(write_sweep(tmp_path / "off.yaml", **node, opts={"BENCH.FEATURE_CACHE": False})).plan()
    assert not [s for s in off.steps if s.phase == "features"] and not any("features/" in d for s in off.runs for d in s.deps)
    run_dir = tmp_path / "run"  # the switch changes no result: a run recorded with the cache on is reused with it off
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("BENCH:\n  FEATURE_CACHE: true\nSEED: 1\n")
    (run_dir / "results.json").write_text("{}")
    assert recorded_changes(run_dir, {"BENCH.FEATURE_CACHE": False, "SEED": 1}, None) == []


# ------------------------------------------------------------------------------------ the local pool
def python_step(key: str, code: str, *args: str, deps: tuple[str, ...] = ()) -> Step:
    return Step(key, "train", ((sys.executable, "-c", code, *args),), deps=deps)


GPU_CHILD = r"""
import os, sys, time
folder, key, group = sys.argv[1], sys.argv[2], int(sys.argv[3])
gpu = os.environ["CUDA_VISIBLE_DEVICES"]
busy = os.path.join(folder, f"gpu-{gpu}.busy")
fd = os.open(busy, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another run holds this GPU now
open(os.path.join(folder, f"started-{key}"), "w").close()
deadline = time.monotonic() + 600  # a hang guard
while sum(n.startswith("started-") for n in os.listdir(folder)) < 2 * group:  # both slots busy at once
    if time.monotonic() > deadline:
        sys.exit(4)
    time.sleep(0.01)
with open(os.path.join(folder, f"{key}.json"), "w") as fh:
    fh.write('{"gpu": "%s", "group": %d}' % (gpu, group))
os.close(fd)
os.unlink(busy)
"""


def test_each_child_sees_only_its_slots_gpu(tmp_path):
    """Fake GPU ids 3 and 7: four runs, two at a time; each sees one id, never one that a running run holds."""
    slots = make_slots("3,7", None)
    steps = [python_step(f"run{i}", GPU_CHILD, str(tmp_path), f"run{i}", str(i // 2 + 1)) for i in range(4)]
    result = run_pool(steps, slots, tmp_path)
    assert sorted(result.done) == [s.key for s in steps] and not result.failed, result.failed
    seen = [json.loads((tmp_path / f"run{i}.json").read_text()) for i in range(4)]
    for group in (1, 2):  # the two runs of a group ran at the same time: different GPUs
        assert sorted(r["gpu"] for r in seen if r["group"] == group) == ["3", "7"]
    assert not list(tmp_path.glob("gpu-*.busy"))


def test_slots_default_to_the_visible_gpus_else_one_cpu_slot():
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in make_slots(None, None, {"CUDA_VISIBLE_DEVICES": "2,5"})] == ["2", "5"]
    cpu = make_slots(None, 3, {"OMP_NUM_THREADS": "1"})
    assert [s.env for s in cpu] == [{"CUDA_VISIBLE_DEVICES": ""}] * 3  # the caller's OMP_NUM_THREADS is kept
    assert make_slots(None, None, {"CUDA_VISIBLE_DEVICES": ""})[0].env["CUDA_VISIBLE_DEVICES"] == ""


def test_failed_step_skips_its_dependents_only(tmp_path):
    ok = "import sys; open(sys.argv[1], 'w').close()"
    steps = [
        python_step("a", "import sys; print('boom'); sys.exit(3)"),
        python_step("b", ok, str(tmp_path / "b"), deps=("a",)),
        python_step("c", ok, str(tmp_path / "c")),
        python_step("d", ok, str(tmp_path / "d"), deps=("b",)),
        python_step("e", ok, str(tmp_path / "e"), deps=("c", "outside-the-pool")),  # a dependency done earlier
    ]
    result = run_pool(steps, make_slots(None, 2), tmp_path)
    assert sorted(result.done) == ["c", "e"]
    assert result.failed == {"a": (3, tmp_path / "logs" / "a.log")}
    assert result.skipped == {"b": "a", "d": "b"}
    assert "boom" in (tmp_path / "logs" / "a.log").read_text()
    assert not (tmp_path / "b").exists() and (tmp_path / "c").exists()
    lines = summarize(result, 1.0)
    assert f"failed (exit 3): a: log {tmp_path / 'logs' / 'a.log'}" in lines[1]
    assert result.exit_code == 1


POOL = r"""
import sys
from pathlib import Path
from tools.executors.local import make_slots, run_pool, summarize
from tools.planner import Step
folder = Path(sys.argv[1])
child = ("import os, subprocess, sys, time; "
         "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
         "open(sys.argv[1] + '.tmp', 'w').write(f'{os.getpid()} {p.pid}'); os.rename(sys.argv[1] + '.tmp', sys.argv[1]); "
         "time.sleep(600)")
steps = [Step(f"s{i}", "train", ((sys.executable, "-c", child, str(folder / f"pids{i}")),)) for i in range(3)]
result = run_pool(steps, make_slots(None, 2), folder)
print("\n".join(summarize(result, 0.0)))
sys.exit(result.exit_code)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _wait_for(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` (a file appearing, a process ending) until it holds; ``timeout`` guards against a hang."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_children_and_their_children(tmp_path, sig):
    pool = subprocess.Popen([sys.executable, "-c", POOL, str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for(lambda: (tmp_path / "pids0").exists() and (tmp_path / "pids1").exists(), 600, "two running steps")
        pids = [int(p) for i in (0, 1) for p in (tmp_path / f"pids{i}").read_text().split()]
        pool.send_signal(sig)
        out, err = pool.communicate(timeout=600)
    finally:
        pool.kill()
    assert pool.returncode == 128 + sig, err
    assert "interrupted" in out and "2 running, 1 not started; run the same command again" in out
    _wait_for(lambda: not any(_alive(p) for p in pids), 600, "the stopped processes to end")
    assert not (tmp_path / "pids2").exists()


@pytest.mark.parametrize(("text", "minutes"), [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-00", 1440),
                                               ("1-2:30", 1590), ("0:00:59", 1)])  # fmt: skip
def test_slurm_time_limits_in_minutes(text, minutes):
    slurm = pytest.importorskip("tools.executors.slurm", reason="submitit is not installed")
    assert slurm.parse_time(text) == minutes


# ------------------------------------------------------------------------------- the command line
def test_run_with_fake_gpus_then_again_launches_nothing(tmp_path, fake_python):
    env, log = fake_python
    sweep = write_sweep(tmp_path / "s.yaml", backbone="toy", seeds=[1, 2], trainers=["CoOp", "ZeroshotCLIP"],
                        protocols={"base2new": {"datasets": ["toyrs"]}})  # fmt: skip
    (tmp_path / "data" / "ToyRS" / "images").mkdir(parents=True)
    args = ["run", str(sweep), "--output", str(tmp_path / "out"), "--data", str(tmp_path / "data"), "--python",
            env["PYTHON"], "--gpus", "3,7"]  # fmt: skip
    proc = sweep_cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    results = sorted((tmp_path / "out").rglob("results.json"))
    assert len(results) == 8
    assert {(r.parent / "cuda_visible_devices").read_text().strip() for r in results} == {"3", "7"}
    assert all("==== " in (r.parent / "run.log").read_text() for r in results)  # each run's output in its folder
    assert "9 done, 0 failed, 0 skipped" in proc.stderr  # the 8 runs and the feature-cache fill before them
    calls = log.read_text().splitlines()
    assert calls[0].startswith("-m tools.features fill ") and calls[0].count(" --and ") == 3  # 2 trainers x base/new
    proc = sweep_cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to run: all 8 runs are finished" in proc.stderr
    assert log.read_text().splitlines() == calls  # launched nothing
    status = sweep_cli("status", *args[1:6], env=env)
    assert status.returncode == 0, status.stderr
    rows = table(status.stdout, "phase")
    assert rows["train"][:2] == ["4", "4"] and rows["eval"][:2] == ["4", "4"]  # steps, finished


def test_run_reports_failed_runs_and_their_logs(tmp_path, fake_python):
    env, _ = fake_python
    sweep = write_sweep(tmp_path / "s.yaml", backbone="toy", seeds=[1], trainers=["CoOp"],
                        protocols={"base2new": {"datasets": ["toyrs"]}})  # fmt: skip
    (tmp_path / "data" / "ToyRS" / "images").mkdir(parents=True)
    proc = sweep_cli("run", str(sweep), "--output", str(tmp_path / "out"), "--data", str(tmp_path / "data"),
                     "--python", env["PYTHON"], "--jobs", "2", env={**env, "FAKE_FAIL": "train_base"})  # fmt: skip
    assert proc.returncode == 1
    train = tmp_path / "out/base2new/train_base/toyrs/shots_16/CoOp/vit_b16_ep50_ctxv1_toy/seed1"
    assert f"failed (exit 3): base2new/train_base/toyrs/shots_16/CoOp/vit_b16_ep50_ctxv1_toy/seed1: log {train}/run.log" in proc.stderr
    assert re.search(r"skipped: base2new/test_new/\S+ \(needs base2new/train_base/\S+, which failed\)", proc.stderr)


# ------------------------------------------------------------------------------- real runs (Dassl)
def _results(output: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(output.rglob("results.json")):
        record = json.loads(path.read_text())
        for key in ("seconds", "git_sha"):
            record.pop(key, None)
        out[path.parent.relative_to(output).as_posix()] = record
    return out


@requires_dassl
@pytest.mark.dassl
@pytest.mark.slow
def test_killed_sweep_rerun_equals_an_uninterrupted_one(tmp_path, toyrs_root):
    """SIGTERM while the first training runs, then the same command: the results and the trained weights equal
    those of a sweep that was never interrupted; a third run launches nothing and prints the table."""
    import torch

    sweep = write_sweep(tmp_path / "s.yaml", backbone="toy", shots=2, seeds=[1], trainers=["CoOp"],
                        opts={"OPTIM.MAX_EPOCH": 5, "DATALOADER.NUM_WORKERS": 0, "DATALOADER.TEST.BATCH_SIZE": 50},
                        protocols={"base2new": {"datasets": ["toyrs"]}})  # fmt: skip
    common = ["--data", str(toyrs_root), "--jobs", "1"]
    whole = sweep_cli("run", str(sweep), "--output", str(tmp_path / "whole"), *common)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    train = out / "base2new/train_base/toyrs/shots_2/CoOp/vit_b16_ep50_ctxv1_toy/seed1"
    proc = subprocess.Popen([sys.executable, "-m", "tools.sweep", "run", str(sweep), "--output", str(out), *common],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for(lambda: (train / "prompt_learner" / "checkpoint").exists() or proc.poll() is not None, 900,
                  "the first epoch checkpoint")  # fmt: skip
        mid_training = not (train / "results.json").exists()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "run the same command again to continue" in err
    assert not (out / "base2new/test_new").exists()  # the evaluation had not started

    rerun = sweep_cli("run", str(sweep), "--output", str(out), *common)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if mid_training:
        assert "Resumed prompt_learner" in (train / "run.log").read_text()
    assert _results(out) == _results(tmp_path / "whole") and len(_results(out)) == 2
    weights = [torch.load(d / "base2new/train_base/toyrs/shots_2/CoOp/vit_b16_ep50_ctxv1_toy/seed1/prompt_learner/"
                          "model.pth.tar-5", map_location="cpu", weights_only=False)["state_dict"]
               for d in (out, tmp_path / "whole")]  # fmt: skip
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    again = sweep_cli("run", str(sweep), "--output", str(out), *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to run: all 2 runs are finished" in again.stderr
    assert "### base2new" in again.stdout and "CoOp" in again.stdout  # the run ends with the table
    assert {p.name for p in (out / "report").iterdir()} == {"base2new.md", "base2new.csv", "base2new.png"}
