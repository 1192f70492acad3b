"""The prepared GPU check: CUDA tests, benchmark in bf16 and amp, smoke protocol; one JSON + Markdown summary.

    bash scripts/gpu_check.sh [--out DIR] [--budget SECONDS]        (or: make gpu-check)

On a CUDA machine, in about five minutes (``--budget``, default 290 s, caps every step):

1. ``environment``: torch, CUDA, cuDNN, the device, and ``nvidia-smi``;
2. ``cuda-tests``: ``pytest -m cuda tests/test_cuda.py`` (every trainer in every PREC on the toy backbone and on
   ViT-B/16-sized random weights, the fast text path, checkpoints across devices, loaders with workers);
3. ``smoke``: the BiMoRS base-to-new protocol on ToyRS, toy backbone, one seed, one epoch, on the GPU;
4. ``bench-bf16`` and ``bench-amp``: ``python -m tools.bench --device cuda`` for BiMoRS, CoCoOp and CoOp
   (ViT-B/16 random weights, batch 4): our fast path against the straightforward formulation.

Without CUDA it says so and runs what a CPU runs quickly: the CUDA tests are collected and skipped with their
reason, a small bf16 benchmark (toy backbone, CoOp), the smoke protocol (2 shots); amp is skipped (fp16
autocast is emulated on a CPU, and the trainers run amp as fp32 there). It exits 0 when every step that ran
passed, 1 otherwise.

It writes ``summary.json``, ``summary.md`` and ``gpu_check.log`` (every step's command and output) into
``--out``, else ``$OUT``, else ``output/gpu_check``, rewriting the summary after every step, so a run cut short
still leaves one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.io import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SUMMARY_JSON, SUMMARY_MD, LOG_FILE = "summary.json", "summary.md", "gpu_check.log"
DEFAULT_OUT = REPO_ROOT / "output" / "gpu_check"
BENCH_TRAINERS = ("BiMoRS", "CoCoOp", "CoOp")
NVIDIA_SMI_FIELDS = ("name", "driver_version", "memory.total", "memory.used", "temperature.gpu", "power.draw",
                     "clocks.sm", "clocks.max.sm")  # fmt: skip
LOG_TAIL_BYTES = 1 << 20  # per stream of a step kept in gpu_check.log
MIN_STEP_S = 10.0  # a step with less of the budget left is not started
#: Variables of the protocol scripts that the smoke step sets itself (an inherited value would change the run).
PROTOCOL_ENV = ("DATA", "OUTPUT", "OPTS", "PRE_STEP", "CFG", "SHOTS", "DRY_RUN", "LOAD_EPOCH", "EVAL_ONLY",
                "BACKBONE", "CAPTIONER", "CAPTION_ENCODER", "TRAINER", "SOURCE", "TARGETS")  # fmt: skip


class StepFailed(Exception):
    """A step ran to completion but its output shows a failure (the message says which)."""


@dataclass
class Step:
    """One step of the check: a command with a time cap, and how to read its outcome."""

    name: str
    title: str
    argv: list[str] = field(default_factory=list)
    cap_s: float = 60.0
    env: dict[str, str] = field(default_factory=dict)
    skip: str = ""  # why the step does not run in this mode
    read: Callable[[Step, subprocess.CompletedProcess], dict] | None = None  # details; raises StepFailed


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------
def nvidia_smi() -> dict:
    """``nvidia-smi``'s per-GPU query (the fields of :data:`NVIDIA_SMI_FIELDS`) and its plain report."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"available": False, "reason": "nvidia-smi is not on PATH"}
    out: dict = {"available": True, "gpus": []}
    try:
        query = subprocess.run([exe, f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        if query.returncode == 0:
            for line in query.stdout.strip().splitlines():
                out["gpus"].append(dict(zip(NVIDIA_SMI_FIELDS, (v.strip() for v in line.split(",")))))
        else:
            out["query_error"] = (query.stderr or query.stdout).strip()[-500:]
        report = subprocess.run([exe], capture_output=True, text=True, timeout=30)
        out["report"] = report.stdout
    except (OSError, subprocess.SubprocessError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def environment() -> dict:
    """Python, torch, CUDA and device facts of this machine."""
    import torch

    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            device_count=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
        )
    return info


# ----------------------------------------------------------------------------------------------------------
# Reading the steps' outcomes
# ----------------------------------------------------------------------------------------------------------
def read_junit(path: Path) -> dict:
    """Counts, skip reasons, failures and the slowest tests of a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    counts: Counter = Counter()
    skip_reasons: Counter = Counter()
    failures, times = [], []
    for c in cases:
        test = f"{c.get('classname', '')}::{c.get('name', '')}"
        times.append((float(c.get("time") or 0), test))
        outcome = next((child for child in c if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skip_reasons[outcome.get("message", "")] += 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            failures.append({"test": test, "message": (outcome.get("message") or "")[:500]})
    return {
        "collected": len(cases),
        **{k: counts[k] for k in ("passed", "failed", "errors", "skipped")},
        "skip_reasons": dict(skip_reasons),
        "failures": failures,
        "slowest": [{"test": t, "seconds": round(s, 2)} for s, t in sorted(times, reverse=True)[:5]],
    }


def read_tests(junit: Path, cuda: bool) -> Callable[[Step, subprocess.CompletedProcess], dict]:
    """Reader of the CUDA tests: on CUDA all must pass (a skip there is a failure); without, all must skip."""

    def read(step: Step, proc: subprocess.CompletedProcess) -> dict:
        if not junit.is_file():
            raise StepFailed(f"pytest wrote no report (exit code {proc.returncode}); see {LOG_FILE}")
        details = read_junit(junit)
        if details["collected"] == 0:
            raise StepFailed("no CUDA test was collected")
        bad = details["failed"] + details["errors"]
        if bad:
            names = ", ".join(f["test"].split("::")[-1] for f in details["failures"][:5])
            raise StepFailed(f"{bad} of {details['collected']} CUDA tests failed: {names}", details)
        if cuda and details["skipped"]:
            raise StepFailed(f"{details['skipped']} CUDA tests skipped on a CUDA machine: {details['skip_reasons']}",
                             details)  # fmt: skip
        if not cuda and details["skipped"] != details["collected"]:
            raise StepFailed("without CUDA every CUDA test must skip", details)
        return details

    return read


def read_bench(path: Path) -> Callable[[Step, subprocess.CompletedProcess], dict]:
    """Reader of a ``tools.bench`` run: its JSON results and the Markdown tables it printed."""

    def read(step: Step, proc: subprocess.CompletedProcess) -> dict:
        if not path.is_file():
            raise StepFailed(f"tools.bench wrote no {path.name}")
        data = json.loads(path.read_text())
        return {**data, "table_md": proc.stdout.strip()}

    return read


def read_smoke(output: Path) -> Callable[[Step, subprocess.CompletedProcess], dict]:
    """Reader of the smoke protocol: one ``results.json`` per phase (train on base, test on new)."""

    def read(step: Step, proc: subprocess.CompletedProcess) -> dict:
        runs = []
        for path in sorted(output.rglob("results.json")):
            r = json.loads(path.read_text())
            runs.append({k: r.get(k) for k in ("subsample", "accuracy", "n_test", "epoch", "seconds", "backbone")})
        if sorted(r["subsample"] for r in runs) != ["base", "new"]:
            raise StepFailed(f"expected results of the base and new phases, found {runs}")
        table = proc.stdout[proc.stdout.rfind("\n### ") + 1 :]  # tools.results prints the table last
        return {"runs": runs, "table_md": table.strip()}

    return read


# ----------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------
def plan(cuda: bool, work: Path, python: str) -> list[Step]:
    """The steps of the check on a CUDA machine (``cuda``) or without one; scratch files go under ``work``."""
    junit = work / "junit.xml"
    steps = [
        Step("cuda-tests", "CUDA tests (pytest -m cuda)", cap_s=150 if cuda else 120,
             argv=[python, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py",
                   "--junitxml", str(junit), "--basetemp", str(work / "pytest")],
             read=read_tests(junit, cuda)),
    ]  # fmt: skip
    smoke_out = work / "smoke" / "output"
    smoke_env = {"DATA": str(work / "smoke" / "data"), "OUTPUT": str(smoke_out), "BACKBONE": "toy",
                 "CAPTIONER": "toy-blip2", "CAPTION_ENCODER": "toy-bert", "PYTHON": python}  # fmt: skip
    smoke_opts = ["OPTIM.MAX_EPOCH", "1"]
    if not cuda:  # fewer images and no worker processes: seconds on a CPU
        smoke_env["SHOTS"] = "2"
        smoke_opts += ["DATALOADER.NUM_WORKERS", "0"]
    steps.append(
        Step("smoke", "BiMoRS base-to-new smoke protocol (ToyRS, toy backbone, 1 seed, 1 epoch)",
             argv=["bash", "scripts/bimors/base2new.sh", "toyrs", "1", "--", *smoke_opts], env=smoke_env,
             cap_s=75 if cuda else 150, read=read_smoke(smoke_out))
    )  # fmt: skip
    for prec in ("bf16", "amp"):
        json_path = work / f"bench_{prec}.json"
        if cuda:
            args = ["--device", "cuda", "--backbone", "ViT-B/16", "--trainers", *BENCH_TRAINERS, "--batch", "4",
                    "--warmup", "2", "--repeats", "5", "--ref-repeats", "2"]  # fmt: skip
            title = f"tools.bench {prec} on CUDA: {', '.join(BENCH_TRAINERS)}, ViT-B/16 random weights, batch 4"
        else:
            args = ["--device", "cpu", "--backbone", "toy", "--trainers", "CoOp", "--batch", "2", "--warmup", "1",
                    "--repeats", "1", "--ref-repeats", "1", "--dataset-classes", "4"]  # fmt: skip
            title = f"tools.bench {prec} on the CPU: CoOp, toy backbone (plumbing only)"
        skip = "" if cuda or prec == "bf16" else (
            "no CUDA device: fp16 autocast is emulated on a CPU (minutes), and the trainers run amp as fp32 there")
        steps.append(
            Step(f"bench-{prec}", title, argv=[python, "-m", "tools.bench", *args, "--prec", prec, "--json", str(json_path)],
                 cap_s=60 if cuda else 120, skip=skip, read=read_bench(json_path))
        )  # fmt: skip
    return steps


# ----------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------
def _tail(path: Path) -> str:
    data = path.read_bytes()
    cut = data[-LOG_TAIL_BYTES:]
    note = f"[... {len(data) - len(cut)} earlier bytes not kept ...]\n" if len(cut) < len(data) else ""
    return note + cut.decode(errors="replace")


def run_step(step: Step, work: Path, log, remaining_s: float) -> dict:
    """Run one step within ``min(step.cap_s, remaining_s)`` seconds; returns its record for the summary."""
    record: dict = {"name": step.name, "title": step.title, "command": shlex.join(step.argv), "seconds": 0.0}
    if step.skip:
        return {**record, "status": "skipped", "reason": step.skip}
    if remaining_s < MIN_STEP_S:
        return {**record, "status": "not-run", "reason": f"the time budget was spent ({remaining_s:.0f} s left)"}
    cap = min(step.cap_s, remaining_s)
    env = {k: v for k, v in os.environ.items() if k not in PROTOCOL_ENV}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **step.env)
    out_path, err_path = work / f"{step.name}.stdout", work / f"{step.name}.stderr"
    logger.info("%s: %s (at most %.0f s)", step.name, record["command"], cap)
    start = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(step.argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            returncode = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            _stop(proc)
            returncode = None
    record["seconds"] = round(time.monotonic() - start, 1)
    stdout, stderr = _tail(out_path), _tail(err_path)
    log.write(f"\n===== {step.name}: {record['command']}\n----- stdout\n{stdout}\n----- stderr\n{stderr}\n")
    log.flush()
    record["returncode"] = returncode
    if returncode is None:
        return {**record, "status": "timeout", "reason": f"stopped after {cap:.0f} s"}
    try:
        if step.read is not None:
            record["details"] = step.read(step, subprocess.CompletedProcess(step.argv, returncode, stdout, stderr))
        if returncode != 0:
            raise StepFailed(f"exit code {returncode}; see {LOG_FILE}")
    except StepFailed as exc:
        message, *details = exc.args
        if details:
            record["details"] = details[0]
        return {**record, "status": "failed", "reason": message}
    except (OSError, ValueError, KeyError) as exc:  # an unreadable or malformed output file
        return {**record, "status": "failed", "reason": f"could not read the output: {type(exc).__name__}: {exc}"}
    return {**record, "status": "passed"}


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a step's whole process group, then kill what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ----------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------
def bench_rows(summary: dict) -> list[str]:
    """Markdown rows (one per precision and trainer) of the benchmark steps that produced results."""
    mb = 2**20
    rows = []
    for step in summary["steps"]:
        data = step.get("details") if step["name"].startswith("bench-") else None
        if not data or "results" not in data:
            continue
        by = {(r["trainer"], r["formulation"]): r for r in data["results"]}
        for trainer in dict.fromkeys(r["trainer"] for r in data["results"]):
            ours, ref = by[(trainer, "ours")], by[(trainer, "reference")]
            rows.append(
                f"| {data['prec']} | {trainer} | {ours['train_images_per_s']:.1f} | {ref['train_images_per_s']:.1f} | "
                f"{ref['train_step_s'] / ours['train_step_s']:.2f}x | {ours['eval_images_per_s']:.1f} | "
                f"{ref['eval_batch_s'] / ours['eval_batch_s']:.2f}x | {ours['train_peak_bytes'] / mb:.0f} / "
                f"{ref['train_peak_bytes'] / mb:.0f} | {data['max_logit_diff'][trainer]:.1e} |"
            )
    return rows


BENCH_HEADER = (
    "| prec | trainer | train img/s (ours) | train img/s (reference) | train speed-up | eval img/s (ours) | "
    "eval speed-up | peak train memory MB (ours / reference) | max logit diff |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def render(summary: dict) -> str:
    """The Markdown summary."""
    host = summary["host"]
    lines = [f"# GPU check ({summary['mode']} mode), {summary['started']}", ""]
    if summary["mode"] == "cuda":
        lines.append(f"Device: {host.get('device')} ({host.get('memory_gib')} GiB, compute capability "
                     f"{host.get('capability')}), torch {host['torch']} (CUDA {host['torch_cuda']}, cuDNN "
                     f"{host.get('cudnn')}), {host['cpu_count']} CPUs.")  # fmt: skip
    else:
        lines.append(f"**{summary['note']}** torch {host['torch']}, {host['cpu_count']} CPUs.")
    verdict = "all steps that ran passed" if summary["ok"] else "SOME STEPS FAILED"
    lines += ["", f"Result: {verdict}; {summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s budget.", "",
              "| step | status | seconds | what | notes |", "|---|---|---|---|---|"]  # fmt: skip
    for s in summary["steps"]:
        reason = " ".join(s.get("reason", "").split()).replace("|", "\\|")  # one line, no cell breaks
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['title']} | {reason} |")
    tests = next((s.get("details") for s in summary["steps"] if s["name"] == "cuda-tests"), None)
    if tests:
        lines += ["", "## CUDA tests", "",
                  f"{tests['collected']} collected: {tests['passed']} passed, {tests['failed']} failed, "
                  f"{tests['errors']} errors, {tests['skipped']} skipped."]  # fmt: skip
        lines += [f"- skipped ({n}): {reason}" for reason, n in tests["skip_reasons"].items()]
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in tests["failures"]]
    rows = bench_rows(summary)
    if rows:
        lines += ["", "## Benchmark: our fast path against the straightforward formulation", "", BENCH_HEADER, *rows]
        for s in summary["steps"]:
            if s["name"].startswith("bench-") and s.get("details"):
                lines += ["", f"### {s['name']} (tools.bench output)", "", s["details"]["table_md"]]
    smoke = next((s.get("details") for s in summary["steps"] if s["name"] == "smoke"), None)
    if smoke:
        lines += ["", "## Smoke protocol", "", smoke["table_md"]]
    smi = summary["nvidia_smi"]
    lines += ["", "## nvidia-smi", ""]
    if smi.get("available"):
        lines += [f"- {', '.join(f'{k} {v}' for k, v in gpu.items())}" for gpu in smi.get("gpus", [])]
        lines += ["", "```", smi.get("report", "").rstrip(), "```"]
    else:
        lines.append(smi.get("reason", "not available"))
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict) -> None:
    write_json_atomic(out / SUMMARY_JSON, summary, indent=2)
    write_text_atomic(out / SUMMARY_MD, render(summary))


def output_dir(option: str | None) -> Path:
    """``--out``, else ``$OUT`` (the folder the device tool brings back), else ``output/gpu_check``."""
    return Path(option or os.environ.get("OUT") or DEFAULT_OUT).resolve()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", help="folder for summary.json, summary.md and gpu_check.log (default: $OUT, else "
                                 "output/gpu_check)")  # fmt: skip
    p.add_argument("--budget", type=float, default=290.0,
                   help="seconds for all steps together (default 290); a step is stopped at its share")
    p.add_argument("--python", default=sys.executable, help="interpreter of the steps (default: this one)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns 0 when every step that ran passed."""
    args = build_parser().parse_args(argv)
    if args.budget <= 0:
        raise SystemExit(f"error: --budget {args.budget} must be a positive number of seconds, e.g. --budget 290")
    logging.basicConfig(level=logging.INFO, format="[gpu_check] %(message)s")
    out = output_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    env_start = time.monotonic()
    host, smi = environment(), nvidia_smi()
    cuda = host["cuda_available"]
    summary: dict = {
        "check": "gpu_check",
        "mode": "cuda" if cuda else "cpu",
        "note": "" if cuda else "No CUDA device: CPU mode, ran what a CPU runs quickly; the CUDA tests skip.",
        "started": started,
        "budget_s": args.budget,
        "host": host,
        "nvidia_smi": smi,
        "steps": [{"name": "environment", "title": "torch, CUDA and device facts; nvidia-smi", "command": "",
                   "status": "passed", "seconds": round(time.monotonic() - env_start, 1)}],  # fmt: skip
    }
    if cuda:
        logger.info("CUDA device: %s; torch %s (CUDA %s)", host["device"], host["torch"], host["torch_cuda"])
    else:
        logger.warning("No CUDA device here: CPU mode (the CUDA tests skip, amp is skipped, the rest runs small).")
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        with open(out / LOG_FILE, "w") as log:
            log.write(f"gpu_check {started}, mode {summary['mode']}\n{smi.get('report', '')}\n")
            for step in plan(cuda, work, args.python):
                record = run_step(step, work, log, args.budget - (time.monotonic() - start))
                summary["steps"].append(record)
                logger.info("%s: %s (%.1f s)%s", step.name, record["status"], record["seconds"],
                            f": {record['reason']}" if record.get("reason") else "")  # fmt: skip
                _finish(summary, start)
                write_summary(out, summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("Summary: %s and %s (%s)", out / SUMMARY_JSON, out / SUMMARY_MD,
                "all steps that ran passed" if summary["ok"] else "SOME STEPS FAILED")  # fmt: skip
    return 0 if summary["ok"] else 1


def _finish(summary: dict, start: float) -> None:
    summary["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["ok"] = all(s["status"] in ("passed", "skipped") for s in summary["steps"])


if __name__ == "__main__":
    sys.exit(main())
