"""Turn run folders into the comparison tables of a paper.

``python -m tools.results [OUTPUT_DIRS...] [--protocol P] [--format md|csv|latex] [--plot FILE.png]
[--published]`` finds runs by their ``results.json`` (docs/design.md section 3) or, for runs made by other
CoOp-family code, by the last test ``* accuracy: X%`` of Dassl's ``log.txt`` (protocol, dataset, shots,
trainer, config and seed then come from the CoOp-style path). Runs are grouped by protocol, dataset,
method (trainer, config, shots, backbone, tree label) and subsample; each group is aggregated over
seeds (mean, sample std, 95% t-interval) and flagged when seeds are missing. Tables put methods in rows
and datasets in columns, like the published tables.

Pure module: reads files only; no Dassl, no torch.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from scipy import stats
from tqdm import tqdm

from common.io import write_text_atomic

logger = logging.getLogger(__name__)

PROTOCOLS = ("base2new", "crossdata", "domaingen", "fewshot", "custom")
FORMATS = ("md", "csv", "latex")
PUBLISHED_FILE = Path(__file__).with_name("published_results.json")
SUBSAMPLES = ("all", "base", "new")
TRANSFER_PROTOCOLS = ("crossdata", "domaingen")
INCOMPLETE_MARK = "†"

# Plot geometry: per table a heading, one row of panels (one per metric: Base, New, HM; or one for the
# table) and the legend under them, one legend column per panel.
PLOT_PANEL_INCHES = (6.0, 4.0)
PLOT_MIN_WIDTH_INCHES = 10.0  # room for the heading and the legend of a one-panel table
PLOT_LINE_INCHES = 0.3  # one line of text (heading, legend note, legend entries)
PLOT_MARGIN_INCHES = 0.2
PLOT_LEGEND_ENTRY_INCHES = 5.0  # width of one legend column (a long "Trainer (config, backbone)" label)
PLOT_CHARS_PER_INCH = 11  # characters of the heading's font per inch, to wrap it
PLOT_DPI = 100
PLOT_MARKS_NOTE = (
    "error bar: sample std over seeds; n=1: a single seed, so no error bar; "
    f"{INCOMPLETE_MARK}: incomplete (seeds missing); Average: mean over datasets; hatched: published"
)
TOY_BACKBONE = "toy"
SMOKE_TITLE = "SMOKE RUN: the toy backbone has RANDOM weights, these numbers mean nothing"

# Upstream path components that name a protocol (ours, CoOp, APPLeNet/C-SAW trees).
_PROTOCOL_ALIASES = {
    "base2new": "base2new",
    "crossdata": "crossdata",
    "cross_dataset": "crossdata",
    "crosstransfer": "crossdata",
    "domaingen": "domaingen",
    "domain_generalization": "domaingen",
    "fewshot": "fewshot",
    "few_shot": "fewshot",
}
_PHASE_SUBSAMPLE = {"train_base": "base", "test_base": "base", "test_new": "new"}
_EVAL_PHASES = ("test", "tests", "evaluation", "eval")
_SEED_RE = re.compile(r"^seed(\d+)$")
_SHOTS_DIR_RE = re.compile(r"^shots_?(\d+)$")
_SHOTS_SUFFIX_RE = re.compile(r"^(?P<cfg>.+?)_(?:shots_?(?P<a>\d+)|(?P<b>\d+)shots)$")
_SPLIT_RE = re.compile(r"Evaluate on the \*(\w+)\* set|Do evaluation on (\w+) set")
_ACC_RE = re.compile(r"\* accuracy: ([0-9.]+)%")
_F1_RE = re.compile(r"\* macro_f1: ([0-9.]+)%")


# --------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """One evaluated run folder."""

    path: Path
    protocol: str
    dataset: str
    trainer: str
    config: str
    shots: int | None
    seed: int
    subsample: str
    accuracy: float
    macro_f1: float | None = None
    source_dataset: str | None = None  # crossdata/domaingen: the training dataset (itself for the source run)
    backbone: str | None = None
    label: str = ""  # tree label given as LABEL=DIR on the command line
    from_log: bool = False


@dataclass
class Collected:
    """What :func:`collect_runs` found: the runs and the folders it skipped (path, reason)."""

    runs: list[Run] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def n_from_log(self) -> int:
        return sum(r.from_log for r in self.runs)


class ResultsError(Exception):
    """Bad input for the results tool (message says what and how to fix it)."""


def load_published(path: Path = PUBLISHED_FILE) -> dict:
    """Load the published numbers (``tools/published_results.json``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultsError(f"cannot read published results {path}: {exc}; restore it from git") from exc
    for key in ("datasets", "methods", "backbone", "shots"):
        if key not in data:
            raise ResultsError(f"published results {path} lack the key {key!r}; restore it from git")
    return data


def _as_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _as_str(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _read_results_json(path: Path, label: str) -> Run:
    """Parse one results.json; ValueError names what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ("trainer", "dataset", "seed", "accuracy") if k not in data]
    if missing:
        raise ValueError(f"missing keys {missing}")
    accuracy = _as_number(data["accuracy"], "accuracy")
    if not 0.0 <= accuracy <= 100.0:
        raise ValueError(f"accuracy {accuracy} is not a percentage in [0, 100]")
    macro_f1 = data.get("macro_f1")
    protocol = _as_str(data.get("protocol", "custom"), "protocol")
    subsample = data.get("subsample", "all")
    if subsample not in SUBSAMPLES:
        raise ValueError(f"subsample must be one of {SUBSAMPLES}, got {subsample!r}")
    shots = data.get("shots")
    dataset = _as_str(data["dataset"], "dataset")
    source = data.get("source_dataset")
    if protocol in TRANSFER_PROTOCOLS:
        source = _as_str(source, "source_dataset") if source is not None else dataset
    return Run(
        path=path.parent,
        protocol=protocol,
        dataset=dataset,
        trainer=_as_str(data["trainer"], "trainer"),
        config=str(data.get("config") or ""),
        shots=None if shots is None else _as_int(shots, "shots"),
        seed=_as_int(data["seed"], "seed"),
        subsample=subsample,
        accuracy=accuracy,
        macro_f1=None if macro_f1 is None else _as_number(macro_f1, "macro_f1"),
        source_dataset=source if protocol in TRANSFER_PROTOCOLS else None,
        backbone=data.get("backbone") or None,
        label=label,
    )


def parse_log(text: str) -> tuple[float, float | None] | None:
    """Return (accuracy, macro_f1) of the last test evaluation in a Dassl log, or None.

    Results that Dassl announces as being on another split (``Evaluate on the *val* set``) are
    ignored; results without such an announcement (older CoOp-family code) count as test results.
    """
    found = None
    split = None
    for line in text.splitlines():
        announced = _SPLIT_RE.search(line)
        if announced:
            split = announced.group(1) or announced.group(2)
        if split not in (None, "test"):
            continue
        acc = _ACC_RE.search(line)
        if acc:
            found = (float(acc.group(1)), None)
        f1 = _F1_RE.search(line)
        if f1 and found is not None:
            found = (found[0], float(f1.group(1)))
    return found


def infer_from_path(run_dir: Path) -> dict:
    """Infer protocol, dataset, shots, trainer, config, seed and subsample from a CoOp-style path.

    Understood trees: ``<protocol>/<phase>/<dataset>/shots_<K>/<Trainer>/<cfg>/seed<N>`` (ours, CoOp
    base-to-new, MaPLe), ``<protocol>/<dataset>/<Trainer>/<cfg>_shots<K>/seed<N>`` and
    ``<protocol>/tests/<Trainer>/<cfg>_shots<K>/<dataset>/seed<N>`` (APPLeNet, C-SAW; ``_<K>shots`` as
    in CoOp). ``is_eval`` is True for eval-only runs of a transfer protocol (source not in the path).
    """
    parts = run_dir.parts
    seed = _SEED_RE.match(parts[-1]) if parts else None
    if seed is None:
        raise ValueError("the folder is not named seed<N>")
    out = {"seed": int(seed.group(1)), "subsample": "all", "is_eval": False}
    for i in range(len(parts) - 2, 0, -1):
        shots = _SHOTS_DIR_RE.match(parts[i])
        if shots and i + 2 <= len(parts) - 1:
            phase = parts[i - 2] if i >= 2 else ""
            protocol = _PROTOCOL_ALIASES.get(parts[i - 3] if i >= 3 else "")
            if protocol is None:
                protocol = "base2new" if phase in _PHASE_SUBSAMPLE else "custom"
            out.update(
                protocol=protocol,
                dataset=parts[i - 1],
                shots=int(shots.group(1)),
                trainer=parts[i + 1],
                config="/".join(parts[i + 2 : -1]),
                subsample=_PHASE_SUBSAMPLE.get(phase, "all"),
                is_eval=protocol in TRANSFER_PROTOCOLS and phase in _EVAL_PHASES,
            )
            return out
        suffix = _SHOTS_SUFFIX_RE.match(parts[i])
        if suffix and i >= 2:
            out.update(config=suffix.group("cfg"), shots=int(suffix.group("a") or suffix.group("b")))
            out["trainer"] = parts[i - 1]
            if parts[i - 2] in _EVAL_PHASES and i == len(parts) - 3:
                out.update(dataset=parts[i + 1], is_eval=True)
                out["protocol"] = _PROTOCOL_ALIASES.get(parts[i - 3] if i >= 3 else "", "crossdata")
            else:
                out["dataset"] = parts[i - 2]
                if i == len(parts) - 3:  # CoOp few-shot: <cfg>_<K>shots/nctx16_cscFalse_ctpend/seed1
                    out["config"] += "/" + parts[i + 1]
                out["protocol"] = _PROTOCOL_ALIASES.get(parts[i - 3] if i >= 3 else "", "fewshot")
            return out
    raise ValueError("no shots_<K> or <cfg>_shots<K> folder in the path")


def _log_files(files: Iterable[str]) -> list[str]:
    """Dassl's log.txt and its renamed successors (log.txt-<time>), newest last."""
    return sorted(f for f in files if f == "log.txt" or f.startswith("log.txt-"))


def _read_log_run(run_dir: Path, logs: list[str], label: str) -> tuple[Run, dict]:
    result = None
    for name in reversed(logs):
        result = parse_log((run_dir / name).read_text(encoding="utf-8", errors="replace"))
        if result is not None:
            break
    if result is None:
        raise ValueError("log.txt has no test '* accuracy: X%' line (unfinished or failed run?)")
    info = infer_from_path(run_dir)
    run = Run(
        path=run_dir,
        protocol=info["protocol"],
        dataset=info["dataset"],
        trainer=info["trainer"],
        config=info["config"],
        shots=info["shots"],
        seed=info["seed"],
        subsample=info["subsample"],
        accuracy=result[0],
        macro_f1=result[1],
        source_dataset=None if info["is_eval"] or info["protocol"] not in TRANSFER_PROTOCOLS else info["dataset"],
        label=label,
        from_log=True,
    )
    return run, info


def parse_tree_arg(arg: str) -> tuple[str, Path]:
    """Split a ``LABEL=DIR`` command-line argument (a plain existing DIR has no label)."""
    if "=" in arg and not Path(arg).exists():
        label, _, path = arg.partition("=")
        return label, Path(path)
    return "", Path(arg)


def collect_runs(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> Collected:
    """Find every run under ``paths`` (results.json first, else Dassl's log.txt).

    ``labels`` (one per path, may be empty strings) name the output trees, so that runs of the same
    trainer and config from different trees (ours vs upstream) become different table rows. Corrupt
    or partial results.json files and logs without a result are named in a warning and skipped.
    """
    labels = list(labels) if labels is not None else [""] * len(paths)
    if len(labels) != len(paths):
        raise ValueError(f"got {len(labels)} labels for {len(paths)} paths")
    found = Collected()
    seen: set[Path] = set()
    inferred: list[tuple[Run, dict]] = []
    for root, label in zip(paths, labels):
        root = Path(root)
        if not root.is_dir():
            raise ResultsError(f"{root} is not a folder: pass the output folder of a protocol run (e.g. output/)")
        walker = tqdm(os.walk(root), desc=f"scanning {root}", unit="dir", disable=None, leave=False)
        for dirpath, dirnames, files in walker:
            dirnames.sort()
            run_dir = Path(dirpath)
            key = run_dir.resolve()
            logs = _log_files(files)
            if key in seen or ("results.json" not in files and not logs):
                continue
            seen.add(key)
            try:
                if "results.json" in files:
                    found.runs.append(_read_results_json(run_dir / "results.json", label))
                else:
                    run, info = _read_log_run(run_dir, logs, label)
                    found.runs.append(run)
                    inferred.append((run, info))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                what = run_dir / ("results.json" if "results.json" in files else logs[-1])
                logger.warning("skipping %s: %s", what, exc)
                found.skipped.append((what, str(exc)))
    found.runs = _canonical_names(found.runs)
    _infer_sources(found, {r.path for r, _ in inferred})
    for run, info in inferred:
        fields = ", ".join(f"{k}={info[k]}" for k in ("protocol", "dataset", "shots", "trainer", "config", "seed"))
        logger.warning(
            "%s has no results.json: read its log.txt and inferred %s, subsample=%s from the path",
            run.path, fields, info["subsample"],
        )
    return found


def _canonical_names(runs: list[Run]) -> list[Run]:
    """Spell each dataset the same way everywhere (path names are lower case: patternnet -> PatternNet)."""
    spelling: dict[str, str] = {}
    for name in load_published()["datasets"]:
        spelling.setdefault(name.lower(), name)
    for run in runs:
        if not run.from_log:
            spelling.setdefault(run.dataset.lower(), run.dataset)
    out = []
    for run in runs:
        source = run.source_dataset and spelling.get(run.source_dataset.lower(), run.source_dataset)
        out.append(replace(run, dataset=spelling.get(run.dataset.lower(), run.dataset), source_dataset=source))
    return out


def _infer_sources(found: Collected, log_paths: set[Path]) -> None:
    """Give eval-only log runs of crossdata/domaingen the dataset their model was trained on."""
    trained: dict[tuple, set[str]] = {}
    for run in found.runs:
        if run.protocol in TRANSFER_PROTOCOLS and run.source_dataset == run.dataset:
            trained.setdefault((run.label, run.protocol, run.trainer, run.config, run.shots), set()).add(run.dataset)
    keep = []
    for run in found.runs:
        if run.path in log_paths and run.protocol in TRANSFER_PROTOCOLS and run.source_dataset is None:
            sources = trained.get((run.label, run.protocol, run.trainer, run.config, run.shots), set())
            if len(sources) != 1:
                reason = (
                    f"cannot tell which dataset trained this eval-only run (training runs found for "
                    f"{sorted(sources) or 'none'}); pass the training runs' folder too"
                )
                logger.warning("skipping %s: %s", run.path, reason)
                found.skipped.append((run.path, reason))
                continue
            run = replace(run, source_dataset=next(iter(sources)))
        keep.append(run)
    found.runs = keep


# ------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class Method:
    """A table row: what was run (shots and backbone included, so they are never averaged together)."""

    trainer: str
    config: str
    shots: int | None
    backbone: str | None
    label: str = ""


@dataclass(frozen=True)
class Stats:
    """Mean, sample standard deviation and 95% t-interval half-width (None below two values)."""

    mean: float
    std: float | None
    ci95: float | None
    n: int


def summarize(values: Sequence[float]) -> Stats:
    """Mean, sample std (ddof=1) and half-width of the 95% confidence interval (t-distribution)."""
    if not values:
        raise ValueError("summarize() needs at least one value")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Stats(mean, None, None, n)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Stats(mean, std, float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n), n)


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2BN / (B + N) (0 when both are 0)."""
    return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


@dataclass
class Group:
    """Runs of one method on one dataset/subsample of one protocol, keyed by seed."""

    protocol: str
    method: Method
    dataset: str
    subsample: str
    source: str | None
    values: dict[int, float]
    expected_seeds: tuple[int, ...] = ()

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(sorted(self.values))

    @property
    def missing(self) -> tuple[int, ...]:
        return tuple(s for s in self.expected_seeds if s not in self.values)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def stats(self) -> Stats:
        return summarize([self.values[s] for s in self.seeds])


def aggregate(runs: Iterable[Run], seeds: Sequence[int] | None = None) -> list[Group]:
    """Group runs and key them by seed; a group lacking any expected seed is incomplete.

    Expected seeds are ``seeds`` when given, else every seed seen in the same protocol. A seed found
    twice in one group is reported and only its first run (in the order given) is kept.
    """
    groups: dict[tuple, Group] = {}
    for run in runs:
        method = Method(run.trainer, run.config, run.shots, run.backbone, run.label)
        source = run.source_dataset if run.protocol in TRANSFER_PROTOCOLS else None
        key = (run.protocol, method, run.dataset, run.subsample, source)
        group = groups.setdefault(key, Group(run.protocol, method, run.dataset, run.subsample, source, {}))
        if run.seed in group.values:
            logger.warning(
                "seed %d of %s on %s (%s) found twice; keeping the first, ignoring %s. To compare two "
                "output trees, label them: python -m tools.results ours=DIR1 upstream=DIR2",
                run.seed, run.trainer, run.dataset, run.subsample, run.path,
            )
            continue
        group.values[run.seed] = run.accuracy
    by_protocol: dict[str, set[int]] = {}
    for group in groups.values():
        by_protocol.setdefault(group.protocol, set()).update(group.values)
    for group in groups.values():
        group.expected_seeds = tuple(sorted(seeds if seeds else by_protocol[group.protocol]))
        if group.missing:
            logger.warning(
                "incomplete: %s %s on %s (%s) has seeds %s, missing %s",
                group.method.trainer, group.method.config, group.dataset, group.subsample,
                list(group.seeds), list(group.missing),
            )
    return list(groups.values())


# ------------------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Column:
    """A table column: ``group`` (dataset, average) and ``metric`` (Base, New, HM, mHM, or empty)."""

    group: str
    metric: str = ""

    @property
    def title(self) -> str:
        return f"{self.group} {self.metric}".strip()


@dataclass
class Cell:
    """One table value: mean over seeds (std/ci95 None for derived values or a single seed)."""

    mean: float | None
    std: float | None = None
    ci95: float | None = None
    seeds: tuple[int, ...] = ()
    incomplete: bool = False


@dataclass
class Row:
    """A table row; kind is ``ours``, ``published`` or ``diff`` (ours minus published)."""

    label: str
    kind: str
    method: Method | None
    cells: dict[Column, Cell]


@dataclass
class Table:
    """A comparison table: methods as rows, datasets as columns."""

    title: str
    protocol: str
    columns: list[Column]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)


def _group_cell(group: Group | None) -> Cell | None:
    if group is None:
        return None
    s = group.stats
    return Cell(s.mean, s.std, s.ci95, group.seeds, not group.complete)


def _mean_cell(cells: list[Cell | None], expected: int) -> Cell | None:
    """Mean over datasets; incomplete when a dataset is missing or one of its cells is incomplete."""
    present = [c for c in cells if c is not None and c.mean is not None]
    if not present:
        return None
    mean = math.fsum(c.mean for c in present) / len(present)
    return Cell(mean, incomplete=len(present) < expected or any(c.incomplete for c in present))


def _order(names: Iterable[str], reference: Sequence[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(reference)}
    return sorted(set(names), key=lambda n: (rank.get(n, len(rank)), n.lower()))


def _order_methods(methods: Iterable[Method], published: dict) -> list[Method]:
    rank = {t: i for i, t in enumerate(published["methods"].values())}
    return sorted(
        set(methods),
        key=lambda m: (rank.get(m.trainer, len(rank)), m.trainer.lower(), m.config, m.shots or 0, str(m.backbone), m.label),
    )


def _row_labels(methods: Sequence[Method]) -> dict[Method, str]:
    """``Trainer (config)``, plus shots/backbone when they tell rows apart, plus the tree label."""
    vary_shots = len({m.shots for m in methods}) > 1
    vary_backbone = len({m.backbone for m in methods if m.backbone}) > 1
    plain = {m: (m.trainer, m.config, m.shots, m.label) for m in methods}
    clashes = {k for k in plain.values() if list(plain.values()).count(k) > 1}
    labels = {}
    for m in methods:
        extra = [m.config] if m.config else []
        if vary_shots:
            extra.append(f"{m.shots} shots" if m.shots is not None else "? shots")
        if vary_backbone or plain[m] in clashes or m.backbone == TOY_BACKBONE:  # a random toy backbone is always named
            extra.append(m.backbone or "backbone ?")
        text = f"{m.trainer} ({', '.join(extra)})" if extra else m.trainer
        labels[m] = f"{text} [{m.label}]" if m.label else text
    return labels


def _incomplete_notes(groups: Iterable[Group], labels: dict[Method, str]) -> list[str]:
    notes = []
    for g in sorted(groups, key=lambda g: (labels[g.method], g.dataset, g.subsample)):
        if not g.complete:
            part = "" if g.subsample == "all" else f" ({g.subsample})"
            notes.append(
                f"{INCOMPLETE_MARK} {labels[g.method]} on {g.dataset}{part}: seeds "
                f"{' '.join(map(str, g.seeds))} of {' '.join(map(str, g.expected_seeds))} "
                f"(missing {' '.join(map(str, g.missing))})"
            )
    return notes


def _comparable(method: Method, published: dict) -> bool:
    return method.shots == published["shots"] and method.backbone in (None, published["backbone"])


def _add_published(table: Table, pub_rows: dict[str, dict[Column, Cell]], published: dict, block: str) -> None:
    """Append published rows and, for our comparable rows, ours-minus-published rows."""
    if not pub_rows:
        table.notes.append(f"No published {table.protocol} numbers for the datasets in this table.")
        return
    ours = [r for r in table.rows if r.kind == "ours"]
    for name, cells in pub_rows.items():
        table.rows.append(Row(f"{name} (published)", "published", None, cells))
    trainer_to_pub = {t: n for n, t in published["methods"].items()}
    for row in ours:
        name = trainer_to_pub.get(row.method.trainer)
        if name not in pub_rows or not _comparable(row.method, published):
            continue
        diff = {}
        for col, cell in row.cells.items():
            ref = pub_rows[name].get(col)
            if cell is not None and ref is not None and cell.mean is not None and ref.mean is not None:
                diff[col] = Cell(cell.mean - ref.mean, incomplete=cell.incomplete or ref.incomplete)
        table.rows.append(Row(f"Δ {row.label} vs published", "diff", row.method, diff))
    sources = "; ".join(published["sources"][s]["url"] for s in published[block]["sources"])
    table.notes.append(
        f"Published: {published['backbone']}, {published['shots']} shots ({sources}); HMs and averages "
        "recomputed here from the published per-dataset numbers. Δ = ours − published."
    )


def _base_new_average(pairs: list[tuple[Cell, Cell]], n_datasets: int) -> dict[Column, Cell]:
    """Average Base and New over datasets (pairs of cells) and the HM of those averages."""
    base = _mean_cell([p[0] for p in pairs], n_datasets)
    new = _mean_cell([p[1] for p in pairs], n_datasets)
    hm = Cell(harmonic_mean(base.mean, new.mean), incomplete=base.incomplete or new.incomplete)
    return {Column("Average", "Base"): base, Column("Average", "New"): new, Column("Average", "HM"): hm}


def _base2new_table(groups: list[Group], published: dict | None, reference: dict) -> list[Table]:
    index = {(g.method, g.dataset, g.subsample): g for g in groups if g.subsample in ("base", "new")}
    if not index:
        return []
    datasets = _order((d for _, d, _ in index), reference["datasets"])
    methods = _order_methods((m for m, _, _ in index), reference)
    labels = _row_labels(methods)
    columns = [Column(d, m) for d in datasets for m in ("Base", "New", "HM", "mHM")]
    average = len(datasets) > 1
    if average:
        columns += [Column("Average", m) for m in ("Base", "New", "HM")]
    table = Table(
        title="base2new: accuracy (%) on base and new classes, mean ± std over seeds",
        protocol="base2new",
        columns=columns,
        rows=[],
    )
    for method in methods:
        cells: dict[Column, Cell | None] = {}
        pairs = []
        for d in datasets:
            base, new = index.get((method, d, "base")), index.get((method, d, "new"))
            cells[Column(d, "Base")], cells[Column(d, "New")] = _group_cell(base), _group_cell(new)
            if base is None or new is None:
                continue
            b, n = base.stats, new.stats
            pairs.append((cells[Column(d, "Base")], cells[Column(d, "New")]))
            hm_cell = Cell(harmonic_mean(b.mean, n.mean), incomplete=not (base.complete and new.complete))
            cells[Column(d, "HM")] = hm_cell
            common = sorted(set(base.values) & set(new.values))
            if common:
                s = summarize([harmonic_mean(base.values[k], new.values[k]) for k in common])
                incomplete = tuple(common) != base.expected_seeds
                cells[Column(d, "mHM")] = Cell(s.mean, s.std, s.ci95, tuple(common), incomplete)
        if average and pairs:
            cells.update(_base_new_average(pairs, len(datasets)))
        table.rows.append(Row(labels[method], "ours", method, {c: v for c, v in cells.items() if v is not None}))
    table.notes.append(
        "HM = harmonic mean of the seed means of Base and New; mHM = mean ± std over seeds of the per-seed "
        "HM." + (" Average = mean over datasets (HM of the averages)." if average else "")
    )
    table.notes += _incomplete_notes([g for g in groups if g.subsample in ("base", "new")], labels)
    table.notes += [
        f"{INCOMPLETE_MARK} {labels[r.method]}: average over fewer than {len(datasets)} datasets or over incomplete ones"
        for r in table.rows
        if r.cells.get(Column("Average", "Base")) and r.cells[Column("Average", "Base")].incomplete
    ]
    if published is not None:
        pub_rows = {}
        for name, per_dataset in published["base2new"]["results"].items():
            cells = {}
            pairs = []
            for d in datasets:
                if d in per_dataset:
                    b, n = per_dataset[d]["base"], per_dataset[d]["new"]
                    cells[Column(d, "Base")], cells[Column(d, "New")] = Cell(b), Cell(n)
                    cells[Column(d, "HM")] = Cell(harmonic_mean(b, n))
                    pairs.append((cells[Column(d, "Base")], cells[Column(d, "New")]))
            if not cells:
                continue
            if average:
                cells.update(_base_new_average(pairs, len(datasets)))
            pub_rows[name] = cells
        _add_published(table, pub_rows, published, "base2new")
    return [table]


def _transfer_tables(protocol: str, groups: list[Group], published: dict | None, reference: dict) -> list[Table]:
    tables = []
    for source in _order({g.source for g in groups}, reference["datasets"]):
        mine = [g for g in groups if g.source == source]
        index = {(g.method, g.dataset): g for g in mine}
        targets = _order((g.dataset for g in mine if g.dataset != source), reference["datasets"])
        methods = _order_methods((g.method for g in mine), reference)
        labels = _row_labels(methods)
        src_col, avg_col = Column(source, "(source)"), Column("Target avg")
        columns = [src_col] + [Column(t) for t in targets] + ([avg_col] if len(targets) > 1 else [])
        what = "target domains" if protocol == "domaingen" else "target datasets"
        table = Table(
            title=f"{protocol}: trained on {source}, accuracy (%) on {what}, mean ± std over seeds",
            protocol=protocol,
            columns=columns,
            rows=[],
        )
        for method in methods:
            cells = {src_col: _group_cell(index.get((method, source)))}
            for t in targets:
                cells[Column(t)] = _group_cell(index.get((method, t)))
            if avg_col in columns:
                cells[avg_col] = _mean_cell([cells[Column(t)] for t in targets], len(targets))
            table.rows.append(Row(labels[method], "ours", method, {c: v for c, v in cells.items() if v is not None}))
        table.notes += _incomplete_notes(mine, labels)
        if published is not None:
            block = published.get(protocol, {})
            pub_rows = {}
            if block.get("source_dataset") == source:
                for name, accs in block["results"].items():
                    cells = {src_col: Cell(accs[source])} if source in accs else {}
                    cells.update({Column(t): Cell(accs[t]) for t in targets if t in accs})
                    if avg_col in columns:
                        cells[avg_col] = _mean_cell([cells.get(Column(t)) for t in targets], len(targets))
                    if cells:
                        pub_rows[name] = {c: v for c, v in cells.items() if v is not None}
            _add_published(table, pub_rows, published, protocol)
        tables.append(table)
    return tables


def _per_dataset_table(protocol: str, groups: list[Group], reference: dict) -> list[Table]:
    index = {(g.method, g.dataset, g.subsample): g for g in groups}
    datasets = _order((g.dataset for g in groups), reference["datasets"])
    methods = _order_methods((g.method for g in groups), reference)
    labels = _row_labels(methods)
    columns = [
        Column(d, "" if s == "all" else s)
        for d in datasets
        for s in SUBSAMPLES
        if any(g.dataset == d and g.subsample == s for g in groups)
    ]
    average = len(columns) > 1 and all(c.metric == "" for c in columns)
    table = Table(
        title=f"{protocol}: accuracy (%) on the test split, mean ± std over seeds",
        protocol=protocol,
        columns=columns + ([Column("Average")] if average else []),
        rows=[],
    )
    for method in methods:
        cells = {c: _group_cell(index.get((method, c.group, c.metric or "all"))) for c in columns}
        if average:
            cells[Column("Average")] = _mean_cell(list(cells.values()), len(columns))
        table.rows.append(Row(labels[method], "ours", method, {c: v for c, v in cells.items() if v is not None}))
    table.notes += _incomplete_notes(groups, labels)
    return [table]


def build_tables(groups: Sequence[Group], protocol: str | None = None, published: dict | None = None) -> list[Table]:
    """Comparison tables for every protocol present (or only ``protocol``).

    ``published`` (from :func:`load_published`) adds published rows and ours-minus-published rows.
    """
    reference = published if published is not None else load_published()
    tables = []
    for proto in _order({g.protocol for g in groups}, PROTOCOLS):
        if protocol is not None and proto != protocol:
            continue
        mine = [g for g in groups if g.protocol == proto]
        if proto == "base2new":
            tables += _base2new_table(mine, published, reference)
        elif proto in TRANSFER_PROTOCOLS:
            tables += _transfer_tables(proto, mine, published, reference)
        else:
            tables += _per_dataset_table(proto, mine, reference)
    for table in tables:
        smoke = _smoke_rows(table)
        if smoke:
            table.notes.insert(0, f"{SMOKE_TITLE} ({'; '.join(r.label for r in smoke)}): they test the pipeline, "
                               "they are not results.")
    return tables


def _smoke_rows(table: Table) -> list[Row]:
    """Our rows run with the toy backbone (a smoke run: random weights)."""
    return [r for r in table.rows if r.kind == "ours" and r.method is not None and r.method.backbone == TOY_BACKBONE]


# ---------------------------------------------------------------------------------------- rendering
def _fmt(value: float | None, signed: bool = False, digits: int = 2) -> str:
    if value is None:
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cell_text(cell: Cell | None, kind: str, pm: str, mark: str) -> str:
    if cell is None or cell.mean is None:
        return "–" if pm == " ± " else "--"
    text = _fmt(cell.mean, signed=kind == "diff")
    if cell.std is not None:
        text += f"{pm}{_fmt(cell.std)}"
    return text + (mark if cell.incomplete else "")


def _header_groups(columns: Sequence[Column]) -> list[tuple[str, int]] | None:
    """Runs of consecutive columns sharing a group, or None when every group is one column wide."""
    spans: list[tuple[str, int]] = []
    for col in columns:
        if spans and spans[-1][0] == col.group:
            spans[-1] = (col.group, spans[-1][1] + 1)
        else:
            spans.append((col.group, 1))
    return spans if any(n > 1 for _, n in spans) else None


def _latex_escape(text: str) -> str:
    out = []
    for ch in text:
        if ch in "&%$#_{}":
            out.append("\\" + ch)
        elif ch == "~":
            out.append(r"\textasciitilde{}")
        elif ch == "^":
            out.append(r"\textasciicircum{}")
        elif ch == "\\":
            out.append(r"\textbackslash{}")
        elif ch == "Δ":
            out.append(r"$\Delta$")
        elif ch == "−":
            out.append("$-$")
        else:
            out.append(ch)
    return "".join(out)


def _render_md(table: Table) -> str:
    header = ["Method"] + [c.title for c in table.columns]
    lines = ["### " + table.title, "", "| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(table.columns)]
    for row in table.rows:
        cells = [_cell_text(row.cells.get(c), row.kind, " ± ", INCOMPLETE_MARK) for c in table.columns]
        lines.append("| " + " | ".join([row.label] + cells) + " |")
    lines.append("")
    lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def _render_latex(table: Table) -> str:
    ncol = len(table.columns)
    lines = [f"% {table.title}", "% generated by python -m tools.results", r"\begin{tabular}{l" + "c" * ncol + "}", r"\toprule"]
    spans = _header_groups(table.columns)
    if spans:
        tops, rules, start = [], [], 2
        for name, width in spans:
            tops.append(rf"\multicolumn{{{width}}}{{c}}{{{_latex_escape(name)}}}" if width > 1 else _latex_escape(name))
            if width > 1:
                rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
            start += width
        lines.append(" & " + " & ".join(tops) + r" \\")
        lines.append(" ".join(rules))
        lines.append("Method & " + " & ".join(_latex_escape(c.metric) for c in table.columns) + r" \\")
    else:
        lines.append("Method & " + " & ".join(_latex_escape(c.title) for c in table.columns) + r" \\")
    lines.append(r"\midrule")
    previous = "ours"
    for row in table.rows:
        if row.kind != previous:
            lines.append(r"\midrule")
            previous = row.kind
        cells = [_cell_text(row.cells.get(c), row.kind, r" $\pm$ ", r"$^\dagger$") for c in table.columns]
        lines.append(" & ".join([_latex_escape(row.label)] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def _render_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["Method", "Kind", "Trainer", "Config", "Shots", "Backbone", "Label"]
    for c in table.columns:
        header += [c.title, f"{c.title} std", f"{c.title} ci95", f"{c.title} seeds", f"{c.title} incomplete"]
    writer.writerow(header)
    for row in table.rows:
        m = row.method
        line = [row.label, row.kind]
        line += [m.trainer, m.config, m.shots, m.backbone or "", m.label] if m else ["", "", "", "", ""]
        for c in table.columns:
            cell = row.cells.get(c)
            if cell is None or cell.mean is None:
                line += ["", "", "", "", ""]
            else:
                seeds = " ".join(map(str, cell.seeds))
                line += [_fmt(cell.mean, digits=4), _fmt(cell.std, digits=4), _fmt(cell.ci95, digits=4), seeds, int(cell.incomplete)]
        writer.writerow(line)
    return buf.getvalue()


def render(tables: Sequence[Table], fmt: str = "md") -> str:
    """Render tables as Markdown (``md``), CSV (``csv``, one block per table) or LaTeX booktabs (``latex``)."""
    renderers = {"md": _render_md, "csv": _render_csv, "latex": _render_latex}
    if fmt not in renderers:
        raise ValueError(f"unknown format {fmt!r}: use one of {FORMATS}")
    return "\n".join(renderers[fmt](t) for t in tables)


def _plot_rows(table: Table) -> list[Row]:
    return [row for row in table.rows if row.kind != "diff"]


def _plot_width(tables: Sequence[Table]) -> float:
    """Figure width in inches: one panel width per panel of the widest table, at least the minimum."""
    return max(PLOT_MIN_WIDTH_INCHES, PLOT_PANEL_INCHES[0] * max(len(_panels(t)) for t in tables))


def _legend_columns(width: float) -> int:
    return max(1, int(width // PLOT_LEGEND_ENTRY_INCHES))


def _text_lines(table: Table, width: float) -> tuple[list[str], list[str]]:
    """The heading and the legend's marker note of a table, wrapped to the figure width."""
    chars = int(width * PLOT_CHARS_PER_INCH)
    heading = textwrap.wrap(_plot_title(table), chars) + (textwrap.wrap(SMOKE_TITLE, chars) if _smoke_rows(table) else [])
    return heading, textwrap.wrap(PLOT_MARKS_NOTE, round(chars * 1.4))  # the note is set in a smaller font


def _table_inches(table: Table, width: float) -> float:
    """Height of one table's part of the figure: heading, panels, legend (its note and its entry lines)."""
    heading, note = _text_lines(table, width)
    entries = math.ceil(len(_plot_rows(table)) / _legend_columns(width))
    return PLOT_PANEL_INCHES[1] + PLOT_LINE_INCHES * (len(heading) + len(note) + entries) + PLOT_MARGIN_INCHES


def plot_size(tables: Sequence[Table]) -> tuple[int, int]:
    """Pixel size (width, height) of the figure :func:`plot` writes for these tables."""
    width = _plot_width(tables)
    return round(width * PLOT_DPI), round(sum(_table_inches(t, width) for t in tables) * PLOT_DPI)


def _panels(table: Table) -> list[tuple[str, list[Column], dict[Column, Column]]]:
    """(panel title, columns on its x axis, column -> column whose std gives the error bar)."""
    if table.protocol == "base2new":
        groups = list(dict.fromkeys(c.group for c in table.columns))
        panels = []
        for metric in ("Base", "New", "HM"):
            cols = [Column(g, metric) for g in groups]
            err = {Column(g, "HM"): Column(g, "mHM") for g in groups} if metric == "HM" else {}
            panels.append((metric, cols, err))
        return panels
    return [(table.title.split(",")[0], list(table.columns), {})]


def _plot_title(table: Table) -> str:
    """A table's heading in the plot: its title (protocol, what is measured) and the backbones of its rows."""
    backbones = sorted({str(r.method.backbone or "?") for r in table.rows if r.method is not None and r.kind == "ours"})
    return f"{table.title} — backbone {', '.join(backbones) or '?'}"


def plot(tables: Sequence[Table], path: str | Path) -> Path:
    """Write :func:`figure` of ``tables`` as a PNG of :func:`plot_size` pixels."""
    path = Path(path)
    fig = figure(tables)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=PLOT_DPI)
    logger.info("wrote %s (%d x %d px)", path, *plot_size(tables))
    return path


def figure(tables: Sequence[Table]):
    """A grouped bar chart (matplotlib ``Figure``, Agg backend): bars per method, error bars = sample std over seeds.

    base2new tables get one panel each for Base, New and HM (HM error bar: std of per-seed HMs); other tables
    one panel of all their columns. Each table gets a heading (its title, backbone and, for the toy backbone,
    the smoke-run warning), a row of panels and a legend under them. A bar of a single seed has no error bar
    and is labelled ``n=1`` (a flat bar would read as std 0); a bar of an incomplete group (seeds missing, the
    table's ``†``) is labelled ``†``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not tables:
        raise ResultsError("nothing to plot: no table was built from the runs found")
    width, height = plot_size(tables)
    inches = _plot_width(tables)
    fig = Figure(figsize=(width / PLOT_DPI, height / PLOT_DPI), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ncols = max(len(_panels(t)) for t in tables)
    heights = [_table_inches(t, inches) for t in tables]
    subfigs = fig.subfigures(len(tables), 1, height_ratios=heights, squeeze=False)[:, 0]
    for table, sub in zip(tables, subfigs):
        heading, note = _text_lines(table, inches)
        rows = _plot_rows(table)
        panels = _panels(table)
        axes = sub.subplots(1, ncols, squeeze=False)[0]
        handles = []
        for c, ax in enumerate(axes):
            if c >= len(panels):
                ax.axis("off")
                continue
            title, cols, err = panels[c]
            width_bar = 0.8 / max(len(rows), 1)
            for i, row in enumerate(rows):
                xs = [j - 0.4 + width_bar * (i + 0.5) for j in range(len(cols))]
                heights_ = [_value(row.cells.get(col)) for col in cols]
                spread = [row.cells.get(err.get(col, col)) or Cell(None) for col in cols]
                errs = [math.nan if cell.std is None else cell.std for cell in spread]
                published = row.kind == "published"
                bars = ax.bar(xs, heights_, width_bar, yerr=errs, capsize=2, label=row.label,
                              hatch="//" if published else None, alpha=0.6 if published else 1.0)
                if c == 0:
                    handles.append(bars)
                for x, h, e, col, cell in zip(xs, heights_, errs, cols, spread):
                    marks = ("n=1" if row.kind == "ours" and len(cell.seeds) == 1 else "") + (
                        INCOMPLETE_MARK if (row.cells.get(col) or Cell(None)).incomplete else "")
                    if marks and not math.isnan(h):
                        ax.annotate(marks, (x, h + (0.0 if math.isnan(e) else e)), xytext=(0, 2),
                                    textcoords="offset points", ha="center", va="bottom", fontsize="x-small")
            ax.set_xticks(range(len(cols)))
            ax.set_xticklabels([col.group if table.protocol == "base2new" else col.title for col in cols],
                               rotation=20, fontsize="small")
            ax.set_title(title if len(panels) > 1 else "", fontsize="medium")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(0, 105)
        sub.suptitle("\n".join(heading), fontsize="large", color="firebrick" if _smoke_rows(table) else "black")
        if handles:
            sub.legend(handles, [r.label for r in rows], loc="outside lower center", ncol=_legend_columns(inches),
                       fontsize="medium", frameon=False, title="\n".join(note), title_fontsize="small")
    return fig


def _value(cell: Cell | None) -> float:
    return math.nan if cell is None or cell.mean is None else cell.mean


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.results",
        description="Turn run folders (results.json, or Dassl log.txt of CoOp-family code) into comparison tables.",
    )
    p.add_argument("dirs", nargs="*", default=["output"], metavar="OUTPUT_DIR",
                   help="output folders to scan (default: output); LABEL=DIR names a tree, to compare trees")
    p.add_argument("--protocol", choices=PROTOCOLS, help="only this protocol (default: every protocol found)")
    p.add_argument("--format", choices=FORMATS, default="md", help="table format (default: md)")
    p.add_argument("--plot", metavar="FILE.png", help="also write a grouped bar chart with error bars")
    p.add_argument("--published", action="store_true", help="add published numbers and our difference to them")
    p.add_argument("--seeds", type=int, nargs="+", metavar="N",
                   help="expected seeds (default: every seed seen in the protocol); groups lacking one are flagged")
    p.add_argument("--output", "-o", metavar="FILE", help="write the tables to FILE instead of stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (1 when no runs are found)."""
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    trees = [parse_tree_arg(a) for a in args.dirs]
    try:
        published = load_published()
        found = collect_runs([p for _, p in trees], [label for label, _ in trees])
        runs = [r for r in found.runs if args.protocol is None or r.protocol == args.protocol]
        if not runs:
            where = ", ".join(str(p) for _, p in trees)
            other = sorted({r.protocol for r in found.runs})
            hint = f" (protocols found: {', '.join(other)})" if other else ""
            raise ResultsError(
                f"no {args.protocol + ' ' if args.protocol else ''}runs found under {where}{hint}; "
                f"{len(found.skipped)} folders skipped. A run folder holds results.json or a Dassl log.txt, e.g. "
                "output/base2new/train_base/<dataset>/shots_16/<Trainer>/<cfg>/seed1"
            )
        groups = aggregate(runs, args.seeds)
        tables = build_tables(groups, args.protocol, published if args.published else None)
        text = render(tables, args.format)
        if args.output:
            write_text_atomic(args.output, text)
            logger.info("wrote %s", args.output)
        else:
            sys.stdout.write(text)
        if args.plot:
            plot(tables, args.plot)
        if any(_smoke_rows(t) for t in tables):
            logger.warning("%s (toy backbone rows)", SMOKE_TITLE)
    except ResultsError as exc:
        logger.error("%s", exc)
        return 1
    incomplete = sum(not g.complete for g in groups)
    logger.info(
        "summary: %d runs (%d read from log.txt), %d groups (%d incomplete), %d skipped%s",
        len(runs), sum(r.from_log for r in runs), len(groups), incomplete, len(found.skipped),
        " (see warnings above)" if found.skipped else "",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
