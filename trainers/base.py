"""Shared Dassl adapter for prompt learners.

:class:`PromptTrainer` wires a pure-PyTorch model from ``models/`` into Dassl's ``TrainerX``:

- precision modes ``fp32``, ``fp16`` (upstream: CLIP and the learnable module in half precision),
  ``amp`` (fp16 autocast + GradScaler, fp32 master weights) and ``bf16`` (bf16 autocast);
- the optimizer from Dassl's builder, but the LR schedule (constant/linear warm-up then cosine/step, with
  Dassl's semantics) from torch's own ``LambdaLR``, so neither Dassl bug on torch >= 2.6 is reached;
- checkpoints holding only tensors, plain numbers and strings, loaded with ``torch.load(weights_only=True)``;
- a resume checkpoint after every epoch (``--resume`` or re-running into the same folder continues the
  schedule exactly); every checkpoint records the config that shapes training (:func:`run_fingerprint`)
  and a resume from a checkpoint of another run is refused (:func:`check_resume`);
- ``results.json`` next to Dassl's ``log.txt`` after every test-set evaluation;
- evaluations of models whose image encoder is frozen and unprompted read what the model needs from it from the
  dataset's feature cache (:mod:`datasets.feature_cache`), bit-equal to computing it (``BENCH.FEATURE_CACHE``).

Models used with it expose ``prompt_learner`` (the module holding every learnable parameter, or ``None``)
and ``forward(images, **extras) -> logits``; a :class:`models.encoders.FrozenImageModel` also
``forward_visual(visual, **extras)`` from its image encoder's outputs. A model whose training loss is more than cross-entropy also has
``training_loss(images, labels, **extras) -> (loss, logits, terms)`` (``terms``: named loss parts, logged).
Subclasses may hook the end of every epoch (:meth:`PromptTrainer.on_epoch_end`), the weights kept after the
last one (:meth:`PromptTrainer.final_weights`) and the state a resumed run needs
(:meth:`PromptTrainer.trainer_state`), e.g. PromptSRC's prompt aggregation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import os.path as osp
import pickle
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from clip.model import convert_weights
from dassl.data import DataManager
from dassl.engine import TRAINER_REGISTRY, TrainerX
from dassl.metrics import compute_accuracy
from dassl.optim import build_optimizer
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from yacs.config import CfgNode as CN

from common.errors import ConfigError, ExpectedError
from common.io import atomic_path, write_json_atomic, write_text_atomic
from common.precision import GPU_ONLY, PRECISIONS
from common.precision import autocast as precision_autocast
from datasets.feature_cache import FeatureCache, Setting, describe_transform, device_name
from datasets.remote_sensing import NamedImageErrors
from models.weights import load_clip

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESUME_FILE = "model-resume.pth.tar"


def add_common_config(cfg: CN) -> None:
    """Config keys shared by every trainer (added before any yaml is merged)."""
    cfg.MODEL.BACKBONE.PATH = ""  # explicit CLIP weights: OpenAI .pt, state dict, or Hugging Face folder
    cfg.BENCH = CN()
    cfg.BENCH.PROTOCOL = "custom"  # base2new | crossdata | domaingen | fewshot | custom (recorded in results.json)
    cfg.BENCH.CONFIG_NAME = ""  # trainer config file stem; train.py fills it in
    cfg.BENCH.SOURCE_DATASET = ""  # dataset the evaluated model was trained on (eval-only runs)
    cfg.BENCH.RESUME_EVERY_EPOCH = True  # write a small resume checkpoint after every epoch
    # evaluations of models with a frozen, unprompted image encoder read its outputs from the dataset's feature
    # cache (DATA/<Dir>/features), computing and storing what is missing (docs/design.md section 7.1)
    cfg.BENCH.FEATURE_CACHE = True


# ----------------------------------------------------------------------------------------------------------
# Learning-rate schedule (Dassl's semantics, torch's LambdaLR)
# ----------------------------------------------------------------------------------------------------------
def lr_factor_fn(optim_cfg: CN, base_lr: float) -> Callable[[int], float]:
    """Multiplicative LR factor per epoch index, reproducing Dassl's ``build_lr_scheduler``.

    Dassl steps the scheduler once per epoch. With a warm-up of ``W`` epochs (``WARMUP_RECOUNT`` True, the
    default of every config here) epochs ``0..W-1`` use the warm-up LR, then the successor schedule restarts
    from its own epoch 0 (cosine over ``MAX_EPOCH`` epochs, not ``MAX_EPOCH - W``, as in Dassl).
    """
    kind, max_epoch = optim_cfg.LR_SCHEDULER, float(optim_cfg.MAX_EPOCH)
    warmup = int(optim_cfg.WARMUP_EPOCH) if optim_cfg.WARMUP_EPOCH > 0 else 0
    if warmup and not optim_cfg.WARMUP_RECOUNT:
        raise ConfigError(
            "OPTIM.WARMUP_RECOUNT False is not supported (no config of this project uses it); set it to True."
        )
    if kind == "cosine":

        def successor(e: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * e / max_epoch))

    elif kind == "single_step":
        step = optim_cfg.STEPSIZE[-1] if isinstance(optim_cfg.STEPSIZE, (list, tuple)) else optim_cfg.STEPSIZE
        step = int(step) if int(step) > 0 else int(max_epoch)

        def successor(e: int) -> float:
            return optim_cfg.GAMMA ** (e // step)

    elif kind == "multi_step":
        milestones = sorted(int(m) for m in optim_cfg.STEPSIZE)

        def successor(e: int) -> float:
            return optim_cfg.GAMMA ** sum(e >= m for m in milestones)

    else:
        raise ConfigError(
            f"OPTIM.LR_SCHEDULER {kind!r} is not supported; use one of cosine, single_step, multi_step."
        )

    def factor(epoch: int) -> float:
        if epoch < warmup:
            if optim_cfg.WARMUP_TYPE == "constant":
                return optim_cfg.WARMUP_CONS_LR / base_lr
            if optim_cfg.WARMUP_TYPE == "linear":
                return (optim_cfg.WARMUP_MIN_LR / base_lr) if epoch == 0 else epoch / warmup
            raise ConfigError(f"OPTIM.WARMUP_TYPE {optim_cfg.WARMUP_TYPE!r} must be 'constant' or 'linear'.")
        return successor(epoch - warmup)

    return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: CN) -> torch.optim.lr_scheduler.LambdaLR:
    """Torch ``LambdaLR`` with Dassl's warm-up + successor semantics (see :func:`lr_factor_fn`)."""
    fns = [lr_factor_fn(optim_cfg, group["lr"]) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fns)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
