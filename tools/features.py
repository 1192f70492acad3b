"""The feature cache from the command line: fill it before the evaluations, and show its disk use.

    python -m tools.features fill RUN [--and RUN ...]
    python -m tools.features du [--root DATA] [DATASET ...]

``fill`` takes the arguments of one or more ``train.py`` runs (``RUN``: ``--root ... --trainer ...
--dataset-config-file ... --config-file ... [KEY VALUE ...]``, without ``--output-dir``), separated by
``--and``, and stores in the dataset's feature cache what their test-split evaluations read from the frozen
image encoder (docs/design.md section 7.1): the same batches, transform, precision and device as the runs,
so that they find every entry. Runs whose entries share a setting and batches are filled in one pass over the
images, with the union of what their models read. A run whose trainer prompts its image encoder, or with
``BENCH.FEATURE_CACHE False``, has nothing to fill. A sweep runs this as its ``features`` phase
(docs/running.md); it can be run by hand before evaluations too.

``du`` lists the cache folders of the datasets under ``DATA`` (default ``$DATA``): per setting, the backbone,
precision, device and bytes per output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("features")

SEPARATOR = "--and"


def split_runs(argv: Sequence[str]) -> list[list[str]]:
    """``RUN [--and RUN ...]`` -> the argument lists of the runs (empty ones dropped)."""
    runs: list[list[str]] = [[]]
    for word in argv:
        if word == SEPARATOR:
            runs.append([])
        else:
            runs[-1].append(word)
    return [run for run in runs if run]


def _batches_digest(loader) -> str:
    """Identity of a loader's evaluation batches: the image paths of every batch, in order."""
    source = loader.dataset.data_source
    text = json.dumps([[source[i].impath for i in batch] for batch in loader.batch_sampler])
    return hashlib.sha256(text.encode()).hexdigest()


def fill(runs: Sequence[Sequence[str]]) -> int:
    """Build each run's trainer, group the runs by feature-cache setting and batches, and fill each group once."""
    import torch
    from dassl.engine import build_trainer

    import datasets.remote_sensing  # noqa: F401  (registers the datasets)
    import train
    from common.errors import ConfigError

    groups: dict[tuple[str, str], tuple[object, list[str], int]] = {}  # -> (trainer that fills, outputs, its run)
    with tempfile.TemporaryDirectory(prefix="features-fill-") as scratch:
        for number, run in enumerate(runs, 1):
            args = train.build_parser().parse_args(["--output-dir", scratch, *run])
            if args.eval_only or args.model_dir:
                raise ConfigError(f"run {number}: give the run's arguments without --eval-only/--model-dir "
                                  "(filling needs no weights)")  # fmt: skip
            cfg = train.setup_cfg(args)
            train.check_run_cfg(cfg, argparse.Namespace(eval_only=True, no_train=True))
            torch.manual_seed(cfg.SEED)
            trainer = build_trainer(cfg)
            cache = trainer.feature_cache(trainer.test_loader)
            if cache is None:
                logger.info("run %d (%s): reads no cached image features; nothing to fill", number, cfg.TRAINER.NAME)
                continue
            key = (cache.setting.key, _batches_digest(trainer.test_loader))
            filler, outputs, first = groups.setdefault(key, (trainer, [], number))
            outputs += [o for o in cache.outputs if o not in outputs]
            logger.info("run %d (%s, %s, %s classes): setting %s, outputs %s%s", number, cfg.TRAINER.NAME,
                        cfg.DATASET.NAME, cfg.DATASET.SUBSAMPLE_CLASSES, cache.setting.key, ", ".join(cache.outputs),
                        f" (same entries as run {first}: filled together)" if first != number else "")  # fmt: skip
            del trainer, filler
        for filler, outputs, _ in groups.values():
            filler.fill_feature_cache(tuple(outputs))
    return 0


def disk_use(root: Path, names: Sequence[str]) -> int:
    """Print the feature-cache folders of the datasets under ``root`` (all, or ``names``) with their sizes."""
    from datasets.catalog import resolve_dataset
    from datasets.feature_cache import disk_use as folder_use

    dirs = [resolve_dataset(name, root).dataset_dir for name in names] if names else sorted(
        p for p in root.iterdir() if p.is_dir())  # fmt: skip
    total = 0
    for use in folder_use(dirs):
        s = use.setting
        sizes = ", ".join(f"{o} {b / 2**20:.1f} MB in {use.files[o]} files" for o, b in sorted(use.bytes.items()))
        sys.stdout.write(f"{use.path}: {s.get('backbone', '?')}, {s.get('precision', '?')}, {s.get('device', '?')}: "
                         f"{sizes or 'empty'}\n")  # fmt: skip
        total += sum(use.bytes.values())
    sys.stdout.write(f"total {total / 2**20:.1f} MB\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.features", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("fill", help="fill the cache for the test-split evaluations of runs")
    p.add_argument("runs", nargs=argparse.REMAINDER, help=f"train.py arguments of a run, runs separated by {SEPARATOR}")
    p = verbs.add_parser("du", help="disk use of the feature caches")
    p.add_argument("--root", help="data root (default $DATA)")
    p.add_argument("datasets", nargs="*", help="dataset names (default: every folder of the data root)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for a bad input, with one ``error:`` line)."""
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated as an API", category=UserWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    runs = split_runs(argv[1:]) if argv[:1] == ["fill"] and not {"-h", "--help"} & set(argv[1:2]) else None
    args = build_parser().parse_args(argv if runs is None else ["fill"])  # a run's options are train.py's, not ours
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(name)s] %(message)s", stream=sys.stderr)
    from common.errors import ExpectedError, one_line

    try:
        if args.verb == "fill":
            if not runs:
                sys.stderr.write("error: give the train.py arguments of at least one run, e.g. fill --root DATA "
                                 "--seed 1 --trainer CoOp --dataset-config-file F --config-file F [KEY VALUE ...]\n")
                return 2
            return fill(runs)
        root = args.root or os.environ.get("DATA")
        if not root or not Path(root).is_dir():
            sys.stderr.write(f"error: data root {root!r} is not a folder: give --root DATA or export DATA\n")
            return 2
        return disk_use(Path(root), args.datasets)
    except ExpectedError as exc:
        sys.stderr.write(f"error: {one_line(exc)}\n")
        return 2


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
