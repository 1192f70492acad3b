"""SLURM executor through submitit (an optional dependency: only this module imports it).

:func:`submit` sends one job array per phase (pre-steps, training, evaluation), each array waiting for the
earlier ones with ``afterok`` (a failed array task cancels the later arrays: with
``DependencyParameters=kill_invalid_depend`` at once, else they stay pending until cancelled), and returns at
once; the job ids are recorded in ``<sweep>/slurm/jobs.json``. A task runs its step's commands with their
output appended to the step's log (``run.log`` in its run folder). Tasks are submitit ``Checkpointable``:
on a timeout or a preemption signal submitit requeues the task, which runs the same command again in the
same folder, and train.py resumes from its last epoch checkpoint. submitit's own files (submission
scripts, pickles, its logs) go to ``<sweep>/slurm/<phase>/``.

:func:`job_states` reads the states of recorded jobs from ``squeue`` and ``sacct``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from common.io import write_json_atomic
from tools.executors import clear_old_results, open_log
from tools.planner import PHASES, REPO_ROOT, PlanError, Step

logger = logging.getLogger(__name__)

JOBS_FILE = "jobs.json"
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                           "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD"})  # fmt: skip


@dataclass
class SlurmOptions:
    """sbatch settings of every array of a sweep (None: SLURM's default)."""

    partition: str | None = None
    time_min: int = 60
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    array_parallelism: int = 256
    account: str | None = None
    qos: str | None = None
    max_timeouts: int = 3
    extra: dict[str, str] = field(default_factory=dict)  # --slurm KEY=VALUE


def parse_time(text: str) -> int:
    """A SLURM time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) in minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise PlanError(f"--time '{text}' is not a SLURM time; write minutes (90), HH:MM:SS (1:30:00) or D-HH:MM:SS")
    days, a, b, c = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        minutes = int(days) * 1440 + int(a) * 60 + int(b or 0) + (int(c or 0) + 59) // 60
    elif c is not None:  # HH:MM:SS
        minutes = int(a) * 60 + int(b) + (int(c) + 59) // 60
    elif b is not None:  # MM:SS
        minutes = int(a) + (int(b) + 59) // 60
    else:
        minutes = int(a)
    if minutes < 1:
        raise PlanError(f"--time '{text}' is shorter than a minute; give the time limit of one run")
    return minutes


class SweepTask(submitit.helpers.Checkpointable):
    """One step as a SLURM array task; requeued as is on timeout or preemption (the run resumes)."""

    def __init__(self, step: Step, sweep_dir: Path) -> None:
        self.step, self.sweep_dir = step, sweep_dir

    def __call__(self) -> str:
        env = submitit.JobEnvironment()
        clear_old_results(self.step)
        with open_log(self.step, self.sweep_dir, f"SLURM job {env.job_id} ({env.hostname})") as log:
            for command in self.step.commands:
                code = subprocess.run(list(command), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL).returncode  # fmt: skip
                if code:
                    raise RuntimeError(f"{self.step.key}: {command[1:3]} exited with {code}; see {log.name}")
        return self.step.key


def _executor(folder: Path, phase: str, name: str, options: SlurmOptions, after: Sequence[str]) -> Any:
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_timeouts)
    extra: dict[str, Any] = {"requeue": True, "chdir": str(REPO_ROOT), **options.extra}
    params: dict[str, Any] = {"job_name": f"{name}-{phase}", "time": options.time_min,
                              "array_parallelism": options.array_parallelism, "additional_parameters": extra}  # fmt: skip
    for key in ("partition", "gpus_per_task", "cpus_per_task", "mem", "account", "qos"):
        if getattr(options, key) is not None:
            params[key] = getattr(options, key)
    if after:
        params["dependency"] = "afterok:" + ":".join(after)
    executor.update_parameters(**params)
    return executor


def submit(steps: Sequence[Step], sweep_dir: Path, name: str, options: SlurmOptions) -> dict[str, Any]:
    """Submit ``steps`` as one array per phase, chained with afterok; record and return the submission."""
    if shutil.which("sbatch") is None:
        raise PlanError("sbatch is not on PATH: submit runs where SLURM's commands do (a login node); "
                        "on this machine, run the sweep with `python -m tools.sweep run`")  # fmt: skip
    record: dict[str, Any] = {"submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "arrays": []}
    after: list[str] = []
    for phase in PHASES:
        chunk = [s for s in steps if s.phase == phase]
        if not chunk:
            continue
        executor = _executor(sweep_dir / "slurm" / phase, phase, name, options, after)
        with executor.batch():
            jobs = [executor.submit(SweepTask(step, sweep_dir)) for step in chunk]
        array_id = jobs[0].job_id.split("_")[0]
        tasks = {job.job_id.split("_")[1] if "_" in job.job_id else "0": step.key for job, step in zip(jobs, chunk)}
        record["arrays"].append({"phase": phase, "job_id": array_id, "after": list(after), "tasks": tasks})
        logger.info("submitted %s: job array %s, %d tasks%s", phase, array_id, len(chunk),
                    f" (after {', '.join(after)})" if after else "")  # fmt: skip
        after.append(array_id)
    history = read_jobs(sweep_dir)
    history.append(record)
    write_json_atomic(sweep_dir / "slurm" / JOBS_FILE, history, indent=1)
    return record


def read_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every submission recorded in the sweep folder (oldest first)."""
    path = sweep_dir / "slurm" / JOBS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def _expand(job_field: str) -> list[tuple[str, str]]:
    """``123_4`` -> [(123, 4)]; ``123_[0-2,5%2]`` -> [(123, 0), (123, 1), (123, 2), (123, 5)]; ``123`` -> [(123, 0)]."""
    array, _, tasks = job_field.partition("_")
    if not tasks:
        return [(array, "0")]
    if not tasks.startswith("["):
        return [(array, tasks)]
    out = []
    for part in tasks.strip("[]").split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out += [(array, str(i)) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def job_states(array_ids: Sequence[str]) -> tuple[dict[tuple[str, str], str], str]:
    """{(array id, task id): state} from sacct (every job it knows) overlaid with squeue (live jobs), and a
    note when sacct could not answer (no accounting: finished tasks then show no state)."""
    states: dict[tuple[str, str], str] = {}
    note = ""
    if not array_ids:
        return states, note
    ids = ",".join(array_ids)
    try:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ids, "-o", "JobID,State"], capture_output=True,
                             text=True, timeout=60, check=True).stdout  # fmt: skip
        for line in out.splitlines():
            job, _, state = line.partition("|")
            for key in _expand(job.strip()):
                states[key] = state.split()[0] if state.strip() else "UNKNOWN"
    except (OSError, subprocess.SubprocessError) as exc:
        note = f"sacct failed ({exc.__class__.__name__}): states of ended jobs are unknown"
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", ids, "-o", "%i|%T"], capture_output=True, text=True,
                             timeout=60, check=True).stdout  # fmt: skip
        for line in out.splitlines():
            job, _, state = line.partition("|")
            for key in _expand(job.strip()):
                states[key] = state.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        note = note or f"squeue failed ({exc.__class__.__name__})"
    return states, note


def step_states(sweep_dir: Path) -> tuple[dict[str, tuple[str, str]], str]:
    """{step key: (SLURM state, job id)} of each step's latest submission, and a note (see :func:`job_states`)."""
    latest: dict[str, tuple[str, str]] = {}
    arrays = [a for record in read_jobs(sweep_dir) for a in record["arrays"]]
    for array in arrays:
        for task, key in array["tasks"].items():
            latest[key] = (array["job_id"], task)
    states, note = job_states(sorted({a["job_id"] for a in arrays}))
    return {key: (states.get(job, "UNKNOWN"), f"{job[0]}_{job[1]}") for key, job in latest.items()}, note


def active_jobs(sweep_dir: Path) -> Mapping[str, tuple[str, str]]:
    """The recorded steps whose latest job is still queued or running."""
    states, _ = step_states(sweep_dir)
    return {k: v for k, v in states.items() if v[0] in ACTIVE_STATES}