class CheckpointError(ExpectedError, RuntimeError):
    """A checkpoint that cannot be used: damaged, not a checkpoint, pickled objects, or missing."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint asked for (``--model-dir``/``--load-epoch``) is not there."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint that does not fit the model (another class count, config or trainer)."""


class ResumeMismatchError(ExpectedError):
    """The run folder holds a checkpoint of another run (another config)."""


#: config keys (prefixes) that shape training: a checkpoint continues only a run that agrees on all of them
FINGERPRINT_PREFIXES = (
    "SEED", "DATASET.", "INPUT.", "OPTIM.", "MODEL.", "TRAIN.COUNT_ITER", "DATALOADER.TRAIN_X.",
    "DATALOADER.K_TRANSFORMS", "DATALOADER.RETURN_IMG0", "TRAINER.NAME",
)  # fmt: skip
#: keys under those prefixes that do not change what is trained (where the data lives)
FINGERPRINT_EXCLUDED = ("DATASET.ROOT",)
_SHOW_DIFFS = 6


def _flatten(node: CN, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, CN):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def run_fingerprint(cfg: CN) -> dict[str, object]:
    """The config that shapes training: seed, dataset (shots, subsample, split...), input, optimiser and schedule,
    backbone, the trainer's name and every key of its own ``TRAINER.<NODE>`` (e.g. ``TRAINER.COOP.N_CTX``)."""
    name = cfg.TRAINER.NAME
    node = TRAINER_REGISTRY.get(name).CONFIG_NODE if name in TRAINER_REGISTRY.registered_names() else ""
    prefixes = FINGERPRINT_PREFIXES + ((f"TRAINER.{node}.",) if node else ())
    return {
        key: value
        for key, value in sorted(_flatten(cfg).items())
        if key.startswith(prefixes) and key not in FINGERPRINT_EXCLUDED
    }


