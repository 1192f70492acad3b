r"""Train and/or evaluate one run: one trainer, one dataset config, one seed, one output folder.

    python train.py --root DATA --seed 1 --trainer CoOp \
        --dataset-config-file configs/datasets/patternnet.yaml \
        --config-file configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml \
        --output-dir output/... [--eval-only --model-dir DIR --load-epoch N] [KEY VALUE ...]

CoOp's command line, so commands from the CoOp family carry over (Dassl's domain-adaptation flags are
accepted and ignored). Besides Dassl's log.txt the output folder gets config.yaml and, after testing,
results.json. A whole protocol (base-to-new, cross-dataset, ...) is one script: scripts/<trainer>/<protocol>.sh.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
CONFIG_ROOT = REPO_ROOT / "configs"
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


def registered_trainers() -> dict[str, tuple[str, str]]:
    """Trainers registered in ``trainers/*.py``, read from the source (no import, so no Dassl or torch needed).

    Returns ``{registry name: (first docstring line, name of the trainer it extends or '')}``.
    """
    found: dict[str, tuple[str, str]] = {}
    for path in sorted((REPO_ROOT / "trainers").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "register"
                and isinstance(d.func.value, ast.Name) and d.func.value.id == "TRAINER_REGISTRY"
                for d in node.decorator_list
            ):  # fmt: skip
                base = next((b.id for b in node.bases if isinstance(b, ast.Name)), "")
                found[node.name] = ((ast.get_docstring(node) or "").split("\n")[0], base)
    return found


def _catalogue_help() -> str:
    """The ``--help`` epilog: every trainer with its configs, and the dataset configs."""
    lines = ["trainers (--trainer NAME) and their configs (--config-file configs/trainers/<folder>/<config>.yaml):"]
    trainers = registered_trainers()
    for name, (doc, base) in sorted(trainers.items()):
        folder = name if (CONFIG_ROOT / "trainers" / name).is_dir() or base not in trainers else base
        stems = sorted(p.stem for p in (CONFIG_ROOT / "trainers" / folder).glob("*.yaml"))
        lines += [f"  {name:<22}{doc}", f"  {'':<22}{folder}/: {', '.join(stems) or 'none'}"]
    datasets = sorted(p.stem for p in (CONFIG_ROOT / "datasets").glob("*.yaml"))
    lines += ["", "datasets (--dataset-config-file configs/datasets/<name>.yaml):", "  " + ", ".join(datasets),
              "", "A protocol is one script: scripts/<trainer>/{base2new,crossdata,domaingen}.sh (see docs/protocols.md)."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The suite's command line: CoOp's flags; Dassl's unused domain-adaptation flags are accepted but hidden."""
    p = argparse.ArgumentParser(
        prog="python train.py", description=__doc__, epilog=_catalogue_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    run = p.add_argument_group("the run")
    run.add_argument("--trainer", type=str, default="", help="trainer name (listed below)")
    run.add_argument("--config-file", type=str, default="", help="trainer config: configs/trainers/<trainer>/*.yaml")
    run.add_argument("--dataset-config-file", type=str, default="", help="dataset config: configs/datasets/*.yaml")
    run.add_argument("--root", type=str, default="", help="data root, the folder holding PatternNet/, RSICD/, ...")
    run.add_argument("--seed", type=int, default=-1, help="random seed (the protocols use 1, 2, 3)")
    run.add_argument("--output-dir", type=str, default="", help="run folder (log.txt, config.yaml, checkpoints, "
                     "results.json)")  # fmt: skip
    run.add_argument("--backbone", type=str, default="", help="CLIP backbone, sets MODEL.BACKBONE.NAME "
                     "(ViT-B/16, ViT-B/32, RN50, ..., toy)")  # fmt: skip
    run.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                     help="config overrides as KEY VALUE pairs, e.g. OPTIM.MAX_EPOCH 5 DATALOADER.NUM_WORKERS 0")
    ev = p.add_argument_group("evaluation and resuming")
    ev.add_argument("--eval-only", action="store_true", help="evaluate only (with --model-dir: trained weights)")
    ev.add_argument("--model-dir", type=str, default="", help="folder of a trained run to evaluate")
    ev.add_argument("--load-epoch", type=int, help="epoch of the checkpoint to evaluate (default: model-best)")
    ev.add_argument("--resume", type=str, default="", help="run folder to resume from (default: --output-dir)")
    ev.add_argument("--no-train", action="store_true", help="build everything, train nothing")
    for flag, kwargs in (("--source-domains", {"nargs": "+"}), ("--target-domains", {"nargs": "+"}),
                         ("--transforms", {"nargs": "+"}), ("--head", {"default": ""})):  # CoOp's, unused here
        p.add_argument(flag, type=str, help=argparse.SUPPRESS, **kwargs)
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

    from common.io import write_text_atomic

    if cfg.SEED >= 0:
        set_random_seed(cfg.SEED)

    if torch.cuda.is_available() and cfg.USE_CUDA:
        torch.backends.cudnn.benchmark = True
    logger.info("Arguments: %s", vars(args))
    logger.info("Config:\n%s", cfg)
    logger.info("Environment:\n%s", collect_env_info())
    write_text_atomic(Path(cfg.OUTPUT_DIR) / "config.yaml", cfg.dump())

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
