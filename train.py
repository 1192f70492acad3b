"""Dassl entry point with CoOp's command line, flag for flag.

    python train.py --root DATA --seed 1 --trainer CoOp \
        --dataset-config-file configs/datasets/patternnet.yaml \
        --config-file configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml \
        --output-dir output/... [--eval-only --model-dir DIR --load-epoch N] [KEY VALUE ...]

Besides Dassl's ``log.txt`` it writes ``config.yaml`` and, after testing, ``results.json`` into the output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
DASSL_INSTALL = (
    "Dassl.pytorch is not installed. Install it with: "
    "git clone https://github.com/KaiyangZhou/Dassl.pytorch && cd Dassl.pytorch && git checkout c61a1b5 && "
    "pip install --no-deps --no-build-isolation -e . && pip install --no-deps wilds==1.2.2 && pip install pandas "
    "(or, from a local folder or tarball: DASSL_SRC=/path/to/Dassl.pytorch[.tar.gz] make setup)"
)

logger = logging.getLogger("train")


class _CurrentStdoutHandler(logging.StreamHandler):
    """Log handler writing to whatever ``sys.stdout`` is at emit time (Dassl tees stdout into log.txt)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # noqa: D102
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Tee:
    """Write-through copy of stdout into the run's log file."""

    def __init__(self, console, log_file) -> None:
        self.console, self.log_file = console, log_file

    def write(self, text: str) -> int:
        self.console.write(text)
        self.log_file.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.log_file.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def tee_stdout(output_dir: str):
    """Copy stdout into ``<output_dir>/log.txt`` (Dassl's file name and behaviour: an existing log is kept and
    the new one gets a time suffix); stdout is restored afterwards, so ``main`` can run several times in one
    process (Dassl's own ``setup_logger`` closes the console when its logger is garbage-collected)."""
    path = Path(output_dir) / "log.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path = path.with_name("log.txt" + time.strftime("-%Y-%m-%d-%H-%M-%S"))
    console = sys.stdout
    with open(path, "w") as fh:
        sys.stdout = _Tee(console, fh)
        try:
            yield path
        finally:
            sys.stdout.flush()
            sys.stdout = console