def fingerprint_diff(stored: dict[str, object], current: dict[str, object]) -> list[str]:
    """``KEY: checkpoint A, this run B`` for every key whose value differs (or is missing on one side)."""
    missing = "(absent)"
    return [
        f"{key}: checkpoint {stored.get(key, missing)}, this run {current.get(key, missing)}"
        for key in sorted(set(stored) | set(current))
        if stored.get(key, missing) != current.get(key, missing)
    ]


def save_checkpoint_file(state: dict, path: Path) -> None:
    """``torch.save`` through a temporary file unique to this process, so an interrupted write never leaves a
    complete-looking file and two writers never share a temporary name."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint_file(path: Path) -> dict:
    """Load one of our checkpoints with ``weights_only=True`` (no code is unpickled).

    Raises :class:`CheckpointError` saying which of three things is wrong: the file is damaged or not a
    checkpoint; it holds pickled Python objects (other code's checkpoint); or it holds no ``state_dict``.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated zips, empty files and foreign bytes
        if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):
            raise CheckpointError(
                f"Checkpoint {path} holds pickled Python objects, which are not loaded (torch.load "
                "weights_only=True). Checkpoints written by this project hold only tensors and numbers; for one "
                "from other code, load it there and re-save its 'state_dict' with "
                "torch.save({'state_dict': ..., 'epoch': N}, path)."
            ) from exc
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"Checkpoint {path} is damaged or not a checkpoint ({reason}): delete it, or restore it from a good copy."
        ) from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        what = f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else "a dict without 'state_dict'"
        raise CheckpointError(
            f"Checkpoint {path} holds {what}, not a checkpoint (a dict with 'state_dict' and 'epoch'). "
            "Save weights as torch.save({'state_dict': module.state_dict(), 'epoch': N}, path)."
        )
    return ckpt


def resume_files(directory: str | Path, names: list[str]) -> list[tuple[str, Path]] | None:
    """``(module name, checkpoint path)`` that a resume from ``directory`` reads, or None when there is none.

    Each module's folder holds a ``checkpoint`` file naming its latest checkpoint (Dassl's layout).
    """
    pointers = [Path(directory) / n / "checkpoint" for n in names]
    if not names or not all(p.is_file() for p in pointers):
        return None
    return [(n, p.parent / p.read_text().strip()) for n, p in zip(names, pointers)]


def check_resume(ckpt: dict, path: Path, cfg: CN) -> None:
    """Refuse (:class:`ResumeMismatchError`) a resume checkpoint whose run config differs from ``cfg``'s."""
    directory = path.parent.parent
    ways_out = (
        f"Give this run another --output-dir, or delete {directory} to start it from scratch there."
    )
    stored = ckpt.get("run_config")
    if not isinstance(stored, str):
        raise ResumeMismatchError(
            f"{directory} holds a checkpoint ({path.name}, epoch {ckpt.get('epoch')}) without a record of its "
            f"run's config (written by an older version), so it cannot be resumed safely. {ways_out}"
        )
    diffs = fingerprint_diff(json.loads(stored), json.loads(json.dumps(run_fingerprint(cfg))))  # as stored: JSON
    if diffs:
        shown = "; ".join(diffs[:_SHOW_DIFFS]) + (f"; and {len(diffs) - _SHOW_DIFFS} more" if len(diffs) > _SHOW_DIFFS else "")
        raise ResumeMismatchError(
            f"{directory} holds a checkpoint of another run ({path.name}, epoch {ckpt.get('epoch')}), "
            f"which differs in {shown}. {ways_out}"
        )


def rng_state() -> dict:
    """Random-number-generator states (torch, CUDA, Python, NumPy) as tensors and plain numbers."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(mt), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured, so a resumed run draws the same batches and augmentations."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def effective_prec(prec: str, device_type: str) -> str:
    """The precision a run uses: ``prec``, except that fp16 and amp need a GPU and run in fp32 on the CPU."""
    return "fp32" if prec in GPU_ONLY and device_type == "cpu" else prec


def git_sha() -> str | None:
    """The current commit of this repository, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def check_input_size(clip_model: nn.Module, cfg: CN) -> None:
    """The images of ``INPUT.SIZE`` fit the backbone (its positional embeddings fix the input size), else ValueError."""
    side = clip_model.visual.input_resolution
    if tuple(cfg.INPUT.SIZE) != (side, side):
        raise ValueError(
            f"Backbone {cfg.MODEL.BACKBONE.NAME!r} takes {side}x{side} images but INPUT.SIZE is "
            f"{tuple(cfg.INPUT.SIZE)}: add the option INPUT.SIZE \"({side}, {side})\" (after -- in the scripts)."
        )


