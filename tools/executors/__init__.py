"""Executors of a sweep's steps: :mod:`tools.executors.local` (a pool of worker slots on this machine) and
:mod:`tools.executors.slurm` (SLURM job arrays through submitit; imported only when submitting).

Both write each step's output (stdout and stderr) to :func:`step_log`: ``run.log`` in the run folder, or
``logs/prepare-<dataset>.log`` in the sweep folder for a dataset's pre-steps; each start appends a header
line, so a resumed or requeued run keeps the output of its earlier attempts.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import time
from pathlib import Path
from typing import TextIO

from tools.planner import Step

logger = logging.getLogger(__name__)

RUN_LOG = "run.log"


def step_log(step: Step, sweep_dir: Path) -> Path:
    """Where the output of ``step`` goes."""
    if step.output_dir is not None:
        return step.output_dir / RUN_LOG
    return sweep_dir / "logs" / (step.key.replace("/", "-") + ".log")


def clear_old_results(step: Step) -> None:
    """Delete the run folder of a step that replaces an old result (a forced rerun, or an evaluation whose
    training reruns) while that old result is still there; a resumed attempt (no results.json) is kept."""
    if step.replace and step.output_dir is not None and (step.output_dir / "results.json").is_file():
        logger.info("deleting the old results of %s before its rerun", step.output_dir)
        shutil.rmtree(step.output_dir)


def open_log(step: Step, sweep_dir: Path, where: str) -> TextIO:
    """Open the step's log for appending and write the header of this attempt."""
    path = step_log(step, sweep_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a", buffering=1)
    commands = " && ".join(shlex.join(c) for c in step.commands)
    fh.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {step.key} on {where}: {commands}\n")
    return fh
