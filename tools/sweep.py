"""Sweeps: a whole comparison (trainers x protocols x datasets x seeds) from one yaml file.

    python -m tools.sweep plan   SWEEP.yaml [--commands]                       runs per phase, finished or not
    python -m tools.sweep run    SWEEP.yaml [--gpus 0,1,2,3 | --jobs N]        run here (a pool of slots)
    python -m tools.sweep submit SWEEP.yaml [--partition P --time T ...]      SLURM job arrays (submitit)
    python -m tools.sweep status SWEEP.yaml [--wait]                          run folders + SLURM job states
    python -m tools.sweep report SWEEP.yaml                                   tables, CSV and plots
    python -m tools.sweep cost   SWEEP.yaml [--device cuda cpu] [--json F]    total FLOPs of the matrix (tools.cost)

Options of every verb: ``--data``, ``--output``, ``--python``, and ``--trainers``, ``--protocols``, ``--seeds``
to take part of the sweep. Runs go into the CoOp-style folders of the protocol scripts under the sweep's
output folder; a finished run is skipped (``--force`` reruns those whose recorded config differs, which
otherwise stop ``run`` and ``submit``). The sweep file format and the executors: docs/running.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tools.executors import step_log
from tools.executors.local import make_slots, run_pool, summarize
from tools.planner import (
    CHANGED,
    DEFAULT_SEEDS,
    FINISHED,
    PHASES,
    PROTOCOLS,
    TOY_DATASET,
    TRANSFER,
    Plan,
    PlanError,
    Request,
    Step,
    add_feature_steps,
    changed_error,
    check_locations,
    generates_data,
    plan,
)

logger = logging.getLogger("sweep")

SWEEP_KEYS = ("name", "output", "data", "backbone", "shots", "seeds", "opts", "trainers", "protocols")
TRAINER_KEYS = ("trainer", "cfg", "opts", "captioner", "caption_encoder")
PROTOCOL_KEYS = ("datasets", "source", "targets", "shots", "seeds")
DATA_PLACEHOLDER = "<DATA>"
# SLURM job states as status reports them
_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}
_FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@dataclass(frozen=True)
class TrainerEntry:
    """A trainer of the sweep: its config (one name, or one per protocol) and its own options."""

    trainer: str
    cfg: Mapping[str, str] = field(default_factory=dict)  # protocol -> config; "*" -> every protocol
    opts: tuple[str, ...] = ()
    captioner: str = ""
    caption_encoder: str = ""


@dataclass(frozen=True)
class ProtocolEntry:
    """A protocol of the sweep: its datasets (base2new, fewshot) or source and targets, seeds and shots."""

    protocol: str
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    shots: tuple[int, ...]


@dataclass
class Sweep:
    """A parsed sweep file with the command-line overrides applied."""

    path: Path
    name: str
    output: Path
    data: Path | None
    python: str
    backbone: str
    opts: tuple[str, ...]
    trainers: list[TrainerEntry]
    protocols: list[ProtocolEntry]

    def requests(self) -> list[Request]:
        """One request per protocol, trainer and (base2new, fewshot) dataset."""
        out = []
        for entry in self.protocols:
            groups = [(d,) for d in entry.datasets] if entry.protocol not in TRANSFER else [entry.datasets]
            for trainer in self.trainers:
                config = trainer.cfg.get(entry.protocol, trainer.cfg.get("*", ""))
                for datasets in groups:
                    out.append(Request(
                        protocol=entry.protocol, trainer=trainer.trainer, datasets=datasets, config=config,
                        seeds=entry.seeds, shots=entry.shots, backbone=self.backbone, default_opts=self.opts,
                        opts=trainer.opts, captioner=trainer.captioner, caption_encoder=trainer.caption_encoder,
                        data=self.data or Path(DATA_PLACEHOLDER), output=self.output, python=self.python,
                    ))  # fmt: skip
        return out

    def plan(self) -> Plan:
        """The merged plan of every request, with the feature-cache fill of each dataset before its runs."""
        merged = Plan()
        for request in self.requests():
            merged.merge(plan(request))
        return add_feature_steps(merged)


# ------------------------------------------------------------------------------------------- sweep file
def _fail(path: Path, message: str) -> PlanError:
    return PlanError(f"{path}: {message}")


def _ints(value: Any, what: str, path: Path) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise _fail(path, f"{what} must be a positive integer or a list of them, got {value!r}")
    return tuple(values)


def _opts(value: Any, path: Path) -> tuple[str, ...]:
    """``opts`` as a mapping {KEY: VALUE} or a flat list [KEY, VALUE, ...] -> flat tuple of strings."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple(str(x) for kv in value.items() for x in kv)
    if isinstance(value, list):
        return tuple(str(x) for x in value)
    raise _fail(path, f"opts must be a mapping of KEY: VALUE (or a list KEY, VALUE, ...), got {value!r}")


