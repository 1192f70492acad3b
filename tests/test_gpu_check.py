"""The prepared GPU check: its CPU mode end to end (the GPU hidden), and the parts only a GPU run reaches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, requires_dassl
from test_cuda import NO_CUDA

from tools import gpu_check

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.sh"


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """``scripts/gpu_check.sh`` with the GPU hidden (CUDA_VISIBLE_DEVICES empty): its CPU mode, into a folder."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    return proc, out


@requires_dassl
@pytest.mark.slow
def test_cpu_mode_says_so_runs_what_it_can_and_passes(cpu_run):
    proc, out = cpu_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "No CUDA device here: CPU mode" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu" and summary["ok"] and not summary["host"]["cuda_available"]
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["environment", "cuda-tests", "smoke", "bench-bf16", "bench-amp"]
    assert [s["status"] for s in steps.values()] == ["passed", "passed", "passed", "passed", "skipped"]
    assert "fp16 autocast is emulated" in steps["bench-amp"]["reason"]

    tests = steps["cuda-tests"]["details"]  # every CUDA test collected, and skipped with the reason
    assert tests["collected"] == tests["skipped"] > 0 and tests["passed"] == tests["failed"] == 0
    assert tests["skip_reasons"] == {NO_CUDA: tests["collected"]}

    bench = steps["bench-bf16"]["details"]
    assert (bench["prec"], bench["device"], bench["backbone"]) == ("bf16", "cpu", "toy")
    assert {(r["trainer"], r["formulation"]) for r in bench["results"]} == {("CoOp", "ours"), ("CoOp", "reference")}
    assert "| CoOp | ours |" in bench["table_md"]

    runs = {r["subsample"]: r for r in steps["smoke"]["details"]["runs"]}
    assert runs.keys() == {"base", "new"} and all(r["epoch"] == 1 and r["backbone"] == "toy" for r in runs.values())
    assert steps["smoke"]["details"]["table_md"].startswith("### base2new")

    md = (out / "summary.md").read_text()
    assert "CPU mode" in md and f"{tests['collected']} collected: 0 passed" in md
    assert "| bf16 | CoOp |" in md and "ToyRS HM" in md
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== {name}: " in log for name in ("cuda-tests", "smoke", "bench-bf16"))


@requires_dassl
@pytest.mark.slow
def test_cuda_mode_summary_renders(cpu_run):
    """The Markdown of a CUDA run (device line, both precisions' rows) from the CPU run's real records."""
    summary = json.loads((cpu_run[1] / "summary.json").read_text())
    summary["mode"] = "cuda"
    summary["host"].update(device="NVIDIA H200", memory_gib=139.8, capability="9.0", cudnn=91000)
    bench = next(s for s in summary["steps"] if s["name"] == "bench-bf16")
    amp = {**bench, "name": "bench-amp", "details": {**bench["details"], "prec": "amp"}}
    summary["steps"] = [s for s in summary["steps"] if s["name"] != "bench-amp"] + [amp]
    md = gpu_check.render(summary)
    assert "Device: NVIDIA H200 (139.8 GiB, compute capability 9.0)" in md
    assert "| bf16 | CoOp |" in md and "| amp | CoOp |" in md and "### bench-amp (tools.bench output)" in md


def junit(tmp_path, body: str):
    path = tmp_path / "junit.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return path


def test_failed_cuda_test_fails_the_step_and_is_named(tmp_path):
    path = junit(tmp_path, '<testcase classname="tests.test_cuda" name="test_a[cuda-toy-CoOp-fp16]" time="1.5">'
                           '<failure message="AssertionError: frozen x changed">trace</failure></testcase>'
                           '<testcase classname="tests.test_cuda" name="test_b" time="0.1"/>')  # fmt: skip
    read = gpu_check.read_tests(path, cuda=True)
    with pytest.raises(gpu_check.StepFailed, match=r"1 of 2 CUDA tests failed: test_a\[cuda-toy-CoOp-fp16\]") as err:
        read(None, subprocess.CompletedProcess([], 1))
    details = err.value.args[1]
    assert (details["passed"], details["failed"]) == (1, 1)
    assert details["failures"] == [{"test": "tests.test_cuda::test_a[cuda-toy-CoOp-fp16]",
                                    "message": "AssertionError: frozen x changed"}]  # fmt: skip


def test_skipped_cuda_test_on_a_cuda_machine_fails_the_step(tmp_path):
    path = junit(tmp_path, '<testcase classname="t" name="a"><skipped message="Dassl.pytorch is not installed"/>'
                           "</testcase>")  # fmt: skip
    with pytest.raises(gpu_check.StepFailed, match="skipped on a CUDA machine.*Dassl"):
        gpu_check.read_tests(path, cuda=True)(None, subprocess.CompletedProcess([], 0))


def test_step_over_its_cap_is_stopped_with_its_processes(tmp_path):
    """A step past its cap is stopped, children included, and the check goes on (the device's minutes count)."""
    pid_file = tmp_path / "child.pid"
    step = gpu_check.Step("sleepy", "sleeps", argv=["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], cap_s=1)
    with open(tmp_path / "log", "w") as log:
        start = time.monotonic()
        record = gpu_check.run_step(step, tmp_path, log, remaining_s=100)
    assert record["status"] == "timeout" and record["returncode"] is None and time.monotonic() - start < 15
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5  # the signal reaches the orphaned child at once; allow for scheduling
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child), f"the step's child process {child} outlived the step"
    assert "===== sleepy: " in (tmp_path / "log").read_text()


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an exited child not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_step_is_not_started_when_the_budget_is_spent(tmp_path):
    step = gpu_check.Step("late", "too late", argv=["true"])
    with open(tmp_path / "log", "w") as log:
        record = gpu_check.run_step(step, tmp_path, log, remaining_s=gpu_check.MIN_STEP_S - 1)
    assert record["status"] == "not-run" and "budget" in record["reason"]


def test_bad_budget_is_one_line_naming_the_fix():
    with pytest.raises(SystemExit, match=r"--budget 0.0 must be a positive number of seconds, e.g. --budget 290"):
        gpu_check.main(["--budget", "0"])


def test_output_folder_is_the_option_else_out_else_default(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "device"))
    assert gpu_check.output_dir(str(tmp_path / "given")) == tmp_path / "given"
    assert gpu_check.output_dir(None) == tmp_path / "device"
    monkeypatch.delenv("OUT")
    assert gpu_check.output_dir(None) == gpu_check.DEFAULT_OUT
