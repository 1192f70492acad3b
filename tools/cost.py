"""The compute of a whole comparison matrix (``python -m tools.sweep cost SWEEP.yaml``).

For every run of a sweep (training runs: their steps and their final test; evaluation runs: their test) the
FLOPs of three formulations, counted with the benchmark's FLOP counter (:func:`tools.bench.count_flops`) on the
real model sizes of the run's backbone with random weights and the real class names of the run's dataset:

- ``published``: the straightforward formulations of :mod:`models.reference` (what the published code
  computes), each image through the image encoder at every evaluation;
- ``ours``: the suite's exact fast paths, without the feature cache;
- ``cached``: the fast paths with the feature cache: the runs that read it compute no image encoder at
  evaluation; each distinct set of entries (dataset, classes, backbone, precision, transform, batch size) is
  computed once, by the sweep's ``features`` phase.

A run costs ``training steps x FLOPs per step + evaluated images x FLOPs per image`` (plus, per evaluation batch,
what a model computes once per batch: CoOp's class prompts, for instance). FLOPs are affine in the batch size
(every operation is per image, or once per batch), so each is counted at batches of 1 and 2 and extrapolated to
the run's batch size. Training steps per epoch are Dassl's: ``floor(train images / batch)``. Split sizes come from
the split files under the data root when they are there (exact), otherwise from the catalogue's totals with
classes of equal size (an estimate, marked ``~``). The image encoder's precision groups the cached entries:
``--device cuda`` (default) uses each config's precision, as the runs do on a GPU; ``--device cpu`` runs
everything in fp32, so trainers of other precisions share entries too; ``--device cuda cpu`` reports both from
one count.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.io import write_json_atomic
from tools import bench

if TYPE_CHECKING:
    from tools.sweep import Sweep

logger = logging.getLogger(__name__)

FORMULATIONS = ("published", "ours", "cached")


@dataclass(frozen=True)
class Affine:
    """FLOPs ``once + per_item * n``."""

    once: int
    per_item: int

    def at(self, n: int) -> int:
        return self.once + self.per_item * n


def affine(count_at: Callable[[int], int]) -> Affine:
    """The affine FLOP count from counts at 1 and 2 items."""
    one, two = count_at(1), count_at(2)
    return Affine(2 * one - two, two - one)


@dataclass
class ModelFlops:
    """FLOPs of one model (a trainer, its arguments, its class names): per training step and per evaluation batch
    (affine in the batch size) by formulation, and one image's pass through the frozen image encoder."""

    train: dict[str, Affine] = field(default_factory=dict)  # published, ours
    eval: dict[str, Affine] = field(default_factory=dict)  # published, ours, cached (when the model reads it)
    visual: int = 0  # per image; 0 for a model that prompts its image encoder


@dataclass
class SplitCounts:
    """Training and test images per label, and whether they come from a split file (exact) or an estimate."""

    train: dict[int, float]
    test: dict[int, float]
    exact: bool


@dataclass
class RunCost:
    """One run of the sweep: what it computes, and its FLOPs by formulation."""

    key: str
    trainer: str
    dataset: str
    subsample: str
    classes: int
    steps: int
    train_batch: int
    n_test: int
    test_batch: int
    exact: bool
    group: str  # the feature-cache entries it reads ('' when it reads none)
    flops: ModelFlops

    def train_flops(self, formulation: str) -> int:
        if not self.steps:
            return 0
        return self.steps * self.flops.train["published" if formulation == "published" else "ours"].at(self.train_batch)

    def eval_flops(self, formulation: str) -> int:
        which = formulation if formulation != "cached" or self.group else "ours"
        cost = self.flops.eval[which]
        return math.ceil(self.n_test / self.test_batch) * cost.once + self.n_test * cost.per_item