def _check_keys(node: Any, valid: Sequence[str], what: str, path: Path) -> Mapping[str, Any]:
    if not isinstance(node, Mapping):
        raise _fail(path, f"{what} must be a mapping, got {node!r}")
    unknown = [k for k in node if k not in valid]
    if unknown:
        raise _fail(path, f"unknown key '{unknown[0]}' in {what}; valid keys: {', '.join(valid)}")
    return node


def _trainer_entry(node: Any, path: Path) -> TrainerEntry:
    if isinstance(node, str):
        return TrainerEntry(node)
    node = _check_keys(node, TRAINER_KEYS, "a trainer entry", path)
    if not isinstance(node.get("trainer"), str):
        raise _fail(path, f"a trainer entry needs 'trainer: NAME', got {dict(node)!r}")
    cfg = node.get("cfg", {})
    if isinstance(cfg, str):
        cfg = {"*": cfg}
    elif not isinstance(cfg, Mapping) or any(p not in PROTOCOLS for p in cfg):
        raise _fail(path, f"cfg of {node['trainer']} must be a config name or a mapping protocol: config "
                          f"(protocols: {', '.join(PROTOCOLS)})")  # fmt: skip
    return TrainerEntry(node["trainer"], dict(cfg), _opts(node.get("opts"), path), str(node.get("captioner", "")),
                        str(node.get("caption_encoder", "")))  # fmt: skip


def _protocol_entry(name: str, node: Any, seeds: tuple[int, ...], shots: tuple[int, ...], path: Path) -> ProtocolEntry:
    if name not in PROTOCOLS:
        raise _fail(path, f"unknown protocol '{name}'; choose among: {', '.join(PROTOCOLS)}")
    node = _check_keys(node or {}, PROTOCOL_KEYS, f"protocol {name}", path)
    if name in TRANSFER:
        if "datasets" in node:
            raise _fail(path, f"{name} takes 'source' and 'targets', not 'datasets'")
        source, targets = TRANSFER[name]
        targets = node.get("targets", list(targets))
        datasets = (str(node.get("source", source)), *(str(t) for t in (targets if isinstance(targets, list) else [targets])))
    else:
        if "source" in node or "targets" in node or not node.get("datasets"):
            raise _fail(path, f"{name} takes 'datasets: [NAME, ...]' (not source/targets)")
        value = node["datasets"]
        datasets = tuple(str(d) for d in (value if isinstance(value, list) else [value]))
    return ProtocolEntry(
        name, datasets, _ints(node["seeds"], f"seeds of {name}", path) if "seeds" in node else seeds,
        _ints(node["shots"], f"shots of {name}", path) if "shots" in node else shots,
    )  # fmt: skip


