"""Protocol planner: the train.py runs a protocol needs, their folders, their order and their dependencies.

Pure module (reads yaml files and run folders; no torch, no Dassl). Every protocol script
(``scripts/<trainer>/<protocol>.sh`` through :mod:`tools.protocol`) and every sweep (:mod:`tools.sweep`) asks
it for a :class:`Plan`: its :class:`Step` objects carry the commands (``train.py`` argv, or the per-dataset
pre-steps: ToyRS generation, BiMoRS captions), the CoOp-style output folder, the steps they wait for
(evaluation after its training, every run after its dataset's pre-steps) and whether the run is already
finished.

A run folder holding ``results.json`` is finished, and reused, only when the config it recorded
(``config.yaml``) has every value the plan asks for (and, for an evaluation, the asked checkpoint epoch); a
finished run whose recorded values differ is :data:`CHANGED`: the caller stops with the differing keys, or
reruns it into a cleared folder when forced. A run is rerun as well when a run it depends on is rerun.

Adding a trainer: one :class:`TrainerSpec` line in :data:`TRAINERS` (its default configs), plus its thin
``scripts/<name>/<protocol>.sh`` wrappers and its sweep entries.
"""

from __future__ import annotations

import ast
import difflib
import functools
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ("base2new", "crossdata", "domaingen", "fewshot")
# transfer protocols: default source and targets (names of files in configs/datasets/)
TRANSFER = {
    "crossdata": ("patternnet", ("rsicd", "resisc45", "mlrsnet")),
    "domaingen": ("patternnetv2", ("rsicdv2", "resisc45v2", "mlrsnetv2")),
}
# order of execution; a SLURM sweep submits one job array per phase. "features" (sweeps only): the feature cache
# of each dataset is filled once for the runs that read it (tools.features), before they start.
PHASES = ("prepare", "features", "train", "eval")
DEFAULT_SEEDS = (1, 2, 3)
DEFAULT_SHOTS = {"fewshot": (1, 2, 4, 8, 16)}  # other protocols: (16,)
TOY_DATASET = "toyrs"  # generated offline by `python -m tools.prepare_data toyrs`, into DATA/ToyRS/images
# Captioner and encoder of runs on ToyRS only (tiny random models, offline): captions of synthetic images by a
# real BLIP-2 would mean nothing and need the hub. CAPTIONER / CAPTION_ENCODER still choose others.
TOY_CAPTION_MODELS = ("toy-blip2", "toy-bert")
TOY_IMAGES = "ToyRS/images"

# Config keys the protocol owns, with the way to set them instead.
OWNED_KEYS = {
    "DATASET.NUM_SHOTS": "set the shots with SHOTS=N (it also names the output folder), not with -- {key}",
    "MODEL.BACKBONE.NAME": "set the backbone with BACKBONE=NAME (it also names the output folder), not with -- {key}",
    "DATASET.SUBSAMPLE_CLASSES": "{key} is set by the {protocol} protocol; do not pass it after --",
    "BENCH.PROTOCOL": "{key} is set by the {protocol} protocol; do not pass it after --",
}
# Recorded keys that never change what a run computes (locations, logging, the exact feature cache): not compared
# for reuse.
FEATURE_CACHE_KEY = "BENCH.FEATURE_CACHE"
NEUTRAL_KEYS = frozenset({"DATASET.ROOT", "OUTPUT_DIR", "RESUME", "TRAIN.PRINT_FREQ", FEATURE_CACHE_KEY})
_KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")

# Run states
FINISHED, PENDING, CHANGED = "finished", "pending", "changed"


class PlanError(ValueError):
    """A bad request; the message is one line that names the bad input and the fix."""


@dataclass(frozen=True)
class TrainerSpec:
    """What the suite knows of a trainer: its default configs and what its runs need besides train.py."""

    name: str
    config: str  # default config (name in configs/trainers/<name>/) of base2new and fewshot
    transfer_config: str = ""  # default config of crossdata and domaingen ('' = config)
    eval_only: bool = False  # learns nothing: every run is --eval-only, no checkpoint is loaded
    captions: bool = False  # needs image captions: a tools.captions pre-step and TRAINER.BIMORS.* options
    # its image encoder is frozen and unprompted (its model is a FrozenImageModel): its evaluations read the
    # feature cache, which a sweep fills first (False for the models with IMAGE_ENCODER_PROMPTED)
    cached_features: bool = True

    def default_config(self, protocol: str) -> str:
        """The config a protocol uses when none is asked for."""
        return (self.transfer_config or self.config) if protocol in TRANSFER else self.config