class PromptTrainer(TrainerX):
    """Base Dassl trainer for CLIP prompt learners (see module docstring)."""

    #: name of the trainer's config node under ``cfg.TRAINER`` (e.g. ``"COOP"``)
    CONFIG_NODE: str = ""
    #: registered module name; also the checkpoint sub-folder (upstream: ``prompt_learner``)
    MODULE_NAME = "prompt_learner"
    #: buffers of upstream checkpoints that depend on the class list and are rebuilt, not loaded
    IGNORED_CHECKPOINT_KEYS: tuple[str, ...] = ("token_prefix", "token_suffix")

    # -- configuration ------------------------------------------------------------------------------------
    @property
    def prec(self) -> str:
        """Effective precision (:func:`effective_prec`; train.py's header shows it, results.json records it)."""
        return effective_prec(self.configured_prec(self.cfg), self.device.type)

    @classmethod
    def configured_prec(cls, cfg: CN) -> str:
        """``TRAINER.<CONFIG_NODE>.PREC`` of ``cfg`` (fp32 for trainers without one)."""
        node = cfg.TRAINER.get(cls.CONFIG_NODE) if cls.CONFIG_NODE else None
        return node.PREC if node is not None and "PREC" in node else "fp32"

    def check_cfg(self, cfg: CN) -> None:
        prec = self.configured_prec(cfg)
        if prec not in PRECISIONS:
            raise ConfigError(f"TRAINER.{self.CONFIG_NODE}.PREC is {prec!r}; choose one of {', '.join(PRECISIONS)}.")

    # -- data ---------------------------------------------------------------------------------------------
    def build_data_loader(self) -> None:
        """Dassl's data loaders (same attributes as ``SimpleTrainer.build_data_loader``), with a dataset wrapper
        whose unreadable images are errors naming the file (:class:`datasets.remote_sensing.NamedImageErrors`)."""
        dm = DataManager(self.cfg, dataset_wrapper=NamedImageErrors)
        self.train_loader_x, self.train_loader_u = dm.train_loader_x, dm.train_loader_u
        self.val_loader, self.test_loader = dm.val_loader, dm.test_loader
        self.num_classes, self.num_source_domains = dm.num_classes, dm.num_source_domains
        self.lab2cname = dm.lab2cname
        self.dm = dm

    # -- model --------------------------------------------------------------------------------------------
    #: the method's model class (``models/``), built with ``(clip_model, classnames, **model_arguments(...))``
    MODEL: type[nn.Module] | None = None

    @classmethod
    def model_arguments(cls, cfg: CN, template: str, caption_dim: int = 0) -> dict:
        """Keyword arguments of ``MODEL`` besides ``(clip_model, classnames)``: from the config, the dataset's
        hand-written ``template`` and, for a model that reads captions, the caption vectors' dimension. The
        matrix cost report (:mod:`tools.cost`) builds the models of a sweep from them too."""
        return {}

    def build_prompt_model(self, clip_model: nn.Module, classnames: list[str]) -> nn.Module:
        """The method's model: ``MODEL`` with :meth:`model_arguments` of this run."""
        return self.MODEL(clip_model, classnames, **self.model_arguments(self.cfg, self.dataset_template()))

    def dataset_template(self, default: str = "a photo of a {}.") -> str:
        """The hand-crafted prompt template of the dataset (from the catalogue or its yaml)."""
        return getattr(self.dm.dataset, "template", None) or default

    def build_model(self) -> None:
        cfg = self.cfg
        self._t_start = time.time()
        classnames = list(self.dm.dataset.classnames)
        logger.info("Loading CLIP backbone %s", cfg.MODEL.BACKBONE.NAME)
        clip_model = load_clip(cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.PATH or None, device="cpu")
        check_input_size(clip_model, cfg)
        if self.prec == "fp16":
            convert_weights(clip_model)  # upstream behaviour: CLIP weights in half precision
        logger.info("Building %s with %d classes", type(self).__name__, len(classnames))
        self.model = self.build_prompt_model(clip_model, classnames)
        learner = getattr(self.model, "prompt_learner", None)
        for name, param in self.model.named_parameters():
            param.requires_grad_(learner is not None and name.startswith("prompt_learner."))
        if learner is not None and self.prec == "fp16":
            learner.half()
        self.model.to(self.device)
        n_learn = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info("Learnable parameters: %s", f"{n_learn:,}")
        self.scaler = torch.amp.GradScaler(self.device.type) if self.prec == "amp" else None
        if learner is None:
            self.optim = self.sched = None
            return
        self.optim = build_optimizer(learner, cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model(self.MODULE_NAME, learner, self.optim, self.sched)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for the configured precision."""
        return precision_autocast(self.device.type, self.prec)

    # -- batches ------------------------------------------------------------------------------------------
    def batch_extras(self, batch: dict) -> dict:
        """Extra keyword inputs of the model for a batch (e.g. caption vectors); none by default."""
        return {}

    def parse_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Images, labels and extra model inputs of a Dassl batch, on the trainer's device."""
        images = batch["img"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        return images, labels, self.batch_extras(batch)

    def compute_loss(
        self, images: torch.Tensor, labels: torch.Tensor, extras: dict
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, logits, terms)`` of a training batch: the model's ``training_loss`` if it has one, else
        cross-entropy on its logits."""
        training_loss = getattr(self.model, "training_loss", None)
        if training_loss is not None:
            return training_loss(images, labels, **extras)
        logits = self.model(images, **extras)
        return F.cross_entropy(logits.float(), labels), logits, {}

    def forward_backward(self, batch: dict) -> dict:
        images, labels, extras = self.parse_batch(batch)
        with self.autocast():
            loss, logits, terms = self.compute_loss(images, labels, extras)
        self.detect_anomaly(loss)
        self.optim.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optim)
            self.scaler.update()
        else:
            loss.backward()
            self.optim.step()
        summary = {"loss": loss.item(), **{k: float(v) for k, v in terms.items()}}
        summary["acc"] = compute_accuracy(logits, labels)[0].item()
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return summary

    @torch.no_grad()
    def model_inference(self, images: torch.Tensor, **extras) -> torch.Tensor:
        with self.autocast():
            return self.model(images, **extras).float()

    @torch.no_grad()
    def visual_inference(self, visual: dict[str, torch.Tensor], **extras) -> torch.Tensor:
        """:meth:`model_inference` from the image encoder's outputs (a :class:`FrozenImageModel`)."""
        with self.autocast():
            return self.model.forward_visual(visual, **extras).float()

    # -- the feature cache ----------------------------------------------------------------------------------
    def feature_cache(self, loader, outputs: tuple[str, ...] = ()) -> FeatureCache | None:
        """The dataset's feature cache for the evaluation batches of ``loader`` (the model's ``VISUAL_OUTPUTS``,
        or ``outputs``), or None: switched off (``BENCH.FEATURE_CACHE False``), or a model that prompts its image
        encoder or reads nothing from it."""
        model = self.model
        outputs = outputs or tuple(getattr(model, "VISUAL_OUTPUTS", ()))
        if not self.cfg.BENCH.FEATURE_CACHE or getattr(model, "IMAGE_ENCODER_PROMPTED", True) or not outputs:
            return None
        if getattr(self, "_encoder_fingerprint", None) is None:
            self._encoder_fingerprint = model.visual.fingerprint()
        setting = Setting(
            backbone=self.cfg.MODEL.BACKBONE.PATH or self.cfg.MODEL.BACKBONE.NAME,
            encoder=self._encoder_fingerprint,
            transform=describe_transform(loader.dataset.transform),
            precision=self.prec,
            device=device_name(self.device),
            torch=torch.__version__,
        )
        dataset = self.dm.dataset
        return FeatureCache(Path(dataset.dataset_dir), Path(dataset.image_dir), setting, outputs)

    def eval_batches(self, loader, cache: FeatureCache | None,
                     missing_only: bool = False) -> Iterator[tuple[dict, dict | None]]:  # fmt: skip
        """``(batch, visual)`` for every batch of ``loader`` in order. Without a cache ``visual`` is None and the
        batch holds the images. With one, ``visual`` holds the cache's outputs of the batch: read, or computed on the
        batch's images (exactly as the model's forward computes them) and stored; a batch read from the cache holds
        labels and paths only (its images are not loaded). ``missing_only``: only the batches whose entries are
        not stored yet (a fill; what is stored is checked when an evaluation reads it)."""
        if cache is None:
            yield from ((batch, None) for batch in loader)
            return
        source = loader.dataset.data_source
        batches = list(loader.batch_sampler)
        keys = [cache.batch_key([source[i].impath for i in indices]) for indices in batches]
        stored = [key is not None and cache.has(key) for key in keys]  # decided once: the loader below follows it
        missing = [indices for indices, found in zip(batches, stored) if not found]
        loaded = iter(DataLoader(loader.dataset, batch_sampler=missing, num_workers=loader.num_workers,
                                 collate_fn=loader.collate_fn, pin_memory=loader.pin_memory) if missing else ())  # fmt: skip
        for indices, key, found in zip(batches, keys, stored):
            if found and missing_only:
                continue
            visual = None
            if not found:
                batch = next(loaded)
                if batch["index"].tolist() != list(indices):
                    raise RuntimeError(f"feature cache: loaded batch {batch['index'].tolist()}, expected {indices}")
            else:
                visual = cache.read(key)
                batch = {"label": torch.tensor([source[i].label for i in indices]),
                         "impath": [source[i].impath for i in indices], "index": torch.tensor(indices)}  # fmt: skip
                if visual is None:  # damaged or foreign entry (reported): load the batch and compute it
                    batch = loader.collate_fn([loader.dataset[i] for i in indices])
            if visual is None:
                with torch.no_grad(), self.autocast():
                    visual = self.model.visual.outputs(batch["img"].to(self.device), cache.outputs)
                if key is not None:
                    cache.write(key, visual)
            yield batch, {name: value.to(self.device) for name, value in visual.items()}

    @torch.no_grad()
    def fill_feature_cache(self, outputs: tuple[str, ...] = ()) -> FeatureCache | None:
        """Compute and store what the test-split evaluation reads from the feature cache (the model's outputs, or
        ``outputs``) where it is not stored yet; None when this run uses no cache."""
        cache = self.feature_cache(self.test_loader, outputs)
        if cache is None:
            logger.info("%s reads no cached image features (prompted image encoder, or BENCH.FEATURE_CACHE False)",
                        self.cfg.TRAINER.NAME)  # fmt: skip
            return None
        for _ in tqdm(self.eval_batches(self.test_loader, cache, missing_only=True), desc="fill", leave=False):
            pass
        logger.info("%s", cache.summary())
        return cache

    # -- evaluation and results ---------------------------------------------------------------------------
    @torch.no_grad()
    def eval_logits(self, loader, cache: FeatureCache | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(labels, logits)`` of every batch of ``loader``, on the device; with ``cache``, the model reads its image
        encoder's outputs from it (:meth:`eval_batches`)."""
        for batch, visual in self.eval_batches(loader, cache):
            labels, extras = batch["label"].to(self.device, non_blocking=True), self.batch_extras(batch)
            if visual is None:
                logits = self.model_inference(batch["img"].to(self.device, non_blocking=True), **extras)
            else:
                logits = self.visual_inference({k: visual[k] for k in self.model.VISUAL_OUTPUTS}, **extras)
            yield labels, logits

    @torch.no_grad()
    def test(self, split: str | None = None) -> float:
        """Evaluate on ``split`` (default ``TEST.SPLIT``); write ``results.json`` for the test split."""
        self.set_model_mode("eval")
        self.model.eval()
        self.evaluator.reset()
        split = split or self.cfg.TEST.SPLIT
        loader = self.val_loader if split == "val" and self.val_loader is not None else self.test_loader
        split = "val" if loader is self.val_loader and split == "val" else "test"
        logger.info("Evaluate on the *%s* set", split)
        self._eval_labels: tuple[list[int], list[int]] = ([], [])  # (true, predicted), for per-class accuracy
        cache = self.feature_cache(loader)
        for labels, logits in tqdm(self.eval_logits(loader, cache), total=len(loader), desc=f"eval {split}",
                                   leave=False):  # fmt: skip
            self.evaluator.process(logits, labels)
            self._eval_labels[0].extend(labels.tolist())
            self._eval_labels[1].extend(logits.max(1)[1].tolist())  # the prediction Dassl's evaluator counts
        if cache is not None:
            logger.info("%s", cache.summary())
        results = self.evaluator.evaluate()
        for key, value in results.items():
            self.write_scalar(f"{split}/{key}", value, self.epoch)
        if split == "test":
            self.write_results(results)
        return list(results.values())[0]

    def write_results(self, results: dict) -> Path:
        """Write ``results.json`` (docs/design.md section 3) into the output folder."""
        cfg = self.cfg
        y_true, y_pred = self._eval_labels
        per_class: dict[str, float] = {}
        for label, name in sorted(self.lab2cname.items()):
            hits = [p == t for t, p in zip(y_true, y_pred) if t == label]
            if hits:
                per_class[name] = 100.0 * sum(hits) / len(hits)
        record = {
            "trainer": cfg.TRAINER.NAME,
            "dataset": cfg.DATASET.NAME,
            "protocol": cfg.BENCH.PROTOCOL,
            "split": "test",
            "subsample": cfg.DATASET.get("SUBSAMPLE_CLASSES", "all"),
            "shots": int(cfg.DATASET.NUM_SHOTS),
            "seed": int(cfg.SEED),
            "backbone": cfg.MODEL.BACKBONE.NAME,
            "config": cfg.BENCH.CONFIG_NAME,
            "epoch": int(getattr(self, "_loaded_epoch", None) or getattr(self, "_trained_epochs", 0)),
            "precision": self.prec,
            "accuracy": float(results["accuracy"]),
            "macro_f1": float(results["macro_f1"]),
            "per_class": per_class,
            "n_test": len(y_true),
            "seconds": round(time.time() - getattr(self, "_t_start", time.time()), 3),
            "git_sha": git_sha(),
        }
        if int(cfg.DATASET.NUM_SHOTS) >= 1:
            record["shots_per_class"] = dict(getattr(self.dm.dataset, "shots_per_class", {}))
        if cfg.BENCH.SOURCE_DATASET and cfg.BENCH.SOURCE_DATASET != cfg.DATASET.NAME:
            record["source_dataset"] = cfg.BENCH.SOURCE_DATASET
        path = Path(cfg.OUTPUT_DIR) / "results.json"
        write_json_atomic(path, record, indent=2)
        logger.info("Wrote %s (accuracy %.2f%%)", path, record["accuracy"])
        return path

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _checkpoint_state(self, name: str, epoch: int, val_result: float | None) -> dict:
        sched = self._scheds[name]
        return {
            "state_dict": {k: v.detach().cpu() for k, v in self._models[name].state_dict().items()},
            "epoch": int(epoch + 1),
            "optimizer": self._optims[name].state_dict() if self._optims[name] is not None else None,
            "scheduler": sched.state_dict() if sched is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "val_result": None if val_result is None else float(val_result),
            "rng": rng_state(),
            "run_config": json.dumps(run_fingerprint(self.cfg)),
            "trainer_state": self.trainer_state(),
        }

    def save_model(self, epoch, directory, is_best=False, val_result=None, model_name=""):
        for name in self.get_model_names():
            fname = model_name or f"model.pth.tar-{epoch + 1}"
            folder = Path(directory) / name
            save_checkpoint_file(self._checkpoint_state(name, epoch, val_result), folder / fname)
            if fname != "model-best.pth.tar":
                write_text_atomic(folder / "checkpoint", fname + "\n")
            logger.log(logging.DEBUG if fname == RESUME_FILE else logging.INFO, "Checkpoint saved to %s", folder / fname)

    # -- training hooks -----------------------------------------------------------------------------------
    def on_epoch_end(self) -> None:
        """Hook: after every training epoch (``self.epoch``), before its checkpoint is written."""

    def final_weights(self) -> None:
        """Hook: after the last training epoch, before its checkpoint and the final test; may replace the
        learned weights by the ones to keep (e.g. an average over epochs)."""

    def trainer_state(self) -> dict:
        """Hook: what a resumed run needs besides weights, optimizer and schedule (tensors and plain numbers);
        saved in every checkpoint."""
        return {}

    def load_trainer_state(self, state: dict) -> None:
        """Hook: restore what :meth:`trainer_state` returned, when a run resumes."""

    def after_epoch(self) -> None:
        self._trained_epochs = self.epoch + 1
        self.on_epoch_end()
        if self.epoch + 1 == self.max_epoch:
            self.final_weights()
        super().after_epoch()
        last = (self.epoch + 1) == self.max_epoch
        freq = self.cfg.TRAIN.CHECKPOINT_FREQ
        saved = last or (freq > 0 and (self.epoch + 1) % freq == 0)
        if self.cfg.BENCH.RESUME_EVERY_EPOCH and not saved:
            self.save_model(self.epoch, self.output_dir, model_name=RESUME_FILE)
        elif saved:
            for name in self.get_model_names():
                Path(self.output_dir, name, RESUME_FILE).unlink(missing_ok=True)

    def resume_model_if_exist(self, directory: str) -> int:
        files = resume_files(directory, self.get_model_names())
        if files is None:
            logger.info("No checkpoint found in %s: training from scratch", directory)
            return 0
        start_epoch = 0
        for name, path in files:
            ckpt = load_checkpoint_file(path)
            check_resume(ckpt, path, self.cfg)
            self._models[name].load_state_dict(ckpt["state_dict"])
            if self._optims[name] is not None and ckpt.get("optimizer") is not None:
                self._optims[name].load_state_dict(ckpt["optimizer"])
            if self._scheds[name] is not None and ckpt.get("scheduler") is not None:
                self._scheds[name].load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            if ckpt.get("rng"):
                set_rng_state(ckpt["rng"])
            if ckpt.get("trainer_state"):
                self.load_trainer_state(ckpt["trainer_state"])
            start_epoch = int(ckpt["epoch"])
            logger.info("Resumed %s from %s (continuing at epoch %d)", name, path, start_epoch + 1)
        return start_epoch

    def load_model(self, directory: str, epoch: int | None = None) -> None:
        """Load trained weights for evaluation (``--model-dir``/``--load-epoch``)."""
        if not directory:
            logger.info("No --model-dir given: evaluating without loading weights")
            return
        fname = f"model.pth.tar-{epoch}" if epoch is not None else "model-best.pth.tar"
        for name in self.get_model_names():
            path = Path(directory) / name / fname
            if not path.is_file():
                folder = path.parent
                present = sorted(p.name for p in folder.glob("model*")) if folder.is_dir() else []
                raise CheckpointNotFoundError(
                    f"No checkpoint {fname} in {folder} (looked for {path}). "
                    f"Checkpoints there: {present or 'none'}. "
                    "Train first, or pass --load-epoch N matching a file model.pth.tar-N."
                )
            ckpt = load_checkpoint_file(path)
            self._load_state(name, ckpt["state_dict"], path)
            self._loaded_epoch = int(ckpt.get("epoch") or 0)
            logger.info("Loaded %s into %s (epoch %s)", path, name, self._loaded_epoch)

    def convert_checkpoint_state(self, state: dict, path: Path) -> dict:
        """Hook: adapt a loaded ``state_dict`` (e.g. upstream key names) or reject it with a clear error."""
        return state

    def _load_state(self, name: str, state: dict, path: Path) -> None:
        module = self._models[name]
        own = module.state_dict()
        state = self.convert_checkpoint_state(state, path)
        state = {k: v for k, v in state.items() if k.split(".")[-1] not in self.IGNORED_CHECKPOINT_KEYS}
        for key, value in state.items():
            if key in own and own[key].shape != value.shape:
                raise CheckpointMismatchError(
                    f"Checkpoint {path}: '{key}' has shape {tuple(value.shape)} but this model expects "
                    f"{tuple(own[key].shape)}. The checkpoint was trained with a different class count or "
                    "config (e.g. class-specific context, N_CTX, or another caption encoder); "
                    "evaluate it with the config and classes it was trained with."
                )
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"Checkpoint {path} does not match {type(module).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}. Was it trained with another trainer or config?"
            )

    def before_train(self) -> None:
        directory = self.cfg.RESUME or self.cfg.OUTPUT_DIR
        self.start_epoch = self.resume_model_if_exist(directory)
        writer_dir = osp.join(self.output_dir, "tensorboard")
        os.makedirs(writer_dir, exist_ok=True)
        self.init_writer(writer_dir)
        self.time_start = time.time()