def load_sweep(path: Path, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Sweep:
    """Parse a sweep file and apply the command-line overrides (``--data`` ...) of ``args``."""
    environ = os.environ if environ is None else environ
    if not path.is_file():
        raise PlanError(f"sweep file {path} does not exist; give a file such as configs/sweeps/smoke.yaml")
    try:
        node = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise _fail(path, f"is not valid yaml ({str(exc).splitlines()[0]}); fix the file") from None
    node = _check_keys(node, SWEEP_KEYS, "the sweep", path)
    if not node.get("trainers") or not isinstance(node["trainers"], list):
        raise _fail(path, "'trainers' must list the trainers, e.g. trainers: [CoOp, BiMoRS]")
    if not node.get("protocols") or not isinstance(node["protocols"], Mapping):
        raise _fail(path, "'protocols' must map protocols to their datasets, e.g. protocols: {base2new: {datasets: [toyrs]}}")
    seeds = _ints(node["seeds"], "seeds", path) if "seeds" in node else DEFAULT_SEEDS
    shots = _ints(node["shots"], "shots", path) if "shots" in node else ()
    trainers = [_trainer_entry(t, path) for t in node["trainers"]]
    protocols = [_protocol_entry(str(k), v, seeds, shots, path) for k, v in node["protocols"].items()]
    name = str(node.get("name") or path.stem)
    output = Path(os.path.abspath(str(node.get("output") or f"output/sweeps/{name}")))
    data = node.get("data") or environ.get("DATA") or None
    python = sys.executable
    if args is not None:
        trainers = _select(trainers, args.trainers, lambda t: t.trainer, "trainer", path)
        protocols = _select(protocols, args.protocols, lambda p: p.protocol, "protocol", path)
        if args.seeds:
            protocols = [ProtocolEntry(p.protocol, p.datasets, tuple(args.seeds), p.shots) for p in protocols]
        output = Path(os.path.abspath(args.output)) if args.output else output
        data = args.data or data
        python = args.python or python
    if not data and all(d == TOY_DATASET for p in protocols for d in p.datasets):
        data = "data"
    return Sweep(path, name, output, Path(os.path.abspath(data)) if data else None, python,
                 str(node.get("backbone") or ""), _opts(node.get("opts"), path), trainers, protocols)  # fmt: skip


def _select(entries: list, wanted: Sequence[str] | None, name_of, what: str, path: Path) -> list:
    if not wanted:
        return entries
    names = [name_of(e) for e in entries]
    for w in wanted:
        if w not in names:
            raise PlanError(f"--{what}s {w}: {path} has no {what} {w}; its {what}s: {', '.join(names)}")
    return [e for e in entries if name_of(e) in wanted]


# -------------------------------------------------------------------------------------------------- verbs
def _table(rows: list[list[Any]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[Any]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), *(fmt(r) for r in rows)])


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _headline(sweep: Sweep) -> str:
    seeds = sorted({s for p in sweep.protocols for s in p.seeds})
    return (f"sweep {sweep.name}: {len(sweep.trainers)} trainers ({', '.join(t.trainer for t in sweep.trainers)}), "
            f"{len(sweep.protocols)} protocols ({', '.join(p.protocol for p in sweep.protocols)}), seeds "
            f"{' '.join(map(str, seeds))}; output {sweep.output}")  # fmt: skip


def cmd_plan(sweep: Sweep, args: argparse.Namespace) -> int:
    """Print the number of steps per phase: finished, changed and to run; with --commands, every command."""
    the_plan = sweep.plan()
    todo = {s.key for s in the_plan.pending()}
    _out(_headline(sweep))
    if sweep.data is None:
        _out(f"DATA is not set (--data, the sweep's data: or $DATA): commands show {DATA_PLACEHOLDER}")
    rows = []
    for phase in PHASES:
        steps = [s for s in the_plan.steps if s.phase == phase]
        runs = [s for s in steps if s.is_run]
        rows.append([phase, len(steps), sum(s.status == FINISHED for s in runs) if runs else "-",
                     sum(s.status == CHANGED for s in runs) if runs else "-", sum(s.key in todo for s in steps)])  # fmt: skip
    rows.append(["total", *(sum(r[i] for r in rows if isinstance(r[i], int)) for i in range(1, 5))])
    _out(_table(rows, ["phase", "steps", "finished", "changed", "to run"]))
    by_protocol = []
    for entry in sweep.protocols:
        runs = [s for s in the_plan.runs if s.key.startswith(entry.protocol + "/")]
        by_protocol.append([entry.protocol, sum(s.phase == "train" for s in runs), sum(s.phase == "eval" for s in runs),
                            sum(s.key in todo for s in runs)])  # fmt: skip
    _out()
    _out(_table(by_protocol, ["protocol", "train", "eval", "to run"]))
    if the_plan.changed:
        _out()
        _out(f"note: {changed_error(the_plan.changed, '--force')}; run and submit stop there unless --force")
    if args.commands:
        _out()
        for step in the_plan.steps:
            if step.key in todo:
                for command in step.commands:
                    _out(shlex.join(command))
    return 0