TRAINERS = {
    spec.name: spec
    for spec in (
        TrainerSpec("ZeroshotCLIP", "vit_b16", eval_only=True),
        TrainerSpec("CoOp", "vit_b16_ep50_ctxv1"),
        TrainerSpec("CoCoOp", "vit_b16_c4_ep10_batch1_ctxv1"),
        TrainerSpec("MaPLe", "vit_b16_c2_ep5_batch4_2ctx", transfer_config="vit_b16_c2_ep5_batch4_2ctx_cross_datasets",
                    cached_features=False),
        TrainerSpec("KgCoOp", "vit_b16_ep100_ctxv1"),
        TrainerSpec("PromptSRC", "vit_b16_c2_ep20_batch4_4+4ctx", transfer_config="vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets",
                    cached_features=False),
        TrainerSpec("APPLeNet", "vit_b16_c4"),
        TrainerSpec("CLIP_Adapter", "vit_b16"),
        TrainerSpec("BiMoRS", "vit_b16_c4_ep10_batch4_ctxv1", captions=True),
    )
}


# ------------------------------------------------------------------------------------------- repository
@functools.cache
def trainer_catalogue(root: Path = REPO_ROOT) -> dict[str, tuple[str, str]]:
    """Trainers registered in ``root/trainers/*.py``, read from the source (no import, so no Dassl or torch needed;
    read once per process): ``{registry name: (first docstring line, name of the trainer it extends or '')}``."""
    found: dict[str, tuple[str, str]] = {}
    for path in sorted((root / "trainers").glob("*.py")):
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "register"
                and isinstance(d.func.value, ast.Name) and d.func.value.id == "TRAINER_REGISTRY"
                for d in node.decorator_list
            ):  # fmt: skip
                base = next((b.id for b in node.bases if isinstance(b, ast.Name)), "")
                found[node.name] = ((ast.get_docstring(node) or "").split("\n")[0], base)
    return found


def registered_trainers(root: Path = REPO_ROOT) -> list[str]:
    """Names of the trainers that ``trainers/*.py`` register with Dassl (:func:`trainer_catalogue`), sorted."""
    return sorted(trainer_catalogue(root))


def yaml_names(folder: Path) -> list[str]:
    """Stems of the ``.yaml`` files of ``folder`` (sorted; empty when the folder does not exist)."""
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def dataset_file(name: str) -> str:
    """The dataset config of ``name``, relative to the repository root (as the commands name it)."""
    return f"configs/datasets/{name}.yaml"


def read_yaml(path: Path) -> dict[str, Any]:
    """A yaml file as a dict (empty when the file is empty)."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise PlanError(f"{path} is not a yaml mapping of config keys; fix or replace the file")
    return data


def flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config mapping -> {"A.B.C": value}."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def decode_value(value: Any) -> Any:
    """A config value as yacs reads it from a file or the command line: strings are Python literals if they
    parse as one (``"(224, 224)"``, ``"1e-5"``, ``"5"``), else strings; tuples compare as lists."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return value
    if isinstance(value, (list, tuple)):
        return [decode_value(v) for v in value]
    return value


def backbone_suffix(backbone: str) -> str:
    """The part of a backbone name that the config folder gets (``ViT-B/32`` -> ``ViTB32``)."""
    return re.sub(r"[^A-Za-z0-9]", "", backbone)


# --------------------------------------------------------------------------------------------- request
@dataclass(frozen=True)
class Request:
    """One protocol of one trainer and config, over seeds (and shot counts for fewshot).

    ``datasets`` holds the dataset for base2new and fewshot, and SOURCE followed by the TARGETS for
    crossdata and domaingen. Options come in three groups, in this order on every command: ``default_opts``
    (OPTS, sweep-wide options), the trainer's own (BiMoRS's captioner and encoder), ``opts`` (after ``--``).
    """

    protocol: str
    trainer: str
    datasets: tuple[str, ...]
    config: str = ""  # name in configs/trainers/<trainer>/, or a .yaml path; '' = the trainer's default
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    shots: tuple[int, ...] = ()  # () = the protocol's default
    backbone: str = ""
    default_opts: tuple[str, ...] = ()
    opts: tuple[str, ...] = ()
    load_epoch: int | None = None
    eval_only: bool | None = None  # None = the trainer's
    pre_step: tuple[str, ...] | None = None  # command prefix run per dataset; None = the trainer's (captions)
    captioner: str = ""  # BiMoRS: '' = the config's TRAINER.BIMORS.CAPTIONER
    caption_encoder: str = ""
    data: Path = Path("data")
    output: Path = Path("output")
    python: str = "python"
    root: Path = REPO_ROOT

    @property
    def shot_counts(self) -> tuple[int, ...]:
        """The shot counts of the plan."""
        return self.shots or DEFAULT_SHOTS.get(self.protocol, (16,))


