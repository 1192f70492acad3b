"""Benchmark: our exact fast path against the straightforward formulation, per trainer.

    python -m tools.bench --trainers BiMoRS CoCoOp CoOp --backbone ViT-B/16 --batch 4 [--json bench.json]

For each trainer the same model (random weights at the real architecture sizes; no download) runs two
formulations on identical inputs and weights:

- ``ours``: what the trainers run (one text-encoder call over B x C prompts, truncated after the longest
  end-of-text token, ``[SOS] + context`` encoded once per image and shared by its classes, only the EOT row in
  the last layer, scaled-dot-product attention, image encoder under ``no_grad``);
- ``reference``: the published formulation of :mod:`models.reference` (a loop over images, all 77 tokens
  through CLIP's stock text transformer, CLIP's stock image encoder), the same the exactness tests use.

It reports the median time of a training step (forward + backward + SGD step) and of an evaluation batch after
warm-up (ours also from the feature cache: the model's forward after a frozen image encoder, on its stored
outputs), images/s, the text-encoder part alone (prompts in, features out, forward + backward), peak memory
(CUDA max allocated, or the RSS increase sampled during the step on CPU), FLOPs per step (torch's FLOP counter)
and the achieved FLOP/s against the machine's measured fp32 (or bf16) matrix-multiply throughput.

That throughput is sampled between the timed training steps (square products of the fastest size, about half a
second per sample, before and after each step) and compared with the same statistic: median step against median
sample, fastest step against fastest sample. A shared or throttled machine then affects both sides alike.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from clip.model import CLIP
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from common.io import write_json_atomic
from common.precision import AUTOCAST_DTYPES
from common.precision import autocast as precision_autocast
from models import reference
from models.weights import BACKBONES, random_clip

logger = logging.getLogger(__name__)

CAPTION_DIM = 768  # bert-base-uncased


def build_random_clip(backbone: str, seed: int = 0) -> CLIP:
    """CLIP with random weights at the architecture of ``backbone`` (a name of :data:`models.weights.BACKBONES`)."""
    if backbone not in BACKBONES:
        raise SystemExit(f"error: --backbone {backbone!r} unknown; choose one of {', '.join(BACKBONES)}")
    return random_clip(backbone, seed)


def bench_classnames(spec: str) -> list[str]:
    """Class names: a catalogue dataset's display names (``patternnet``) or ``N`` synthetic names."""
    if spec.isdigit():
        return [f"category {i}" for i in range(int(spec))]
    from datasets.catalog import resolve_dataset

    info = resolve_dataset(spec, root="/nonexistent")
    names = [info.display_name(c) for c in info.classnames or ()]
    if not names:
        raise SystemExit(f"error: dataset {spec!r} has no class list in the catalogue; pass a number of classes")
    return names