def _checked_plan(sweep: Sweep, force: bool) -> Plan:
    """The plan, after the checks that come before any work: changed runs, DATA and OUTPUT."""
    if sweep.data is None:
        raise PlanError("DATA is not set: give --data /path/to/datasets, a 'data:' line in the sweep file, or "
                        "export DATA (the folder holding PatternNet/, RSICD/, ...; see docs/datasets.md)")  # fmt: skip
    the_plan = sweep.plan()
    if the_plan.changed and not force:
        raise changed_error(the_plan.changed, "--force")
    check_locations(sweep.data, sweep.output, creates_data=generates_data(the_plan.pending()))
    for note in the_plan.notes():
        logger.info("%s", note)
    return the_plan


def cmd_run(sweep: Sweep, args: argparse.Namespace) -> int:
    """Run the steps not finished on this machine, then print the tables."""
    the_plan = _checked_plan(sweep, args.force)
    slots = make_slots(args.gpus, args.jobs)
    todo = the_plan.pending()
    runs = sum(s.is_run for s in todo)
    logger.info("%s", _headline(sweep))
    if not todo:
        logger.info("nothing to run: all %d runs are finished", len(the_plan.runs))
        code = 0
    else:
        logger.info("%d runs to run (%d finished) and %d pre-steps, on %d slots (%s)", runs, len(the_plan.runs) - runs,
                    len(todo) - runs, len(slots), ", ".join(s.name for s in slots))  # fmt: skip
        start = time.monotonic()
        result = run_pool(todo, slots, sweep.output)
        for line in summarize(result, time.monotonic() - start):
            logger.info("%s", line)
        code = result.exit_code
        if result.signal:
            return code
    report(sweep)
    return code


def cmd_submit(sweep: Sweep, args: argparse.Namespace) -> int:
    """Submit the steps not finished as SLURM job arrays (one per phase) and return at once."""
    try:
        from tools.executors import slurm
    except ImportError as exc:
        raise PlanError(f"submit needs submitit ({exc}); install it with: pip install submitit") from None
    options = slurm.SlurmOptions(
        partition=args.partition, time_min=slurm.parse_time(args.time), gpus_per_task=args.gpus_per_task,
        cpus_per_task=args.cpus_per_task, mem=args.mem, array_parallelism=args.array_parallelism,
        account=args.account, qos=args.qos, max_timeouts=args.max_timeouts, extra=_key_values(args.slurm),
    )  # fmt: skip
    the_plan = _checked_plan(sweep, args.force)
    active = slurm.active_jobs(sweep.output)
    if active:
        key, (state, job) = next(iter(active.items()))
        raise PlanError(f"{len(active)} jobs of this sweep are still queued or running (e.g. {job}, {state}: {key}); "
                        f"wait for them (python -m tools.sweep status {sweep.path} --wait) or cancel them (scancel)")  # fmt: skip
    todo = the_plan.pending()
    if not todo:
        logger.info("nothing to submit: all %d runs are finished", len(the_plan.runs))
        return 0
    record = slurm.submit(todo, sweep.output, sweep.name, options)
    _out(f"submitted {len(todo)} steps in {len(record['arrays'])} job arrays: "
         + ", ".join(f"{a['phase']} {a['job_id']}" for a in record["arrays"]))  # fmt: skip
    _out(f"job ids: {sweep.output / 'slurm' / slurm.JOBS_FILE}; follow with: python -m tools.sweep status "
         f"{_same_sweep_args(sweep, args)}")
    return 0