@dataclass(frozen=True)
class Step:
    """One unit of work: a run of train.py (phase train or eval) or a dataset's pre-steps (phase prepare)."""

    key: str  # unique: the run folder relative to the output root, or prepare/<dataset>
    phase: str
    commands: tuple[tuple[str, ...], ...]  # run one after another, in the repository root
    deps: tuple[str, ...] = ()
    output_dir: Path | None = None  # the run folder (None for pre-steps)
    dataset: str = ""
    status: str = PENDING
    changes: tuple[str, ...] = ()  # CHANGED: "KEY: recorded -> asked"
    replace: bool = False  # the folder holds an old result that this run replaces (it is cleared first)
    fill: tuple[str, ...] = ()  # a run reading the feature cache: the tools.features fill arguments of its evaluation

    @property
    def is_run(self) -> bool:
        """True for a train.py run (False for pre-steps)."""
        return self.output_dir is not None


@dataclass
class Plan:
    """The steps of one or more requests, in execution order (pre-steps first), and the results commands."""

    steps: list[Step] = field(default_factory=list)
    summaries: list[tuple[str, ...]] = field(default_factory=list)
    unverified: list[Path] = field(default_factory=list)  # finished runs without a config.yaml to compare

    @property
    def runs(self) -> list[Step]:
        """The train.py runs."""
        return [s for s in self.steps if s.is_run]

    @property
    def changed(self) -> list[Step]:
        """Finished runs whose recorded config differs from the asked one."""
        return [s for s in self.steps if s.status == CHANGED]

    def notes(self) -> list[str]:
        """What the caller should tell before running: finished runs reused without a config to compare."""
        return [f"note: {p} has results.json but no config.yaml: reused without comparing its config"
                for p in self.unverified]  # fmt: skip

    def pending(self) -> list[Step]:
        """Steps to execute: every run not finished, and the pre-steps a pending run waits for."""
        todo = {s.key for s in self.runs if s.status != FINISHED}
        needed = {d for s in self.steps if s.key in todo for d in s.deps}
        return [s for s in self.steps if s.key in todo or (not s.is_run and s.key in needed)]

    def merge(self, other: Plan) -> None:
        """Add the steps and summaries of ``other``; a step already present must be the same."""
        index = {s.key: s for s in self.steps}
        for step in other.steps:
            mine = index.get(step.key)
            if mine is None:
                self.steps.append(step)
                index[step.key] = step
            elif step.is_run and mine.commands != step.commands:
                raise PlanError(
                    f"two runs of the sweep write {step.output_dir} with different commands (a trainer and config "
                    "listed twice with other options, or two transfer sources with a common target: target folders "
                    "do not name the source); give one of them another config or output folder"
                )
            elif not step.is_run and mine != step:
                extra = tuple(c for c in step.commands if c not in mine.commands)
                merged = Step(mine.key, mine.phase, mine.commands + extra, dataset=mine.dataset)
                self.steps[self.steps.index(mine)] = merged
                index[step.key] = merged
        self.summaries += [s for s in other.summaries if s not in self.summaries]
        self.unverified += [p for p in other.unverified if p not in self.unverified]
        self.steps.sort(key=lambda s: s.is_run)  # pre-steps first; stable otherwise


def generates_data(steps: Iterable[Step]) -> bool:
    """True when one of ``steps`` generates a dataset into DATA (ToyRS), which DATA must then allow."""
    return any(c[1:3] == ("-m", "tools.prepare_data") for s in steps for c in s.commands)