# ----------------------------------------------------------------------------------------------------------
# Trainers: how to build each model and its straightforward reference
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One trainer under benchmark."""

    model: nn.Module
    clip_model: CLIP
    extras: Callable[[int], dict]  # batch size -> extra model inputs
    reference: Callable[..., torch.Tensor]  # (images, **extras) -> logits, the straightforward formulation
    prompts: Callable[..., torch.Tensor] | None = None  # (images, **extras) -> truncated prompts (text timing)
    reference_loss: Callable[..., torch.Tensor] | None = None  # (images, labels, **extras) -> the training loss
    # when it is more than the cross-entropy of ``reference``'s logits

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, formulation: str, **extras) -> torch.Tensor:
        """The training loss of a batch: the model's (``ours``) or the straightforward formulation's."""
        if formulation == "ours":
            training_loss = getattr(self.model, "training_loss", None)
            if training_loss is not None:
                return training_loss(images, labels, **extras)[0]
            return F.cross_entropy(self.model(images, **extras).float(), labels)
        if self.reference_loss is not None:
            return self.reference_loss(images, labels, **extras)
        return F.cross_entropy(self.reference(images, **extras).float(), labels)


# Each builder takes the CLIP model, the class names and the model's keyword arguments (the trainer's
# ``model_arguments`` of a run's config; the defaults below are the published configs' where they matter).
def make_bimors(clip_model: CLIP, classnames: list[str], **options) -> Case:
    from models.bimors import BiMoRSModel

    model = BiMoRSModel(clip_model, classnames, **({"caption_dim": CAPTION_DIM} | options))
    dim = model.prompt_learner.caption_dim

    def prompts(images, captions):
        with torch.no_grad():
            _, tokens = model.visual(images)
        return model.prompt_learner.prompts.prefix(model.prompt_learner(tokens, captions))

    return Case(
        model=model,
        clip_model=clip_model,
        extras=lambda b: {"captions": torch.randn(b, dim, generator=torch.Generator().manual_seed(b))},
        reference=lambda images, captions: reference.bimors_logits(model, clip_model, images, captions),
        prompts=prompts,
    )


def make_cocoop(clip_model: CLIP, classnames: list[str], **options) -> Case:
    from models.cocoop import CoCoOpModel

    model = CoCoOpModel(clip_model, classnames, **({"n_ctx": 4, "ctx_init": "a photo of a"} | options))

    def prompts(images):
        with torch.no_grad():
            feats, _ = model.visual(images)
        return model.prompt_learner(F.normalize(feats, dim=-1))

    return Case(
        model=model,
        clip_model=clip_model,
        extras=lambda b: {},
        reference=lambda images: reference.cocoop_logits(model, clip_model, images),
        prompts=prompts,
    )


def make_coop(clip_model: CLIP, classnames: list[str], **options) -> Case:
    from models.coop import CoOpModel

    model = CoOpModel(clip_model, classnames, **({"n_ctx": 16, "ctx_init": ""} | options))
    return Case(model=model, clip_model=clip_model, extras=lambda b: {},
                reference=lambda images: reference.coop_logits(model, clip_model, images),
                prompts=lambda images: model.prompt_learner())


def make_kgcoop(clip_model: CLIP, classnames: list[str], **options) -> Case:
    from models.kgcoop import KgCoOpModel, knowledge_guided_loss

    options = {"template": "a photo of a {}.", "n_ctx": 4, "ctx_init": "a photo of a"} | options
    model = KgCoOpModel(clip_model, classnames, **options)

    def reference_loss(images, labels):
        text = reference.coop_text(model, clip_model)
        logits = reference.logits(clip_model, clip_model.encode_image(images), text)
        return knowledge_guided_loss(logits, labels, F.normalize(text, dim=-1), model.clip_text_features, model.weight)[0]

    return Case(model=model, clip_model=clip_model, extras=lambda b: {},
                reference=lambda images: reference.coop_logits(model, clip_model, images),
                prompts=lambda images: model.prompt_learner(), reference_loss=reference_loss)


def make_applenet(clip_model: CLIP, classnames: list[str], **options) -> Case:
    from models.applenet import APPLeNetModel, applenet_loss

    model = APPLeNetModel(clip_model, classnames, **({"n_ctx": 4, "ctx_init": "a photo of a"} | options))

    def prompts(images):
        _, ctx = model.forward_with_context(model.encode_visual(images))
        return model.prompt_learner.prompts.prefix(ctx)

    def reference_loss(images, labels):
        logits, ctx = reference.applenet_logits(model, clip_model, images)
        return applenet_loss(logits, labels, ctx, model.temperature, model.crp_weight)[0]

    return Case(model=model, clip_model=clip_model, extras=lambda b: {},
                reference=lambda images: reference.applenet_logits(model, clip_model, images)[0], prompts=prompts,
                reference_loss=reference_loss)


def make_zsclip(clip_model: CLIP, classnames: list[str], **options) -> Case:
    from models.zsclip import ZeroshotModel

    model = ZeroshotModel(clip_model, classnames, **({"templates": ["a photo of a {}."]} | options))
    return Case(model=model, clip_model=clip_model, extras=lambda b: {},
                reference=lambda images: reference.zeroshot_logits(model, clip_model, images))


def make_clip_adapter(clip_model: CLIP, classnames: list[str], **options) -> Case:
    from models.clip_adapter import CLIPAdapterModel

    model = CLIPAdapterModel(clip_model, classnames, **({"template": "a photo of a {}."} | options))
    return Case(model=model, clip_model=clip_model, extras=lambda b: {},
                reference=lambda images: reference.clip_adapter_logits(model, clip_model, images))


def make_maple(clip_model: CLIP, classnames: list[str], **options) -> Case:
    from models.maple import MaPLeModel

    options = {"n_ctx": 2, "ctx_init": "a photo of a", "prompt_depth": 9} | options
    model = MaPLeModel(clip_model, classnames, **options)
    return Case(model=model, clip_model=clip_model, extras=lambda b: {},
                reference=lambda images: reference.maple_logits(model, clip_model, images, options["ctx_init"]))


def make_promptsrc(clip_model: CLIP, classnames: list[str], **options) -> Case:
    from models.prompts import ensemble_templates
    from models.promptsrc import PromptSRCModel, Views, self_regularised_loss

    options = {"templates": ensemble_templates("a photo of a {}."), "ctx_init": "a photo of a"} | options
    model = PromptSRCModel(clip_model, classnames, **options)
    ctx_init = options["ctx_init"]

    def reference_loss(images, labels):  # the frozen text features are computed once, as upstream does
        prompted, frozen = reference.promptsrc_views(model, clip_model, images, ctx_init, (),
                                                     frozen_text=model.frozen_text_features)  # fmt: skip
        return self_regularised_loss(Views(**prompted), Views(**frozen), labels, model.text_weight,
                                     model.image_weight)[0]  # fmt: skip

    return Case(model=model, clip_model=clip_model, extras=lambda b: {},
                reference=lambda images: reference.logits(clip_model, *reference.promptsrc_logits(
                    model, clip_model, images, ctx_init)), reference_loss=reference_loss)  # fmt: skip


#: every trainer's case (by registered trainer name); the cost report (tools.cost) builds them with the
#: arguments of a run's config
CASES: dict[str, Callable[..., Case]] = {
    "BiMoRS": make_bimors, "CoCoOp": make_cocoop, "CoOp": make_coop, "APPLeNet": make_applenet,
    "ZeroshotCLIP": make_zsclip, "ZeroshotCLIPEnsemble": make_zsclip, "KgCoOp": make_kgcoop,
    "CLIP_Adapter": make_clip_adapter, "MaPLe": make_maple, "PromptSRC": make_promptsrc,
}  # fmt: skip
#: the trainers this tool times (a text encoder run per step: the exact fast paths' subject)
TIMED = ("BiMoRS", "CoCoOp", "CoOp", "APPLeNet")


# ----------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------
def _release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``) so that RSS tracks live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS deltas are then lower bounds
        pass


class PeakMemory:
    """Peak memory increase during a block: CUDA max allocated, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        gc.collect()
        _release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base, self._max, self._stop = self._rss(), self._rss(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self._base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of CPU flash attention (torch's counter registers only the CUDA kernels): QK^T and PV."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    """FLOPs of CPU flash attention's backward, counted as torch counts the CUDA kernels' backward."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


#: Operators torch's FLOP counter misses on a CPU, with the formulas it uses for their CUDA counterparts.
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (torch's counter plus :data:`EXTRA_FLOP_FORMULAS`)."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def timed(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    count: Callable[[], object] | None | bool = None,
    between: Callable[[], object] | None = None,
) -> tuple[list[float], int, int]:
    """Run ``fn`` ``warmup`` times (the first under the FLOP counter) then ``repeats`` timed times.

    ``count`` (default ``fn``) is what the FLOP counter runs: torch's counter cannot track modules under
    ``no_grad``, so evaluation FLOPs are counted on the same forward with autograd enabled (same operations);
    ``False`` counts nothing (and the first run is then an ordinary warm-up run). ``between`` runs untimed
    before the first and after every timed run (the matmul probe).
    Returns the timings (s), the FLOPs of one call and the peak memory increase of one call (bytes).
    """
    flops = 0
    if count is not False:
        flops = count_flops(count or fn)
        warmup -= 1
    for _ in range(max(0, warmup)):
        fn()
    times, mem = [], PeakMemory(device)
    for i in range(repeats):
        if between is not None:
            between()
        with mem if i == 0 else contextlib.nullcontext():  # memory: first timed run
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    if between is not None:
        between()
    return times, flops, mem.peak


class MatmulProbe:
    """The machine's matrix-multiply throughput (FLOP/s) for ``dtype``, sampled on demand.

    At construction every size in ``sizes`` is timed ``repeats`` times and the size with the highest median
    throughput is kept. :meth:`sample` then times a burst of products of that size lasting about
    ``sample_s`` seconds, so that a sample averages the machine's speed over a time scale like a step's.
    The benchmark samples between the timed training steps, so the step and the throughput it is compared
    with see the same machine state.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 3072),
                 repeats: int = 6, sample_s: float = 0.5) -> None:
        self.device, self.samples = device, []
        scan = {}  # size -> single-product rates
        for size in sizes:
            self._operands(size, dtype)
            scan[size] = [self._time(1) for _ in range(repeats)]
        self.scan_best = max(max(rates) for rates in scan.values())
        self.size = max(scan, key=lambda size: statistics.median(scan[size]))
        self._operands(self.size, dtype)
        self.burst = max(1, round(sample_s * statistics.median(scan[self.size]) / self._flops))

    @property
    def _flops(self) -> int:
        return 2 * self.a.shape[0] ** 3

    def _operands(self, size: int, dtype: torch.dtype) -> None:
        self.a = torch.randn(size, size, device=self.device, dtype=dtype)
        self.b = torch.randn(size, size, device=self.device, dtype=dtype)
        for _ in range(2):
            self.a @ self.b

    def _time(self, products: int) -> float:
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(products):
            self.a @ self.b
        _sync(self.device)
        return products * self._flops / (time.perf_counter() - start)

    def sample(self) -> float:
        """Time one burst of square products; returns and records its FLOP/s."""
        rate = self._time(self.burst)
        self.samples.append(rate)
        return rate


@dataclass
class Result:
    """Measurements of one formulation of one trainer."""

    trainer: str
    formulation: str
    train_step_s: float
    eval_batch_s: float
    text_s: float
    train_images_per_s: float
    eval_images_per_s: float
    train_flops: int
    eval_flops: int
    train_flops_per_s: float
    train_peak_bytes: int
    eval_peak_bytes: int
    seq_len: int
    matmul_flops_per_s: float  # median of the matmul samples taken between the timed training steps
    peak_fraction: float  # median step FLOP/s / median matmul FLOP/s
    peak_fraction_best: float  # fastest step FLOP/s / fastest matmul FLOP/s
    train_times: list[float] = field(default_factory=list)
    matmul_samples: list[float] = field(default_factory=list)
    # the evaluation batch from the image encoder's outputs (the feature cache); NaN where there is none
    eval_cached_s: float = float("nan")


def run_case(
    name: str,
    case: Case,
    batch: int,
    device: torch.device,
    prec: str,
    warmup: int,
    repeats: int,
    ref_repeats: int,
    probe: MatmulProbe,
) -> tuple[list[Result], float]:
    """Benchmark both formulations of one trainer; returns results and the max |logit difference|.

    ``probe`` samples the matmul throughput before and after every timed training step.
    """
    model = case.model.to(device)
    case.clip_model.to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, generator=gen).to(device)
    n_cls = model.prompt_learner.prompts.token_suffix.shape[0]
    labels = torch.randint(0, n_cls, (batch,), generator=gen).to(device)
    extras = {k: v.to(device) for k, v in case.extras(batch).items()}
    params = [p for p in model.prompt_learner.parameters() if p.requires_grad]
    autocast = precision_autocast(device.type, prec)
    with torch.no_grad():
        diff = (model(images, **extras).float() - case.reference(images, **extras).float()).abs().max().item()
    seq_len = int(model.prompt_learner.prompts.seq_len)
    with torch.no_grad(), autocast:  # the text-encoder timing starts from ready prompts
        text_inputs = case.prompts(images, **extras)
    results = []
    for formulation, forward in (("ours", model.forward), ("reference", case.reference)):
        optimizer = torch.optim.SGD(params, lr=1e-6)
        scaler = torch.amp.GradScaler(device.type) if prec == "amp" else None  # as the trainers step under amp

        def train_step(forward=forward, optimizer=optimizer, scaler=scaler):
            with autocast:
                loss = F.cross_entropy(forward(images, **extras).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

        def eval_batch(forward=forward):
            with torch.no_grad(), autocast:
                forward(images, **extras)

        def eval_forward(forward=forward):
            with autocast:
                forward(images, **extras)

        def text_part(text_fn=_text_ours if formulation == "ours" else _text_reference):
            prompts = text_inputs.detach().requires_grad_(True)
            with autocast:
                text = text_fn(case, prompts)
            text.float().sum().backward()

        reps = repeats if formulation == "ours" else ref_repeats
        logger.info("%s / %s: training step", name, formulation)
        matmul: list[float] = []
        t_train, f_train, m_train = timed(train_step, device, warmup, reps,
                                          between=lambda matmul=matmul: matmul.append(probe.sample()))
        logger.info("%s / %s: evaluation batch", name, formulation)
        t_eval, f_eval, m_eval = timed(eval_batch, device, warmup, reps, count=eval_forward)
        logger.info("%s / %s: text encoder", name, formulation)
        t_text, _, _ = timed(text_part, device, warmup if formulation == "ours" else 0, reps, count=False)
        train_s, eval_s = statistics.median(t_train), statistics.median(t_eval)
        cached_s = float("nan")
        if formulation == "ours" and not getattr(model, "IMAGE_ENCODER_PROMPTED", True):
            logger.info("%s / %s: evaluation batch from the feature cache", name, formulation)
            with torch.no_grad(), autocast:
                visual = model.encode_visual(images)

            def cached_batch(visual=visual):
                with torch.no_grad(), autocast:
                    model.forward_visual(visual, **extras)

            cached_s = statistics.median(timed(cached_batch, device, warmup, reps, count=False)[0])
        results.append(
            Result(
                trainer=name,
                formulation=formulation,
                train_step_s=train_s,
                eval_batch_s=eval_s,
                text_s=statistics.median(t_text),
                train_images_per_s=batch / train_s,
                eval_images_per_s=batch / eval_s,
                train_flops=f_train,
                eval_flops=f_eval,
                train_flops_per_s=f_train / train_s,
                train_peak_bytes=m_train,
                eval_peak_bytes=m_eval,
                seq_len=seq_len if formulation == "ours" else 77,
                matmul_flops_per_s=statistics.median(matmul),
                peak_fraction=f_train / train_s / statistics.median(matmul),
                peak_fraction_best=f_train / min(t_train) / max(matmul),
                train_times=t_train,
                matmul_samples=matmul,
                eval_cached_s=cached_s,
            )
        )
    return results, diff


def _text_ours(case: Case, prompts: torch.Tensor) -> torch.Tensor:
    """Our text path for truncated prompts: shared prefix (B, P, D) or class prompts (C, L, D)."""
    pieces = case.model.prompt_learner.prompts
    encoder = case.model.text_encoder
    if prompts.shape[-2] == pieces.seq_len:  # full class prompts (CoOp)
        return encoder(prompts, pieces.eot)
    return encoder.forward_shared_prefix(prompts, pieces.token_suffix.to(prompts.dtype), pieces.eot)


def _text_reference(case: Case, prompts: torch.Tensor) -> torch.Tensor:
    """The straightforward text path (:mod:`models.reference`): per image, 77 tokens, stock transformer."""
    pieces = case.model.prompt_learner.prompts
    emb, tokens = reference.placeholder_prompts(case.clip_model, pieces.classnames, pieces.n_ctx)
    emb, eot = emb.to(prompts.dtype), tokens.argmax(-1)
    if prompts.shape[-2] == pieces.seq_len:  # full class prompts (CoOp)
        return reference.stock_text(case.clip_model, torch.cat([prompts, emb[:, prompts.shape[-2] :]], dim=1), eot)
    return reference.per_image_text(case.clip_model, prompts, emb, eot)


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def render(results: list[Result], diffs: dict[str, float], probe: MatmulProbe, header: dict) -> str:
    """Markdown table of both formulations per trainer and their ratios."""
    mb = 1024**2
    lines = [
        f"Machine: {header['machine']}; device {header['device']}, {header['prec']}, backbone {header['backbone']}, "
        f"{header['classes']} classes, batch {header['batch']}; matmul throughput ({probe.burst} x "
        f"{probe.size}x{probe.size} product per sample, {len(probe.samples)} samples between the timed training steps): "
        f"median {statistics.median(probe.samples) / 1e9:.1f}, best {max(probe.samples) / 1e9:.1f} GFLOP/s",
        "",
        "| trainer | formulation | seq len | train step (s) | eval batch (s) | eval batch, cached (s) | "
        "text fwd+bwd (s) | train img/s | eval img/s | GFLOP/step | GFLOP/s | matmul GFLOP/s | "
        "% of matmul (median / best) | peak mem train (MB) | peak mem eval (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.trainer} | {r.formulation} | {r.seq_len} | {r.train_step_s:.3f} | {r.eval_batch_s:.3f} | "
            f"{'-' if math.isnan(r.eval_cached_s) else f'{r.eval_cached_s:.3f}'} | {r.text_s:.3f} | {r.train_images_per_s:.2f} | {r.eval_images_per_s:.2f} | {r.train_flops / 1e9:.1f} | "
            f"{r.train_flops_per_s / 1e9:.1f} | {r.matmul_flops_per_s / 1e9:.1f} | "
            f"{100 * r.peak_fraction:.0f}% / {100 * r.peak_fraction_best:.0f}% | "
            f"{r.train_peak_bytes / mb:.0f} | {r.eval_peak_bytes / mb:.0f} |"
        )
    lines += ["", "| trainer | train speed-up | eval speed-up | eval speed-up, cached | text speed-up | FLOP ratio | "
              "memory ratio | max logit diff |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by_key = {(r.trainer, r.formulation): r for r in results}
    for trainer in dict.fromkeys(r.trainer for r in results):
        ours, ref = by_key[(trainer, "ours")], by_key[(trainer, "reference")]
        mem = ref.train_peak_bytes / ours.train_peak_bytes if ours.train_peak_bytes > 0 else float("inf")
        lines.append(
            f"| {trainer} | {ref.train_step_s / ours.train_step_s:.2f}x | {ref.eval_batch_s / ours.eval_batch_s:.2f}x | "
            f"{ref.eval_batch_s / ours.eval_cached_s:.2f}x | {ref.text_s / ours.text_s:.2f}x | {ref.train_flops / max(ours.train_flops, 1):.2f}x | {mem:.2f}x | "
            f"{diffs[trainer]:.2e} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainers", nargs="+", default=list(TIMED), choices=list(TIMED))
    p.add_argument("--backbone", default="ViT-B/16", help=f"one of {', '.join(BACKBONES)} (random weights)")
    p.add_argument("--dataset-classes", default="patternnet", help="catalogue dataset for class names, or a number")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prec", default="fp32", choices=["fp32", "amp", "bf16"])
    p.add_argument("--warmup", type=int, default=1, help="untimed runs (the first also counts FLOPs)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs of our formulation; the median is reported")
    p.add_argument("--ref-repeats", type=int, default=1,
                   help="timed runs of the reference (each takes tens of seconds on a CPU)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available; use --device cpu")
    classnames = bench_classnames(args.dataset_classes)
    peak_dtype = AUTOCAST_DTYPES.get(args.prec, torch.float32)
    probe = MatmulProbe(device, peak_dtype)
    logger.info("Matrix multiply (%s): best size %d, %.1f GFLOP/s", peak_dtype, probe.size, probe.scan_best / 1e9)
    results, diffs = [], {}
    for name in args.trainers:
        clip_model = build_random_clip(args.backbone)
        case = CASES[name](clip_model, classnames)
        res, diffs[name] = run_case(
            name, case, args.batch, device, args.prec, args.warmup, args.repeats, args.ref_repeats, probe
        )
        results += res
        del case, clip_model
        gc.collect()
    header = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "device": str(device), "prec": args.prec, "backbone": args.backbone, "classes": len(classnames),
        "batch": args.batch,
    }
    sys.stdout.write(render(results, diffs, probe, header) + "\n")
    if args.json:
        write_json_atomic(args.json, {**header, "matmul_size": probe.size, "matmul_burst": probe.burst,
                                      "matmul_samples": probe.samples, "max_logit_diff": diffs,
                                      "results": [asdict(r) for r in results]}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
