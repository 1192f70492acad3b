"""Backend of the protocol scripts: ``scripts/protocols/<protocol>.sh`` hand their arguments and environment
(see ``scripts/protocols/common.sh``) to ``python -m tools.protocol PROTOCOL SCRIPT [ARGS...]``.

It builds the plan (:mod:`tools.planner`), then prints it (``DRY_RUN=1``) or runs it step by step in the
repository root, stopping at the first failure with its exit code, and ends with the protocol's table
(``tools.results``). Messages go to stderr; stdout carries the commands (DRY_RUN), the runs' output and the
table. A bad input ends with one ``error:`` line that names the fix, and exit code 2.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tools.executors import clear_old_results
from tools.planner import (
    DEFAULT_SEEDS,
    FINISHED,
    PROTOCOLS,
    REPO_ROOT,
    TOY_DATASET,
    TRANSFER,
    Plan,
    PlanError,
    Request,
    changed_error,
    check_datasets,
    check_locations,
    generates_data,
    plan,
    registered_trainers,
    resolve_config,
    trainer_spec,
)

logger = logging.getLogger("protocol")


def _flag(env: Mapping[str, str], name: str) -> bool:
    """An on/off environment variable: set, non-empty and not 0."""
    return env.get(name, "0") not in ("", "0")


def _abspath(path: str) -> Path:
    return Path(os.path.abspath(path))


def parse_args(protocol: str, script: str, args: Sequence[str]) -> tuple[list[str], tuple[int, ...], list[str]]:
    """(DATASET as a list, or [] for transfer protocols; SEEDS; KEY VALUE options after --)."""
    args = list(args)
    datasets = []
    if protocol not in TRANSFER:
        if not args or args[0] == "--":
            raise PlanError(f"missing DATASET: {script} DATASET [SEEDS...] [-- KEY VALUE ...] (--help for more)")
        datasets.append(args.pop(0))
    seeds = []
    while args and args[0] != "--":
        seed = args.pop(0)
        if not (seed.isdigit() and seed.isascii() and int(seed) > 0 and not seed.startswith("0")):
            raise PlanError(
                f"seed '{seed}' is not a positive integer; put KEY VALUE options for train.py after '--' "
                "(e.g. -- OPTIM.MAX_EPOCH 5)"
            )
        seeds.append(int(seed))
    return datasets, tuple(seeds) or DEFAULT_SEEDS, args[1:]


def request_from_env(protocol: str, script: str, args: Sequence[str], env: Mapping[str, str]) -> Request:
    """The request of a protocol script: its arguments and environment variables (see common.sh)."""
    datasets, seeds, opts = parse_args(protocol, script, args)
    trainer = env.get("TRAINER", "")
    if not trainer:
        raise PlanError(
            f"TRAINER is not set: run a wrapper such as scripts/coop/{protocol}.sh, or export TRAINER to one of: "
            f"{', '.join(registered_trainers())}"
        )
    trainer_spec(trainer)
    if protocol in TRANSFER:
        source, targets = TRANSFER[protocol]
        datasets = [env.get("SOURCE") or source, *(env["TARGETS"].split() if env.get("TARGETS") else targets)]
    check_datasets(datasets)
    data = env.get("DATA", "")
    if not data:
        if any(d != TOY_DATASET for d in datasets):
            raise PlanError(
                "DATA is not set: export DATA=/path/to/datasets (the folder holding PatternNet/, RSICD/, ...; see "
                "docs/datasets.md), or run on the offline dataset toyrs"
            )
        data = "./data"
    shots_text = env.get("SHOTS", "")
    shots = shots_text.split()
    if shots_text and not shots:
        raise PlanError("SHOTS is empty; set SHOTS=16 (or unset it)")
    if not all(k.isdigit() and k.isascii() and int(k) > 0 for k in shots):
        raise PlanError(f"SHOTS='{shots_text}' must be positive integers (shots per class), e.g. SHOTS=16")
    load_epoch = env.get("LOAD_EPOCH", "")
    if load_epoch and not (load_epoch.isdigit() and int(load_epoch) > 0):
        raise PlanError(f"LOAD_EPOCH='{load_epoch}' must be a positive integer (the checkpoint epoch to evaluate)")
    python = env.get("PYTHON") or "python"
    config = env.get("CFG", "")
    return Request(
        protocol=protocol,
        trainer=trainer,
        datasets=tuple(datasets),
        config=str(_abspath(config)) if config.endswith(".yaml") else config,
        seeds=seeds,
        shots=tuple(int(k) for k in shots),
        backbone=env.get("BACKBONE", ""),
        default_opts=tuple(env.get("OPTS", "").split()),
        opts=tuple(opts),
        load_epoch=int(load_epoch) if load_epoch else None,
        eval_only=_flag(env, "EVAL_ONLY") if env.get("EVAL_ONLY") else None,
        pre_step=tuple(env["PRE_STEP"].split()) if env.get("PRE_STEP") else None,
        captioner=env.get("CAPTIONER", ""),
        caption_encoder=env.get("CAPTION_ENCODER", ""),
        data=_abspath(data),
        output=_abspath(env.get("OUTPUT") or "output"),
        python=str(_abspath(python)) if "/" in python else python,
    )


def execute(the_plan: Plan, dry_run: bool) -> int:
    """Print (dry run) or run every step in order; returns the exit code of the first failed step, else 0."""
    for step in the_plan.steps:
        if step.is_run and step.status == FINISHED:
            logger.info("skip (finished): %s", step.output_dir)
            continue
        if not dry_run:
            clear_old_results(step)
        for command in step.commands:
            code = run_command(command, dry_run)
            if code:
                return code
    for command in the_plan.summaries:
        if run_command(command, dry_run):
            logger.info("tools.results failed (see above); the run folders are kept")
    return 0


def run_command(command: Sequence[str], dry_run: bool) -> int:
    """Print ``command`` (dry run: on stdout, as a shell line) or announce it on stderr and run it."""
    line = shlex.join(command)
    if dry_run:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        return 0
    logger.info("+ %s", line)
    return subprocess.run(list(command), cwd=REPO_ROOT).returncode


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``python -m tools.protocol PROTOCOL SCRIPT [ARGS...]``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    if len(argv) < 2 or argv[0] not in PROTOCOLS:
        sys.stderr.write(f"usage: python -m tools.protocol {{{','.join(PROTOCOLS)}}} SCRIPT [ARGS...] "
                         "(run through scripts/<trainer>/<protocol>.sh)\n")  # fmt: skip
        return 2
    protocol, script, args = argv[0], argv[1], argv[2:]
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=f"[{protocol}] %(message)s", stream=sys.stderr)
    dry_run, force = _flag(env, "DRY_RUN"), _flag(env, "FORCE")
    try:
        request = request_from_env(protocol, script, args, env)
        the_plan = plan(request)
        if the_plan.changed and not force:
            raise changed_error(the_plan.changed, "FORCE=1")
        for note in the_plan.notes():
            logger.info("%s", note)
        if not dry_run:
            check_locations(request.data, request.output, creates_data=generates_data(the_plan.steps))
    except PlanError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    logger.info(
        "trainer %s, config %s, datasets %s, seeds %s, shots %s, output %s", request.trainer,
        resolve_config(request, trainer_spec(request.trainer))[0],
        " ".join(request.datasets), " ".join(map(str, request.seeds)), " ".join(map(str, request.shot_counts)),
        request.output,
    )  # fmt: skip
    return execute(the_plan, dry_run)


if __name__ == "__main__":
    sys.exit(main())