def _same_sweep_args(sweep: Sweep, args: argparse.Namespace) -> str:
    """The sweep file and the options that select the same sweep, for the next command to give."""
    words = [str(sweep.path), "--output", str(sweep.output)]
    for name in ("trainers", "protocols", "seeds"):
        if getattr(args, name):
            words += [f"--{name}", *map(str, getattr(args, name))]
    return shlex.join(words)


def _key_values(pairs: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PlanError(f"--slurm '{pair}': write sbatch options as KEY=VALUE, e.g. --slurm constraint=a100")
        out[key.lstrip("-")] = value
    return out


def _merged_state(step: Step, slurm_states: Mapping[str, tuple[str, str]]) -> str:
    if step.is_run and step.status == FINISHED:
        return "finished"
    if step.status == CHANGED:
        return "changed"
    state = slurm_states.get(step.key, ("", ""))[0]
    if not state:
        return "not started"
    if state in _RUNNING:
        return "running"
    if state == "COMPLETED":
        return "finished" if not step.is_run else "failed"  # a run without results.json did not finish
    if state in _FAILED:
        return "failed"
    if state == "CANCELLED":
        return "cancelled"
    return "queued" if state != "UNKNOWN" else "unknown"


STATUS_COLUMNS = ("finished", "running", "queued", "failed", "cancelled", "changed", "not started", "unknown")


def cmd_status(sweep: Sweep, args: argparse.Namespace) -> int:
    """Print each phase's steps by state (run folders merged with the SLURM states of the recorded jobs)."""
    slurm_states: Mapping[str, tuple[str, str]] = {}
    note = ""
    recorded = (sweep.output / "slurm" / "jobs.json").is_file()
    if recorded:
        from tools.executors import slurm

        deadline = time.monotonic() + args.timeout
        while True:
            slurm_states, note = slurm.step_states(sweep.output)
            active = [k for k, (state, _) in slurm_states.items() if state in slurm.ACTIVE_STATES]
            if not args.wait or not active:
                break
            if time.monotonic() > deadline:
                logger.info("still %d jobs queued or running after %ds (--timeout)", len(active), args.timeout)
                break
            time.sleep(args.interval)  # polling SLURM: no event to wait on
    the_plan = sweep.plan()
    steps = list(the_plan.steps)
    if recorded:  # submitted steps the plan no longer has (a finished pre-step: ToyRS now exists)
        known = {s.key for s in steps}
        for array in slurm.read_jobs(sweep.output)[-1]["arrays"]:
            steps += [Step(k, array["phase"], ()) for k in array["tasks"].values() if k not in known]
    _out(_headline(sweep))
    if note:
        _out(f"note: {note}")
    rows, failed = [], []
    for phase in PHASES:
        in_phase = [s for s in steps if s.phase == phase]
        states = [_merged_state(s, slurm_states) for s in in_phase]
        rows.append([phase, len(in_phase), *(states.count(c) for c in STATUS_COLUMNS)])
        failed += [(s, slurm_states.get(s.key, ("", ""))) for s, st in zip(in_phase, states) if st == "failed"]
    _out(_table(rows, ["phase", "steps", *STATUS_COLUMNS]))
    for step, (state, job) in failed:
        _out(f"failed: {step.key} (SLURM job {job}, {state}): log {step_log(step, sweep.output)}")
    return 0


def report(sweep: Sweep) -> int:
    """Write each protocol's tables (markdown, CSV) and plot into <output>/report/ and print the tables."""
    from tools import results

    folder = sweep.output / "report"
    code = 0
    for entry in sweep.protocols:
        tree = sweep.output / entry.protocol
        if not tree.is_dir():
            logger.info("no runs of %s yet", entry.protocol)
            continue
        base = [str(tree), "--protocol", entry.protocol, "--seeds", *map(str, entry.seeds)]
        folder.mkdir(parents=True, exist_ok=True)
        md = folder / f"{entry.protocol}.md"
        if results.main([*base, "--output", str(md), "--plot", str(folder / f"{entry.protocol}.png")]) != 0:
            code = 1
            continue
        results.main([*base, "--format", "csv", "--output", str(folder / f"{entry.protocol}.csv")])
        _out(md.read_text())
    return code


def cmd_report(sweep: Sweep, args: argparse.Namespace) -> int:
    """The report verb."""
    return report(sweep)


def cmd_cost(sweep: Sweep, args: argparse.Namespace) -> int:
    """The total compute of the matrix: published formulation, fast paths, fast paths with the feature cache."""
    from tools import cost  # torch and Dassl: only this verb needs them

    return cost.report(sweep, args.device, args.json, args.counts)


# ------------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tools.sweep``."""
    parser = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    verbs = parser.add_subparsers(dest="verb", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("sweep", type=Path, help="sweep file (yaml), e.g. configs/sweeps/smoke.yaml")
    common.add_argument("--data", help="data root (default: the sweep's data:, else $DATA; ./data for ToyRS only)")
    common.add_argument("--output", help="sweep folder (default: the sweep's output:, else output/sweeps/<name>)")
    common.add_argument("--python", help="interpreter of the runs (default: this one)")
    common.add_argument("--trainers", nargs="+", metavar="NAME", help="only these trainers of the sweep")
    common.add_argument("--protocols", nargs="+", metavar="NAME", help="only these protocols of the sweep")
    common.add_argument("--seeds", nargs="+", type=int, metavar="N", help="these seeds instead of the sweep's")
    p = verbs.add_parser("plan", parents=[common], help="count the steps per phase (finished, to run)")
    p.add_argument("--commands", action="store_true", help="also print every command still to run")
    p = verbs.add_parser("run", parents=[common], help="run the sweep on this machine")
    p.add_argument("--gpus", help="GPU ids, one run per id at a time (default: every visible GPU), e.g. 0,1,2,3")
    p.add_argument("--jobs", type=int, help="parallel runs on CPU (a machine without GPUs; default 1)")
    p.add_argument("--force", action="store_true", help="rerun finished runs whose recorded config differs")
    p = verbs.add_parser("submit", parents=[common], help="submit the sweep to SLURM (one job array per phase)")
    p.add_argument("--partition")
    p.add_argument("--time", default="60", help="time limit of one run: minutes or [D-]HH:MM:SS (default 60)")
    p.add_argument("--gpus-per-task", type=int)
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem", help="memory per run, e.g. 32G")
    p.add_argument("--array-parallelism", type=int, default=256, help="most tasks of an array running at once")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--max-timeouts", type=int, default=3, help="requeues after a timeout before giving up (default 3)")
    p.add_argument("--slurm", action="append", metavar="KEY=VALUE", help="any other sbatch option (repeatable)")
    p.add_argument("--force", action="store_true", help="rerun finished runs whose recorded config differs")
    p = verbs.add_parser("status", parents=[common], help="steps per phase and state (SLURM states merged)")
    p.add_argument("--wait", action="store_true", help="first wait until no job of the sweep is queued or running")
    p.add_argument("--timeout", type=int, default=86400, help="longest wait in seconds (default a day)")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between two looks at SLURM (default 30)")
    verbs.add_parser("report", parents=[common], help="tables, CSV and plots of every protocol into <output>/report/")
    p = verbs.add_parser("cost", parents=[common], help="total FLOPs of the matrix: published, ours, ours + feature cache")
    p.add_argument("--device", nargs="+", choices=("cuda", "cpu"), default=["cuda"],
                   help="where the runs run: cuda (each config's precision) and/or cpu (all fp32); default cuda")
    p.add_argument("--json", type=Path, help="also write every run's FLOPs and the totals as JSON")
    p.add_argument("--counts", type=Path, help="keep the FLOP counts in this JSON file and reuse those it holds")
    return parser


VERBS = {"plan": cmd_plan, "run": cmd_run, "submit": cmd_submit, "status": cmd_status, "report": cmd_report,
         "cost": cmd_cost}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for a bad input, with one ``error:`` line)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        sweep = load_sweep(args.sweep, args)
        return VERBS[args.verb](sweep, args)
    except PlanError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