# ------------------------------------------------------------------------------------------ split sizes
def split_counts(spec) -> SplitCounts:
    """Images per label of a dataset's train and test splits: from its split file (or its generated split) when
    it is under the data root, else estimated from the catalogue's totals (classes of equal size)."""
    from datasets import storage
    from datasets.splits import read_split_file, split_sizes

    path = spec.split_path if spec.split_path is not None else storage.existing(spec.generated_split_path)
    if path is not None and path.is_file():
        splits = read_split_file(path, spec.split_md5, spec.allow_split_mismatch, spec.split_sizes)
        counts = {}
        for part in ("train", "test"):
            per_label: dict[int, float] = {}
            for _, label, _ in splits[part]:
                per_label[label] = per_label.get(label, 0) + 1
            counts[part] = per_label
        return SplitCounts(counts["train"], counts["test"], True)
    info = spec.info
    if info is None or not info.classnames:
        raise ValueError(f"{spec.label}: no split file under {spec.root} and no catalogue row to estimate its sizes")
    n = len(info.classnames)
    if info.split_sizes:
        train, test = info.split_sizes[0] / n, info.split_sizes[2] / n
    elif info.num_images:
        train, _, test = split_sizes(info.num_images / n)
    else:
        raise ValueError(f"{spec.label}: no split file under {spec.root}, and the catalogue has no size for it")
    return SplitCounts(dict.fromkeys(range(n), train), dict.fromkeys(range(n), test), False)


# ------------------------------------------------------------------------------------------ FLOP counts
class FlopCounts:
    """FLOPs of the models of a sweep, counted once per (trainer, arguments, class names, backbone); with ``path``,
    kept in that JSON file across reports (FLOP counts depend on nothing else)."""

    def __init__(self, path: Path | None = None) -> None:
        self.clips: dict[str, object] = {}
        self.known: dict[str, ModelFlops] = {}
        self.path = path
        if path is not None and path.is_file():
            for key, value in json.loads(path.read_text()).items():
                self.known[key] = ModelFlops({k: Affine(*v) for k, v in value["train"].items()},
                                             {k: Affine(*v) for k, v in value["eval"].items()}, value["visual"])  # fmt: skip

    def save(self) -> None:
        if self.path is not None:
            data = {key: {"train": {k: [a.once, a.per_item] for k, a in f.train.items()},
                          "eval": {k: [a.once, a.per_item] for k, a in f.eval.items()}, "visual": f.visual}
                    for key, f in self.known.items()}  # fmt: skip
            write_json_atomic(self.path, data, indent=1)

    def get(self, trainer: str, backbone: str, arguments: dict, classnames: Sequence[str], train: bool) -> ModelFlops:
        key = json.dumps([trainer, backbone, arguments, list(classnames)], sort_keys=True, default=str)
        flops = self.known.setdefault(key, ModelFlops())
        if flops.eval and (flops.train or not train):
            return flops
        if backbone not in self.clips:
            self.clips[backbone] = bench.build_random_clip(backbone)
        clip = self.clips[backbone]
        case = bench.CASES[trainer](clip, list(classnames), **arguments)
        side = clip.visual.input_resolution
        gen = torch.Generator().manual_seed(0)

        def counter(fn: Callable[..., object]) -> Callable[[int], int]:
            """Batch size -> FLOPs of ``fn(images, labels, extras)`` on random inputs of that size."""

            def count(b: int) -> int:
                images = torch.randn(b, 3, side, side, generator=gen)
                labels = torch.randint(0, len(classnames), (b,), generator=gen)
                flops = bench.count_flops(lambda: fn(images, labels, case.extras(b)))
                case.model.zero_grad(set_to_none=True)
                return flops

            return count

        model = case.model
        if not flops.eval:
            logger.info("counting %s (%d classes): evaluation", trainer, len(classnames))
            # with autograd on, as tools.bench counts evaluations (its module tracker needs it)
            flops.eval["published"] = affine(counter(lambda images, _, extras: case.reference(images, **extras)))
            flops.eval["ours"] = affine(counter(lambda images, _, extras: model(images, **extras)))
            if not getattr(model, "IMAGE_ENCODER_PROMPTED", True):
                flops.visual = counter(lambda images, *_: model.visual.outputs(images, model.VISUAL_OUTPUTS))(1)

                def cached(b: int) -> int:  # the model's forward after the image encoder, on its outputs
                    images = torch.randn(b, 3, side, side, generator=gen)
                    visual, extras = model.encode_visual(images), case.extras(b)
                    return bench.count_flops(lambda: model.forward_visual(visual, **extras))

                flops.eval["cached"] = affine(cached)
        if train and not flops.train:
            logger.info("counting %s (%d classes): training step", trainer, len(classnames))
            for formulation in ("published", "ours"):
                flops.train[formulation] = affine(counter(
                    lambda images, labels, extras, f=formulation: case.training_loss(images, labels, f, **extras).backward()))
        self.save()
        return flops


