r"""Train and/or evaluate one run: one trainer, one dataset config, one seed, one output folder.

    python train.py --root DATA --seed 1 --trainer CoOp \
        --dataset-config-file configs/datasets/patternnet.yaml \
        --config-file configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml \
        --output-dir output/... [--eval-only --model-dir DIR --load-epoch N] [KEY VALUE ...]

CoOp's command line, so commands from the CoOp family carry over (Dassl's domain-adaptation flags are
accepted and ignored). Besides Dassl's log.txt the output folder gets config.yaml and, after testing,
results.json. A whole protocol (base-to-new, cross-dataset, ...) is one script: scripts/<trainer>/<protocol>.sh.

The console gets a short header; the full config and environment go to log.txt only. A run holds a lock on
its output folder for its whole life; running again into the same folder continues log.txt and resumes from
the last checkpoint when that checkpoint belongs to the same run. Expected errors (bad input: dataset, split,
images, backbone, captions, checkpoint, config) end the run with one ``error:`` line on stderr (also written to
log.txt) and exit status 2; BIMORS_DEBUG=1 shows the traceback. See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
import time
import traceback
import warnings
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

    def __init__(self, console, log_file, path: Path) -> None:
        self.console, self.log_file, self.path = console, log_file, path

    def write(self, text: str) -> int:
        self.console.write(text)
        self.log_file.write(text)
        return len(text)

    def log_only(self, text: str) -> None:
        """Write ``text`` into the log file only (the full config, the environment, tracebacks)."""
        self.log_file.write(text if text.endswith("\n") else text + "\n")
        self.log_file.flush()

    def flush(self) -> None:
        self.console.flush()
        self.log_file.flush()

    def isatty(self) -> bool:
        return False


RESUME_MARK = "===== resumed"


@contextlib.contextmanager
def tee_stdout(output_dir: str):
    """Copy stdout into ``<output_dir>/log.txt`` and yield the :class:`_Tee`.

    An existing ``log.txt`` (a run stopped earlier, or finished) is continued after a marked line
    (``===== resumed <time> ...``), so it always ends with the latest attempt's results, which is where CoOp's
    parse scripts look (Dassl would start a ``log.txt-<time>`` instead). stdout is restored afterwards, so
    ``main`` can run several times in one process (Dassl's own ``setup_logger`` closes the console when its
    logger is garbage-collected).
    """
    path = Path(output_dir) / "log.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    earlier = path.is_file() and path.stat().st_size > 0
    console = sys.stdout
    with open(path, "a", buffering=1) as fh:  # line-buffered: a killed run keeps its log up to its last line
        if earlier:
            fh.write(
                f"\n{RESUME_MARK} {time.strftime('%Y-%m-%d %H:%M:%S')} (process {os.getpid()}): train.py started "
                "again in this folder; the lines above are earlier attempts =====\n"
            )
        tee = _Tee(console, fh, path)
        sys.stdout = tee
        try:
            yield tee
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


def _catalogue_help() -> str:
    """The ``--help`` epilog: every trainer with its configs, and the dataset configs."""
    from tools.planner import trainer_catalogue, yaml_names

    lines = ["trainers (--trainer NAME) and their configs (--config-file configs/trainers/<folder>/<config>.yaml):"]
    trainers = trainer_catalogue()
    for name, (doc, base) in sorted(trainers.items()):
        folder = name if (CONFIG_ROOT / "trainers" / name).is_dir() or base not in trainers else base
        stems = yaml_names(CONFIG_ROOT / "trainers" / folder)
        lines += [f"  {name:<22}{doc}", f"  {'':<22}{folder}/: {', '.join(stems) or 'none'}"]
    datasets = yaml_names(CONFIG_ROOT / "datasets")
    lines += ["", "datasets (--dataset-config-file configs/datasets/<name>.yaml):", "  " + ", ".join(datasets),
              "", "A protocol is one script: scripts/<trainer>/{base2new,crossdata,domaingen}.sh (see docs/protocols.md)."]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose ``--help`` ends with the catalogue (read from the repository only when shown)."""

    def format_help(self) -> str:
        self.epilog = _catalogue_help()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    """The suite's command line: CoOp's flags; Dassl's unused domain-adaptation flags are accepted but hidden."""
    p = _Parser(prog="python train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("the run")
    run.add_argument("--trainer", type=str, default="", help="trainer name (listed below)")
    run.add_argument("--config-file", type=str, default="", help="trainer config: configs/trainers/<trainer>/*.yaml")
    run.add_argument("--dataset-config-file", type=str, default="", help="dataset config: configs/datasets/*.yaml")
    run.add_argument("--root", type=str, default="", help="data root, the folder holding PatternNet/, RSICD/, ...")
    run.add_argument("--seed", type=int, default=-1, help="random seed, a positive integer (the protocols use 1, 2, 3)")
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
    if args.seed is not None and args.seed != -1:  # CoOp's `if args.seed:` silently dropped --seed 0
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
    from common.errors import ConfigError
    from datasets.catalog import add_dataset_config

    cfg = get_cfg_default()
    add_dataset_config(cfg)
    trainers.add_config(cfg)
    for label, path in (("--dataset-config-file", args.dataset_config_file), ("--config-file", args.config_file)):
        if not path:
            continue
        if not os.path.isfile(path):
            raise ConfigError(f"{label} {path} does not exist")
        try:
            cfg.merge_from_file(path)
        except (KeyError, ValueError, AssertionError) as exc:
            raise ConfigError(f"{label} {path}: {exc}") from exc
    reset_cfg(cfg, args)
    try:
        cfg.merge_from_list(args.opts or [])
    except (KeyError, ValueError, AssertionError) as exc:
        raise ConfigError(f"command-line options {args.opts}: {exc}") from exc
    cfg.freeze()
    return cfg


def check_run_cfg(cfg, args) -> None:
    """Refuse settings that cannot give the run they describe (unknown trainer or dataset, no positive seed,
    a training run of zero epochs), each with a :class:`common.errors.ConfigError` naming the fix."""
    from dassl.engine import TRAINER_REGISTRY

    from common.errors import ConfigError
    from datasets.catalog import spec_from_cfg

    names = sorted(TRAINER_REGISTRY.registered_names())
    if cfg.TRAINER.NAME not in names:
        raise ConfigError(f"unknown trainer {cfg.TRAINER.NAME!r} (--trainer): use one of {', '.join(names)}")
    spec_from_cfg(cfg)  # unknown dataset name, empty --root, bad template: DatasetError naming the fix
    if cfg.SEED < 1:
        raise ConfigError(
            f"SEED is {cfg.SEED}: pass --seed N with a positive integer (the protocols use 1 2 3). A run without a "
            "fixed seed cannot be reproduced, and seed 0 was silently unseeded by CoOp's command line."
        )
    if not (args.eval_only or args.no_train) and cfg.OPTIM.MAX_EPOCH < 1:
        raise ConfigError(
            f"OPTIM.MAX_EPOCH is {cfg.OPTIM.MAX_EPOCH}: a training run needs at least 1 epoch; to evaluate a "
            "model without training it, pass --eval-only (with --model-dir to load trained weights)."
        )


def run_header(cfg) -> str:
    """The console's one-line summary of a run (the full config goes to log.txt only), with the precision the
    run really uses (fp16/amp need a GPU: on a CPU they run in fp32, which the header says once)."""
    import torch
    from dassl.engine import TRAINER_REGISTRY

    from trainers.base import effective_prec

    shots = int(cfg.DATASET.NUM_SHOTS)
    trainer = TRAINER_REGISTRY.get(cfg.TRAINER.NAME)
    configured = trainer.configured_prec(cfg) if hasattr(trainer, "configured_prec") else "fp32"
    prec = effective_prec(configured, "cuda" if torch.cuda.is_available() and cfg.USE_CUDA else "cpu")
    return (
        f"{cfg.TRAINER.NAME} ({cfg.BENCH.CONFIG_NAME or 'default config'}) on {cfg.DATASET.NAME} "
        f"({cfg.DATASET.SUBSAMPLE_CLASSES} classes), {shots if shots >= 1 else 'all'} shots, seed {cfg.SEED}, "
        f"backbone {cfg.MODEL.BACKBONE.NAME}, precision {prec}{'' if prec == configured else f' ({configured} needs a GPU)'}, "
        f"output {cfg.OUTPUT_DIR}"
    )


LOCK_FILE = ".run.lock"


def main(argv: list[str] | None = None) -> int:
    """Run training and/or evaluation; returns the process exit code (2: an expected error, one line on stderr)."""
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("dassl") is None:
        sys.stderr.write(DASSL_INSTALL + "\n")
        return 2
    # OpenAI's clip package imports pkg_resources, which warns about its own deprecation on every run.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated as an API", category=UserWarning)
    from common.errors import ExpectedError, debug_enabled, one_line

    log_path = None
    try:
        import datasets.remote_sensing  # noqa: F401  (registers the datasets)

        cfg = setup_cfg(args)
        check_run_cfg(cfg, args)
        with console_logging(), locked_run_folder(cfg.OUTPUT_DIR), tee_stdout(cfg.OUTPUT_DIR) as tee:
            log_path = tee.path
            try:
                return run(cfg, args, tee)
            except ExpectedError as exc:
                tee.log_only(f"error: {one_line(exc)}\n" + (traceback.format_exc() if debug_enabled() else ""))
                raise
            except BaseException:
                tee.log_only(traceback.format_exc())
                raise
    except ExpectedError as exc:
        if debug_enabled():
            raise
        sys.stdout.flush()
        sys.stderr.write(f"error: {one_line(exc)}\n")
        where = f"log: {log_path}; " if log_path else ""
        sys.stderr.write(f"({where}BIMORS_DEBUG=1 shows the traceback)\n")
        return 2


@contextlib.contextmanager
def locked_run_folder(output_dir: str):
    """Hold the run folder's lock (``<output_dir>/.run.lock``) for the run's life; another live process in the
    same folder is an expected error naming it; a lock left by a killed run is taken over with a note."""
    from common.io import exclusive_lock

    def busy(pid: str) -> str:
        return (
            f"{output_dir} is in use by another run (process {pid}): wait for it to finish, or give this run "
            "another --output-dir"
        )

    with exclusive_lock(Path(output_dir) / LOCK_FILE, describe=busy):
        yield


def run(cfg, args, tee=None) -> int:
    """Build the trainer from a frozen config and train and/or evaluate."""
    import torch
    from dassl.engine import build_trainer
    from dassl.utils import collect_env_info, set_random_seed

    from common.io import write_text_atomic

    set_random_seed(cfg.SEED)
    if torch.cuda.is_available() and cfg.USE_CUDA:
        torch.backends.cudnn.benchmark = True
    logger.info("%s", run_header(cfg))
    details = f"Arguments: {vars(args)}\nConfig:\n{cfg}\nEnvironment:\n{collect_env_info()}\n"
    if tee is not None:
        tee.log_only(details)
    if not args.eval_only and not args.no_train:
        check_resume_point(cfg)  # before config.yaml is replaced: a refused run must not rewrite the record
    write_text_atomic(Path(cfg.OUTPUT_DIR) / "config.yaml", cfg.dump())

    trainer = build_trainer(cfg)
    if args.eval_only:
        trainer.load_model(args.model_dir, epoch=args.load_epoch)
        trainer.test()
        return 0
    if not args.no_train:
        trainer.train()
    return 0


def check_resume_point(cfg) -> None:
    """Before anything is built: refuse to resume from a checkpoint of another run (trainers.base.check_resume)."""
    from dassl.engine import TRAINER_REGISTRY

    from trainers.base import check_resume, load_checkpoint_file, resume_files

    directory = cfg.RESUME or cfg.OUTPUT_DIR
    files = resume_files(directory, [TRAINER_REGISTRY.get(cfg.TRAINER.NAME).MODULE_NAME])
    for _, path in files or []:
        check_resume(load_checkpoint_file(path), path, cfg)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