# ---------------------------------------------------------------------------------------------- checks
def check_opts(opts: Sequence[str], protocol: str) -> None:
    """``opts`` are KEY VALUE pairs of config keys the protocol does not own."""
    if len(opts) % 2:
        raise PlanError(
            f"options after -- (and OPTS) must be KEY VALUE pairs; got an odd number: {' '.join(opts)}"
        )
    for key in opts[::2]:
        if not _KEY_RE.match(key):
            raise PlanError(f"'{key}' is not a config key; options after -- are KEY VALUE pairs such as OPTIM.MAX_EPOCH 5")
        if key in OWNED_KEYS:
            raise PlanError(OWNED_KEYS[key].format(key=key, protocol=protocol))


def trainer_spec(name: str, root: Path = REPO_ROOT) -> TrainerSpec | None:
    """The suite's spec of trainer ``name`` (None for a registered trainer the suite has no defaults for);
    raises PlanError for a trainer that no module of ``trainers/`` registers."""
    registered = registered_trainers(root)
    if name not in registered:
        close = [r for r in registered if r.lower() == name.lower()] or difflib.get_close_matches(
            name, registered, n=1, cutoff=0.5
        )
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise PlanError(
            f"unknown trainer '{name}'{hint}; registered trainers: {', '.join(registered)}; set TRAINER to one of them"
        )
    return TRAINERS.get(name)


def resolve_config(request: Request, spec: TrainerSpec | None) -> tuple[str, Path]:
    """(the config as commands name it, its path): a .yaml path, or a name in configs/trainers/<trainer>/."""
    config = request.config or (spec.default_config(request.protocol) if spec else "")
    names = yaml_names(request.root / "configs" / "trainers" / request.trainer)
    if names:
        fix = f"set CFG to one of: {', '.join(names)}, or to the path of a .yaml file"
    else:
        fix = f"set CFG to the path of a .yaml file ({request.trainer} has no configs/trainers/{request.trainer}/)"
    if not config:
        raise PlanError(f"CFG is not set and the suite has no default config for {request.trainer}; {fix}")
    if config.endswith(".yaml"):
        path = Path(config)
        shown = str(path)
    else:
        shown = f"configs/trainers/{request.trainer}/{config}.yaml"
        path = request.root / shown
    if not path.is_file():
        raise PlanError(f"config {shown} does not exist; {fix}")
    return shown, path


def check_datasets(names: Iterable[str], root: Path = REPO_ROOT) -> None:
    """Every dataset has a config in configs/datasets/."""
    for name in names:
        if not (root / dataset_file(name)).is_file():
            valid = ", ".join(yaml_names(root / "configs" / "datasets"))
            raise PlanError(f"unknown dataset '{name}': no {dataset_file(name)}; choose one of: {valid}")