# ------------------------------------------------------------------------------------------ the matrix
def run_costs(sweep: Sweep, device: str, counts: FlopCounts | None = None) -> list[RunCost]:
    """The cost of every run of ``sweep`` (finished or not)."""
    from dassl.engine import TRAINER_REGISTRY

    import datasets.remote_sensing  # noqa: F401  (registers the datasets)
    import train
    from datasets.catalog import spec_from_cfg
    from datasets.splits import subsample_labels
    from trainers.base import effective_prec

    counts = counts or FlopCounts()
    splits: dict[str, SplitCounts] = {}
    out = []
    for step in sweep.plan().runs:
        args = train.build_parser().parse_args(list(step.commands[0][2:]))
        cfg = train.setup_cfg(args)
        cls = TRAINER_REGISTRY.get(cfg.TRAINER.NAME)
        spec = spec_from_cfg(cfg)
        if spec.name not in splits:
            splits[spec.name] = split_counts(spec)
        sizes = splits[spec.name]
        subsample = str(cfg.DATASET.SUBSAMPLE_CLASSES)
        labels = subsample_labels(range(len(sizes.test)), subsample)
        classnames = [spec.display_name(c) for c in (spec.classnames or ())]
        classnames = [classnames[i] for i in labels]
        trains = not args.eval_only
        shots, batch = int(cfg.DATASET.NUM_SHOTS), int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE)
        n_train = round(sum(min(shots, sizes.train[i]) if shots > 0 else sizes.train[i] for i in labels))
        steps = int(cfg.OPTIM.MAX_EPOCH) * (n_train // batch if n_train >= batch else 1) if trains else 0
        arguments = cls.model_arguments(cfg, spec.template, bench.CAPTION_DIM)
        flops = counts.get(cfg.TRAINER.NAME, cfg.MODEL.BACKBONE.NAME, arguments, classnames, trains)
        group = ""
        if cfg.BENCH.FEATURE_CACHE and "cached" in flops.eval:
            prec = cls.configured_prec(cfg) if device == "cuda" else effective_prec(cls.configured_prec(cfg), device)
            group = json.dumps([spec.name, subsample, cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.PATH, prec,
                                str(cfg.INPUT), int(cfg.DATALOADER.TEST.BATCH_SIZE)])  # fmt: skip
        out.append(RunCost(step.key, cfg.TRAINER.NAME, spec.name, subsample, len(labels), steps, batch,
                           round(sum(sizes.test[i] for i in labels)), int(cfg.DATALOADER.TEST.BATCH_SIZE),
                           sizes.exact, group, flops))  # fmt: skip
    return out


def totals(costs: Sequence[RunCost]) -> dict:
    """Training, evaluation and total FLOPs by formulation; with the cache, the fills of each distinct entry set
    count once (one pass of the image encoder over its images)."""
    fills = {c.group: c.n_test * c.flops.visual for c in costs if c.group}
    out = {}
    for f in FORMULATIONS:
        training = sum(c.train_flops(f) for c in costs)
        evaluation = sum(c.eval_flops(f) for c in costs) + (sum(fills.values()) if f == "cached" else 0)
        out[f] = {"train": training, "eval": evaluation, "total": training + evaluation}
    distinct = {c.group: c.n_test for c in costs if c.group}
    out["encoder_images"] = {"without_cache": sum(c.n_test for c in costs if c.group), "with_cache": sum(distinct.values())}
    return out


def _unit(flops: float) -> tuple[float, str]:
    """The unit that shows ``flops`` (the largest total) with a few digits before the point."""
    for scale, name in ((1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")):
        if flops >= scale:
            return scale, name
    return 1.0, "FLOP"


def render(costs: Sequence[RunCost], total: dict, sweep_name: str, device: str) -> str:
    """Markdown: one row per trainer, then the totals by formulation and their ratios."""
    scale, unit = _unit(total["published"]["total"])

    def fmt(flops: float) -> str:
        return f"{flops / scale:,.1f}"

    lines = [f"Sweep {sweep_name}: {len(costs)} runs; FLOPs counted by tools.bench at the runs' model sizes (random "
             f"weights); cached entries grouped by precision as on a {'GPU' if device == 'cuda' else 'CPU'}.", "",
             f"| trainer | runs (train / eval only) | training steps | evaluated images | (a) published ({unit}) | "
             f"(b) ours ({unit}) | (c) ours + cache, without the fills ({unit}) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for trainer in dict.fromkeys(c.trainer for c in costs):
        rows = [c for c in costs if c.trainer == trainer]
        approx = "" if all(c.exact for c in rows) else "~"
        lines.append(f"| {trainer} | {sum(c.steps > 0 for c in rows)} / {sum(c.steps == 0 for c in rows)} | "
                     f"{sum(c.steps for c in rows):,} | {approx}{sum(c.n_test for c in rows):,} | "
                     + " | ".join(fmt(sum(c.train_flops(f) + c.eval_flops(f) for c in rows)) for f in FORMULATIONS)
                     + " |")  # fmt: skip
    t = total
    fills = t["cached"]["eval"] - sum(c.eval_flops("cached") for c in costs)
    lines += [
        "",
        f"| {unit} | (a) published, no cache | (b) ours, no cache | (c) ours + feature cache |",
        "|---|---|---|---|",
        *(f"| {name} | " + " | ".join(fmt(t[f][part]) for f in FORMULATIONS) + " |"
          for name, part in (("training", "train"), ("evaluation", "eval"))),  # fmt: skip
        "| **total** | " + " | ".join(f"**{fmt(t[f]['total'])}**" for f in FORMULATIONS) + " |",
        "",
        f"Ratios: (a)/(b) {ratio(t, 'published', 'ours')}, (b)/(c) {ratio(t, 'ours', 'cached')}, "
        f"(a)/(c) {ratio(t, 'published', 'cached')}. With the cache, evaluation includes its fills ({fmt(fills)} "
        f"{unit}): the image encoder runs over {t['encoder_images']['with_cache']:,} images instead of "
        f"{t['encoder_images']['without_cache']:,} for the runs that read the cache.",
    ]
    estimated = sorted({c.dataset for c in costs if not c.exact})
    if estimated:
        lines.append(f"Split sizes estimated from the catalogue's totals with classes of equal size (no split file "
                     f"under the data root): {', '.join(estimated)} (~).")  # fmt: skip
    return "\n".join(lines)


def ratio(total: dict, a: str, b: str) -> str:
    return f"{total[a]['total'] / total[b]['total']:.2f}x" if total[b]["total"] else "-"


def report(sweep: Sweep, devices: Sequence[str] = ("cuda",), json_path: Path | None = None,
           counts_path: Path | None = None) -> int:
    """Count (once for every device; reusing ``counts_path``), print the tables of each device and optionally
    write them as JSON."""
    counts, out = FlopCounts(counts_path), {}
    for device in devices:
        costs = run_costs(sweep, device, counts)
        total = totals(costs)
        sys.stdout.write(render(costs, total, sweep.name, device) + "\n\n")
        rows = [{**{k: v for k, v in asdict(c).items() if k != "flops"},
                 **{f"{f}_flops": c.train_flops(f) + c.eval_flops(f) for f in FORMULATIONS}} for c in costs]  # fmt: skip
        out[device] = {"totals": total, "runs": rows}
    if json_path is not None:
        write_json_atomic(json_path, {"sweep": sweep.name, **out}, indent=1)
    return 0
