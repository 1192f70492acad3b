"""Local executor: a queue of steps over worker slots (one per GPU, or N on a CPU machine).

A free slot takes the next step whose dependencies are done (no waves); a step that fails does not stop the
others, but every step that depends on it is skipped. Each child runs in its own session with
``CUDA_VISIBLE_DEVICES`` of its slot (empty on CPU slots, which also get an even share of the cores through
``OMP_NUM_THREADS`` unless it is set). SIGINT (Ctrl-C) and SIGTERM stop the children (SIGTERM to their
process group, SIGKILL after a grace period) and return; finished runs stay finished, an interrupted training
resumes from its last epoch checkpoint, so running the same sweep again continues it.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.executors import clear_old_results, open_log, step_log
from tools.planner import REPO_ROOT, PlanError, Step

logger = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # SIGTERM -> SIGKILL


@dataclass(frozen=True)
class Slot:
    """A worker slot: its name and the environment its children get."""

    name: str
    env: Mapping[str, str]


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """GPU ids of this machine: CUDA_VISIBLE_DEVICES when set, else those nvidia-smi lists (none without it)."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [g for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def make_slots(gpus: str | None, jobs: int | None, environ: Mapping[str, str] | None = None) -> list[Slot]:
    """Slots from ``--gpus 0,1,2,3`` (an id twice: two runs on that GPU) or ``--jobs N`` (CPU); neither: one
    slot per visible GPU, else one CPU slot."""
    environ = os.environ if environ is None else environ
    if gpus is not None and jobs is not None:
        raise PlanError("give --gpus (one run per listed GPU id) or --jobs (runs on CPU), not both")
    if jobs is not None:
        if jobs < 1:
            raise PlanError(f"--jobs {jobs}: give a positive number of parallel runs")
    elif gpus is not None:
        ids = [g.strip() for g in gpus.split(",")]
        if not all(ids) or any(" " in g for g in ids):
            raise PlanError(f"--gpus '{gpus}': give GPU ids (or UUIDs) separated by commas, e.g. --gpus 0,1,2,3")
        return [Slot(f"GPU {g}", {"CUDA_VISIBLE_DEVICES": g}) for g in ids]
    else:
        found = visible_gpus(environ)
        if found:
            return [Slot(f"GPU {g}", {"CUDA_VISIBLE_DEVICES": g}) for g in found]
        jobs = 1
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    cpu_env = {"CUDA_VISIBLE_DEVICES": ""}
    if "OMP_NUM_THREADS" not in environ:
        cpu_env["OMP_NUM_THREADS"] = threads
    return [Slot(f"CPU slot {i + 1}", cpu_env) for i in range(jobs)]


@dataclass
class PoolResult:
    """What happened to the steps given to :func:`run_pool`."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, tuple[int, Path]] = field(default_factory=dict)  # key -> (exit code, log)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> the failed step it needed
    stopped: list[str] = field(default_factory=list)  # running when interrupted
    not_started: list[str] = field(default_factory=list)
    signal: int = 0  # the signal that interrupted the pool (0: none)

    @property
    def exit_code(self) -> int:
        """0 when every step is done, 1 after failures, 128 + signal when interrupted."""
        return 128 + self.signal if self.signal else 1 if self.failed or self.skipped else 0


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Child:
    """A step running in a slot: its commands one after another, each in its own session."""

    def __init__(self, step: Step, slot: int, env: Mapping[str, str], sweep_dir: Path, events: queue.Queue) -> None:
        self.step, self.slot, self.started = step, slot, time.monotonic()
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self._lock = threading.Lock()
        clear_old_results(step)
        self.log = open_log(step, sweep_dir, env["SLOT_NAME"])
        self._env = {k: v for k, v in env.items() if k != "SLOT_NAME"}
        self._thread = threading.Thread(target=self._work, args=(events,), daemon=True)
        self._thread.start()

    def _work(self, events: queue.Queue) -> None:
        code = 0
        try:
            for command in self.step.commands:
                with self._lock:
                    if self.stopping:
                        code = -signal.SIGTERM
                        break
                    self.proc = subprocess.Popen(list(command), cwd=REPO_ROOT, env=self._env, stdout=self.log,
                                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                 start_new_session=True)  # fmt: skip
                code = self.proc.wait()
                if code:
                    break
        except OSError as exc:  # the command cannot start
            self.log.write(f"cannot start {command[0]}: {exc}\n")
            code = 127
        events.put((self.slot, code))

    def stop(self, sig: int) -> None:
        """Send ``sig`` to the running command's process group; start no further command."""
        with self._lock:
            self.stopping = True
            if self.proc is not None and self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    pass

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the step to end; True when it ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