@contextlib.contextmanager
def console_logging():
    """Route library logs (INFO and up) to the current stdout for the duration of a run, then restore the
    root logger as it was (so ``main`` can run in a process whose logging belongs to someone else).

    (Dassl's import-time ``logging.disable(logging.WARNING)`` is lifted where that import happens, in
    ``datasets/remote_sensing.py``, which ``main`` imports before anything else of Dassl.)
    """
    root = logging.getLogger()
    handler = _CurrentStdoutHandler()
    handler.setFormatter(logging.Formatter("[%(levelname)s %(name)s] %(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    """CoOp's argument parser."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=str, default="", help="path to dataset")
    p.add_argument("--output-dir", type=str, default="", help="output directory")
    p.add_argument("--resume", type=str, default="", help="checkpoint directory (from which the training resumes)")
    p.add_argument("--seed", type=int, default=-1, help="only positive value enables a fixed seed")
    p.add_argument("--source-domains", type=str, nargs="+", help="source domains for DA/DG")
    p.add_argument("--target-domains", type=str, nargs="+", help="target domains for DA/DG")
    p.add_argument("--transforms", type=str, nargs="+", help="data augmentation methods")
    p.add_argument("--config-file", type=str, default="", help="path to config file")
    p.add_argument("--dataset-config-file", type=str, default="", help="path to config file for dataset setup")
    p.add_argument("--trainer", type=str, default="", help="name of trainer")
    p.add_argument("--backbone", type=str, default="", help="name of CNN backbone")
    p.add_argument("--head", type=str, default="", help="name of head")
    p.add_argument("--eval-only", action="store_true", help="evaluation only")
    p.add_argument("--model-dir", type=str, default="", help="load model from this directory for eval-only mode")
    p.add_argument("--load-epoch", type=int, help="load model weights at this epoch for evaluation")
    p.add_argument("--no-train", action="store_true", help="do not call trainer.train()")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="modify config options using the command-line")
    return p


def reset_cfg(cfg, args) -> None:
    """Copy command-line values into the config (as CoOp does)."""
    if args.root:
        cfg.DATASET.ROOT = args.root
    if args.output_dir:
        cfg.OUTPUT_DIR = args.output_dir
    if args.resume:
        cfg.RESUME = args.resume
    if args.seed:
        cfg.SEED = args.seed
    if args.source_domains:
        cfg.DATASET.SOURCE_DOMAINS = args.source_domains
    if args.target_domains:
        cfg.DATASET.TARGET_DOMAINS = args.target_domains
    if args.transforms:
        cfg.INPUT.TRANSFORMS = args.transforms
    if args.trainer:
        cfg.TRAINER.NAME = args.trainer
    if args.backbone:
        cfg.MODEL.BACKBONE.NAME = args.backbone
    if args.head:
        cfg.MODEL.HEAD.NAME = args.head
    if args.config_file:
        cfg.BENCH.CONFIG_NAME = Path(args.config_file).stem
    if args.eval_only and args.model_dir:
        source = source_dataset(args.model_dir)
        if source:
            cfg.BENCH.SOURCE_DATASET = source


def source_dataset(model_dir: str) -> str:
    """Dataset a model folder was trained on, read from its ``config.yaml`` ('' if unknown)."""
    path = Path(model_dir) / "config.yaml"
    if not path.is_file():
        return ""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return ""
    return str(data.get("DATASET", {}).get("NAME", ""))


def setup_cfg(args):
    """Default config + every trainer's and the dataset layer's keys, then files, CLI and ``opts``."""
    from dassl.config import get_cfg_default

    import trainers
    from datasets.catalog import add_dataset_config

    cfg = get_cfg_default()
    add_dataset_config(cfg)
    trainers.add_config(cfg)
    for label, path in (("--dataset-config-file", args.dataset_config_file), ("--config-file", args.config_file)):
        if not path:
            continue
        if not os.path.isfile(path):
            raise SystemExit(f"error: {label} {path} does not exist")
        try:
            cfg.merge_from_file(path)
        except (KeyError, ValueError, AssertionError) as exc:
            raise SystemExit(f"error: {label} {path}: {exc}") from exc
    reset_cfg(cfg, args)
    try:
        cfg.merge_from_list(args.opts or [])
    except (KeyError, ValueError, AssertionError) as exc:
        raise SystemExit(f"error: command-line options {args.opts}: {exc}") from exc
    cfg.freeze()
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Run training and/or evaluation; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("dassl") is None:
        sys.stderr.write(DASSL_INSTALL + "\n")
        return 2
    import datasets.remote_sensing  # noqa: F401  (registers the datasets)

    cfg = setup_cfg(args)
    with tee_stdout(cfg.OUTPUT_DIR), console_logging():
        return run(cfg, args)


def run(cfg, args) -> int:
    """Build the trainer from a frozen config and train and/or evaluate."""
    import torch
    from dassl.engine import build_trainer
    from dassl.utils import collect_env_info, set_random_seed

    if cfg.SEED >= 0:
        set_random_seed(cfg.SEED)

    if torch.cuda.is_available() and cfg.USE_CUDA:
        torch.backends.cudnn.benchmark = True
    logger.info("Arguments: %s", vars(args))
    logger.info("Config:\n%s", cfg)
    logger.info("Environment:\n%s", collect_env_info())
    Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    (Path(cfg.OUTPUT_DIR) / "config.yaml").write_text(cfg.dump())

    trainer = build_trainer(cfg)
    if args.eval_only:
        trainer.load_model(args.model_dir, epoch=args.load_epoch)
        trainer.test()
        return 0
    if not args.no_train:
        trainer.train()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