def _make_writable_folder(path: Path, name: str, why: str = "") -> None:
    """Create ``path`` if needed and write a probe file into it; PlanError naming the cause otherwise (root
    passes every permission check, so only a real write tells a read-only mount or a pseudo file system)."""
    fix = f"set {name} to a writable folder"
    if path.exists() and not path.is_dir():
        raise PlanError(f"{name}={path} is not a folder; {fix}")
    existed = path.is_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        raise PlanError(f"{name}={path} cannot be created in {parent} ({exc.strerror}){why}; {fix}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PlanError(f"{name}={path} is not writable ({exc.strerror}){why}; {fix}") from None
    if not existed:
        logger.info("created %s=%s", name, path)


def check_locations(data: Path, output: Path, creates_data: bool = False) -> None:
    """Before any work: DATA is a readable folder (and a writable one when ToyRS is generated into it) and
    OUTPUT is a writable folder (both created if missing)."""
    fix = "set DATA to the folder holding the dataset folders (PatternNet/, RSICD/, ...; see docs/datasets.md)"
    if creates_data:
        _make_writable_folder(data, "DATA", " and ToyRS must be generated into it")
    elif not data.exists():
        raise PlanError(
            f"DATA={data} does not exist; {fix}, or prepare a dataset there with python -m tools.prepare_data NAME --root {data}"
        )
    elif not data.is_dir():
        raise PlanError(f"DATA={data} is not a folder; {fix}")
    elif not os.access(data, os.R_OK | os.X_OK):
        raise PlanError(f"DATA={data} is not readable; {fix}, or fix its permissions")
    _make_writable_folder(output, "OUTPUT")


def load_epoch(request: Request, opts: Sequence[str], config_path: Path) -> int:
    """The checkpoint epoch evaluations load: LOAD_EPOCH, else the last OPTIM.MAX_EPOCH option, else the config's."""
    if request.load_epoch is not None:
        return request.load_epoch
    values = [v for k, v in zip(opts[::2], opts[1::2]) if k == "OPTIM.MAX_EPOCH"]
    value = values[-1] if values else flatten(read_yaml(config_path)).get("OPTIM.MAX_EPOCH", "")
    value = str(value)
    if not re.fullmatch(r"[1-9][0-9]*", value):
        raise PlanError(
            f"cannot tell which checkpoint to evaluate: {config_path} sets no OPTIM.MAX_EPOCH (got '{value}'); set LOAD_EPOCH=N"
        )
    return int(value)


def asked_config(files: Sequence[Path], cli: Mapping[str, Any], opts: Sequence[str]) -> dict[str, Any]:
    """The config values a run asks for, merged as train.py merges them: dataset file, config file,
    command-line values, options."""
    asked: dict[str, Any] = {}
    for path in files:
        asked.update({k: decode_value(v) for k, v in flatten(read_yaml(path)).items()})
    asked.update({k: decode_value(v) for k, v in cli.items()})
    asked.update({k: decode_value(v) for k, v in zip(opts[::2], opts[1::2])})
    return asked


_MISSING = object()


def recorded_changes(run_dir: Path, asked: Mapping[str, Any], epoch: int | None) -> list[str] | None:
    """How a finished run's recorded config differs from ``asked`` ("KEY: recorded -> asked"); None when the
    folder has no ``config.yaml`` to compare with."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    recorded = {k: decode_value(v) for k, v in flatten(yaml.safe_load(path.read_text()) or {}).items()}
    changes = []
    for key, value in asked.items():
        old = recorded.get(key, _MISSING)
        if key not in NEUTRAL_KEYS and old != value:
            changes.append(f"{key}: {'(absent)' if old is _MISSING else old} -> {value}")
    if epoch is not None:
        try:
            done = json.loads((run_dir / "results.json").read_text()).get("epoch")
        except (OSError, ValueError, AttributeError):
            done = None
        if done is not None and done != epoch:
            changes.append(f"--load-epoch: {done} -> {epoch}")
    return changes


# ----------------------------------------------------------------------------------------------- plan
def plan(request: Request) -> Plan:
    """The steps of ``request``, in the order the protocol scripts have always run them."""
    protocol = request.protocol
    if protocol not in PROTOCOLS:
        raise PlanError(f"unknown protocol '{protocol}'; choose one of: {', '.join(PROTOCOLS)}")
    spec = trainer_spec(request.trainer, request.root)
    config, config_path = resolve_config(request, spec)
    check_datasets(request.datasets, request.root)
    if not request.seeds or any(s < 1 for s in request.seeds):
        raise PlanError(f"seeds must be positive integers, got {list(request.seeds)}")
    shots = request.shot_counts
    if any(k < 1 for k in shots):
        raise PlanError(f"SHOTS must be positive integers (shots per class), got {list(shots)}; e.g. SHOTS=16")
    if len(shots) > 1 and protocol != "fewshot":
        raise PlanError(f"SHOTS='{' '.join(map(str, shots))}' must be one number for {protocol} (lists are for fewshot.sh)")
    eval_only = request.eval_only if request.eval_only is not None else bool(spec and spec.eval_only)
    captions = bool(spec and spec.captions)
    trainer_opts: tuple[str, ...] = ()
    pre_step = request.pre_step
    if captions:
        model = flatten(read_yaml(config_path))
        toy_only = set(request.datasets) == {TOY_DATASET}
        captioner = request.captioner or (TOY_CAPTION_MODELS[0] if toy_only else "")
        encoder = request.caption_encoder or (TOY_CAPTION_MODELS[1] if toy_only else "")
        if toy_only and not (request.captioner and request.caption_encoder):
            logger.info("ToyRS only: captions by the toy captioner/encoder (%s, %s) unless CAPTIONER/CAPTION_ENCODER "
                        "are set", captioner, encoder)  # fmt: skip
        captioner = captioner or str(model.get("TRAINER.BIMORS.CAPTIONER", ""))
        encoder = encoder or str(model.get("TRAINER.BIMORS.CAPTION_ENCODER", ""))
        models = (("--captioner", captioner) if captioner else ()) + (("--encoder", encoder) if encoder else ())
        if pre_step is None:
            pre_step = (request.python, "-m", "tools.captions", *models)
        trainer_opts = (("TRAINER.BIMORS.CAPTIONER", captioner) if captioner else ()) + (
            ("TRAINER.BIMORS.CAPTION_ENCODER", encoder) if encoder else ()
        )
    extra = (*request.default_opts, *trainer_opts, *request.opts)
    check_opts(extra, protocol)
    epoch = None if eval_only or protocol == "fewshot" else load_epoch(request, extra, config_path)
    cfg_dir = Path(config).stem + (f"_{backbone_suffix(request.backbone)}" if request.backbone else "")
    cached = spec.cached_features if spec else False
    cache_values = [decode_value(v) for k, v in zip(extra[::2], extra[1::2]) if k == FEATURE_CACHE_KEY]
    builder = _Builder(request, config, config_path, cfg_dir, extra, eval_only, epoch,
                       cached and (not cache_values or bool(cache_values[-1])))  # fmt: skip

    datasets = list(dict.fromkeys(request.datasets))
    for k in shots if protocol == "fewshot" else shots[:1]:
        builder.prepare(datasets, k, pre_step)
    if protocol == "base2new":
        (dataset,) = request.datasets
        for seed in request.seeds:
            train = builder.run("train_base", dataset, seed, shots[0], "base")
            builder.run("test_new", dataset, seed, shots[0], "new", model=train)
        out = request.output / protocol
        builder.plan.summaries.append(builder.results(out / "train_base" / dataset, out / "test_new" / dataset))
    elif protocol == "fewshot":
        (dataset,) = request.datasets
        for seed in request.seeds:
            for k in shots:
                builder.run("train", dataset, seed, k, "all")
        builder.plan.summaries.append(builder.results(request.output / protocol / "train" / dataset))
    else:
        source, *targets = request.datasets
        source_name = str(flatten(read_yaml(request.root / dataset_file(source))).get("DATASET.NAME", ""))
        for seed in request.seeds:
            train = builder.run("train", source, seed, shots[0], "all")
            for target in dict.fromkeys(targets):
                builder.run("test", target, seed, shots[0], "all", model=train,
                            opts=("BENCH.SOURCE_DATASET", source_name))  # fmt: skip
        builder.plan.summaries.append(builder.results(request.output / protocol))
    return builder.plan


class _Builder:
    """Accumulates the steps of one request."""

    def __init__(self, request: Request, config: str, config_path: Path, cfg_dir: str, extra: tuple[str, ...],
                 eval_only: bool, epoch: int | None, cached: bool) -> None:  # fmt: skip
        self.request, self.config, self.config_path, self.cfg_dir = request, config, config_path, cfg_dir
        self.extra, self.eval_only, self.epoch, self.cached = extra, eval_only, epoch, cached
        self.plan = Plan()
        self.prepared: set[str] = set()  # datasets with a prepare/<dataset> step

    def prepare(self, datasets: Sequence[str], shots: int, pre_step: tuple[str, ...] | None) -> None:
        """Per dataset: generate ToyRS if it is missing, then run the pre-step (a command already in the plan's
        step is not added again: :meth:`Plan.merge`)."""
        r = self.request
        for dataset in datasets:
            commands: list[tuple[str, ...]] = []
            if dataset == TOY_DATASET and not (r.data / TOY_IMAGES).is_dir():
                commands.append((r.python, "-m", "tools.prepare_data", dataset, "--root", str(r.data)))
            if pre_step:
                seeds = tuple(str(s) for s in r.seeds)
                commands.append((*pre_step, dataset, "--root", str(r.data), "--shots", str(shots), "--seeds", *seeds))
            if commands:
                self.prepared.add(dataset)
                self.plan.merge(Plan([Step(f"prepare/{dataset}", "prepare", tuple(commands), dataset=dataset)]))

    def run(self, phase: str, dataset: str, seed: int, shots: int, subsample: str, model: Step | None = None,
            opts: tuple[str, ...] = ()) -> Step:  # fmt: skip
        """One train.py run into the CoOp-style folder; ``model``: evaluate that run's checkpoint."""
        r = self.request
        out = r.output / r.protocol / phase / dataset / f"shots_{shots}" / r.trainer / self.cfg_dir / f"seed{seed}"
        flags: tuple[str, ...] = ()
        deps = [f"prepare/{dataset}"] if dataset in self.prepared else []
        epoch = None
        if self.eval_only:
            flags = ("--eval-only",)
        elif model is not None:
            flags = ("--eval-only", "--model-dir", str(model.output_dir), "--load-epoch", str(self.epoch))
            deps.append(model.key)
            epoch = self.epoch
        owned = ("DATASET.NUM_SHOTS", str(shots), "DATASET.SUBSAMPLE_CLASSES", subsample, "BENCH.PROTOCOL", r.protocol)
        if r.backbone:
            owned += ("MODEL.BACKBONE.NAME", r.backbone)
        argv = (r.python, "train.py", "--root", str(r.data), "--seed", str(seed), "--trainer", r.trainer,
                "--dataset-config-file", dataset_file(dataset), "--config-file", self.config, "--output-dir", str(out),
                *flags, *owned, *opts, *self.extra)  # fmt: skip
        key = out.relative_to(r.output).as_posix()
        status, changes, replace = PENDING, (), False
        if (out / "results.json").is_file():
            cli = {"SEED": seed, "TRAINER.NAME": r.trainer, "BENCH.CONFIG_NAME": self.config_path.stem}
            asked = asked_config([r.root / dataset_file(dataset), self.config_path], cli, (*owned, *opts, *self.extra))
            found = recorded_changes(out, asked, epoch)
            if found is None:
                self.plan.unverified.append(out)
            stale = model is not None and not self.eval_only and model.status != FINISHED
            status = CHANGED if found else PENDING if stale else FINISHED
            changes, replace = tuple(found or ()), status != FINISHED
        fill: tuple[str, ...] = ()
        if self.cached:  # the test split the run evaluates; the seed only picks the few-shot draw the run builds
            fill = ("--root", str(r.data), "--seed", str(r.seeds[0]), "--trainer", r.trainer, "--dataset-config-file",
                    dataset_file(dataset), "--config-file", self.config, *owned, *opts, *self.extra)  # fmt: skip
        step = Step(key, "eval" if phase.startswith("test") else "train", (argv,), tuple(deps), out, dataset,
                    status, changes, replace, fill)  # fmt: skip
        self.plan.steps.append(step)
        return step

    def results(self, *dirs: Path) -> tuple[str, ...]:
        """The tools.results command of this request's table."""
        r = self.request
        return (r.python, "-m", "tools.results", *map(str, dirs), "--protocol", r.protocol,
                "--seeds", *map(str, r.seeds))  # fmt: skip


def add_feature_steps(the_plan: Plan) -> Plan:
    """``the_plan`` with one ``features`` step per dataset that runs read from the feature cache: it fills the
    cache for all of them in one ``tools.features fill`` command (distinct fills joined by ``--and``; runs of
    every seed share one), after the dataset's pre-steps; those runs wait for it. Sweeps use it: their runs
    would otherwise compute the same entries at the same time (a SLURM array starts them together)."""
    fills: dict[str, list[tuple[str, ...]]] = {}
    for step in the_plan.runs:
        if step.fill and step.fill not in fills.setdefault(step.dataset, []):
            fills[step.dataset].append(step.fill)
    if not fills:
        return the_plan
    python = the_plan.runs[0].commands[0][0]
    prepare = {s.dataset: s.key for s in the_plan.steps if s.phase == "prepare"}
    features = []
    for dataset, args in fills.items():
        joined = [word for i, fill in enumerate(args) for word in (("--and",) if i else ()) + fill]
        features.append(Step(f"features/{dataset}", "features", ((python, "-m", "tools.features", "fill", *joined),),
                             (prepare[dataset],) if dataset in prepare else (), dataset=dataset))  # fmt: skip
    steps = [s for s in the_plan.steps if not s.is_run] + features
    steps += [replace(s, deps=(*s.deps, f"features/{s.dataset}")) if s.fill else s for s in the_plan.runs]
    return Plan(steps, list(the_plan.summaries), list(the_plan.unverified))


def changed_error(changed: Sequence[Step], how: str) -> PlanError:
    """The error for finished runs whose recorded config differs: the keys, and the ways out."""
    keys = sorted({c.split(":")[0] for s in changed for c in s.changes})
    first = changed[0]
    more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
    return PlanError(
        f"{len(changed)} finished run{'s' if len(changed) > 1 else ''} recorded other values of {', '.join(keys)} "
        f"({first.output_dir}: {'; '.join(first.changes)}{more}); rerun {'them' if len(changed) > 1 else 'it'} "
        f"with {how} (the old results are deleted), or write to another output folder"
    )