class _Progress:
    """One progress line on stderr: rewritten in place (with the elapsed time ticking) on a terminal, printed
    once per change of the counts otherwise."""

    def __init__(self, total: int, slots: int) -> None:
        self.total, self.slots, self.start = total, slots, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.durations: list[float] = []
        self.counts: tuple[int, ...] = ()

    def show(self, done: int, running: int, failed: int, pending: int) -> None:
        counts = (done, running, failed, pending)
        if counts == self.counts and not self.tty:
            return
        self.counts = counts
        eta = "?"
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            eta = _hms(mean * (pending + running) / max(1, min(self.slots, pending + running)))
        line = (f"[sweep] {done}/{self.total} done, {running} running, {failed} failed, {pending} pending | "
                f"{_hms(time.monotonic() - self.start)} elapsed, ETA {eta}")  # fmt: skip
        if self.tty:  # a status line rewritten in place, not a log record
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
        else:
            logger.info("%s", line)

    def end(self) -> None:
        if self.tty and self.counts:
            sys.stderr.write("\n")


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_pool(steps: Sequence[Step], slots: Sequence[Slot], sweep_dir: Path,
             environ: Mapping[str, str] | None = None) -> PoolResult:  # fmt: skip
    """Run ``steps`` (dependencies on steps not given count as done) over ``slots``; see the module doc."""
    environ = dict(os.environ if environ is None else environ)
    result = PoolResult()
    keys = {s.key for s in steps}
    waiting = list(steps)  # in plan order
    running: dict[int, _Child] = {}
    events: queue.Queue = queue.Queue()
    progress = _Progress(len(steps), len(slots))
    finished: set[str] = set()

    def ready(step: Step) -> bool:
        return all(d not in keys or d in finished for d in step.deps)

    def blocked_by(step: Step) -> str | None:
        for d in step.deps:
            if d in result.failed or d in result.skipped:
                return d
        return None

    def on_signal(signum, frame):  # noqa: ARG001
        raise _Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while waiting or running:
            for step in [s for s in waiting if blocked_by(s)]:
                result.skipped[step.key] = blocked_by(step) or ""
                waiting.remove(step)
            free = [i for i in range(len(slots)) if i not in running]
            for i in free:
                step = next((s for s in waiting if ready(s)), None)
                if step is None:
                    break
                waiting.remove(step)
                env = {**environ, **slots[i].env, "SLOT_NAME": slots[i].name}
                running[i] = _Child(step, i, env, sweep_dir, events)
            progress.show(len(result.done), len(running), len(result.failed), len(waiting))
            if not running:
                break  # what still waits needs a failed step
            try:
                slot, code = events.get(timeout=1.0)  # the timeout only refreshes the elapsed time
            except queue.Empty:
                continue
            child = running.pop(slot)
            child.log.close()
            progress.durations.append(time.monotonic() - child.started)
            if code == 0:
                finished.add(child.step.key)
                result.done.append(child.step.key)
            else:
                result.failed[child.step.key] = (code, step_log(child.step, sweep_dir))
        for step in waiting:
            result.skipped[step.key] = blocked_by(step) or ""
        progress.show(len(result.done), 0, len(result.failed), 0)
    except _Interrupted as exc:
        for sig in previous:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        result.signal = exc.signum
        result.not_started = [s.key for s in waiting]
        _stop(list(running.values()))
        result.stopped = [c.step.key for c in running.values()]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        progress.end()
    return result


def _stop(children: Sequence[_Child]) -> None:
    """SIGTERM every child's process group; SIGKILL those still running after the grace period."""
    for child in children:
        child.stop(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        if not child.join(max(0.0, deadline - time.monotonic())):
            child.stop(signal.SIGKILL)
            child.join(STOP_GRACE_S)
        child.log.close()


def summarize(result: PoolResult, elapsed: float) -> list[str]:
    """The lines of the end-of-sweep summary: counts, then each failed step's log and each skipped step."""
    lines = [f"[sweep] {'interrupted' if result.signal else 'finished'} after {_hms(elapsed)}: {len(result.done)} done, "
             f"{len(result.failed)} failed, {len(result.skipped)} skipped"]  # fmt: skip
    for key, (code, log) in result.failed.items():
        lines.append(f"  failed (exit {code}): {key}: log {log}")
    for key, needed in result.skipped.items():
        lines.append(f"  skipped: {key} (needs {needed}, which failed)")
    if result.signal:
        lines.append(f"  stopped: {len(result.stopped)} running, {len(result.not_started)} not started; run the same "
                     "command again to continue (finished runs are kept, trainings resume from their last epoch)")  # fmt: skip
    return lines
