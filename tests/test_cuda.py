"""The CUDA path: every trainer in every precision, the fast text path, checkpoints across devices, loaders.

Each test body runs on every device it can. The CPU variants (the trainers in fp32 and bf16, the text path in
every precision, on the toy backbone) run everywhere and keep the bodies honest; the variants marked ``cuda``
need a CUDA device and are skipped with the reason without one (``make gpu-check`` runs them on a GPU
machine, ``pytest -m cuda`` selects them). ViT-B/16-sized random weights (``models.weights.random_clip``)
run on CUDA only, which keeps the CPU suite fast.
"""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from clip.model import CLIP, convert_weights
from conftest import HAVE_DASSL, assert_close_fp32, requires_dassl
from test_backbone import assert_same_values_and_grads

from common.precision import GPU_ONLY, PRECISIONS, autocast
from models import reference
from models.encoders import TextEncoder
from models.prompts import ClassPrompts
from models.weights import random_clip as build_random_clip
from tools.bench import bench_classnames

if HAVE_DASSL:
    from dassl.engine import TRAINER_REGISTRY
    from test_trainers import TRAINERS, build, first_batch, learnable

TRAINER_NAMES: list[str] = [p.values[0] for p in TRAINERS] if HAVE_DASSL else []

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False); these run on a GPU machine: make gpu-check"
CUDA_MARKS = (pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason=NO_CUDA))
VIT_B16 = "ViT-B/16"

#: Unit roundoff (half the gap between 1 and the next number) of the format each low precision computes in.
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "amp": 2.0**-11, "fp16": 2.0**-11}


def case(device: str, *values, id: str):
    """A test case on ``device``; CUDA cases carry the ``cuda`` marker and skip without a CUDA device."""
    return pytest.param(device, *values, marks=CUDA_MARKS if device == "cuda" else (), id=f"{device}-{id}")


def slug(backbone: str) -> str:
    return backbone.replace("/", "").replace("-", "").lower()  # ViT-B/16 -> vitb16


def on(device: str) -> list[str]:
    """Config options putting a trainer on ``device`` (Dassl takes CUDA whenever it is there and USE_CUDA)."""
    return ["USE_CUDA", str(device == "cuda")]


@pytest.fixture(scope="session")
def vit_b16_weights(tmp_path_factory):
    """A ViT-B/16-sized CLIP with random weights as a state-dict file (trainers load it via MODEL.BACKBONE.PATH)."""
    path = tmp_path_factory.mktemp("clip") / "vit_b16_random.pt"
    torch.save(build_random_clip(VIT_B16).state_dict(), path)
    return path


def backbone_opts(backbone: str, request) -> list[str]:
    """Config options selecting ``backbone``: the toy one (the tests' default) or random ViT-B/16 weights."""
    if backbone == "toy":
        return []
    return ["MODEL.BACKBONE.NAME", VIT_B16, "MODEL.BACKBONE.PATH", str(request.getfixturevalue("vit_b16_weights"))]


def learns(name: str) -> bool:
    """Whether the trainer has a learnable part (and a config node with PREC); zero-shot trainers have neither."""
    return bool(TRAINER_REGISTRY.get(name).CONFIG_NODE)


def prec_opts(name: str, prec: str) -> list[str]:
    return [f"TRAINER.{TRAINER_REGISTRY.get(name).CONFIG_NODE}.PREC", prec] if learns(name) else []


def accepted_step(trainer, batch: dict, tries: int = 24) -> dict:
    """``trainer.forward_backward(batch)``, repeated under amp until the GradScaler takes the step.

    The GradScaler starts at a scale of 2**16 and skips every step whose scaled fp16 gradients overflow,
    halving the scale (on the toy backbone, on a CPU, the first one or two steps are skipped); 24 tries reach a
    scale of 2**-8, far below any that overflows.
    """
    for _ in range(tries):
        scale = trainer.scaler.get_scale() if trainer.scaler is not None else None
        summary = trainer.forward_backward(batch)
        if scale is None or trainer.scaler.get_scale() >= scale:
            return summary
    pytest.fail(f"the GradScaler skipped {tries} steps in a row: the gradients overflow at every scale")


def frozen_state(trainer) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of the model that is not learnable."""
    learn = learnable(trainer)
    tensors = itertools.chain(trainer.model.named_parameters(), trainer.model.named_buffers())
    return {n: t.detach().clone() for n, t in tensors if n not in learn}


# ------------------------------------------------------------------------------------------ every trainer
def _trainer_cases() -> list:
    cases = []
    for name in TRAINER_NAMES:
        for device, backbone in (("cpu", "toy"), ("cuda", "toy"), ("cuda", VIT_B16)):
            for prec in PRECISIONS if learns(name) else ("fp32",):  # zero-shot trainers have no PREC: always fp32
                if device == "cpu" and prec in GPU_ONLY:
                    continue  # the trainers run them as fp32 on a CPU: test_gpu_precisions_fall_back_on_cpu
                cases.append(case(device, backbone, name, prec, id=f"{slug(backbone)}-{name}-{prec}"))
    return cases


@requires_dassl
@pytest.mark.parametrize(("device", "backbone", "name", "prec"), _trainer_cases())
def test_training_step_and_eval_batch(device, backbone, name, prec, toy_root, tmp_path, request):
    """Finite loss, non-zero finite gradients on exactly the learnable parameters, frozen weights unchanged,
    finite fp32 logits of an evaluation batch, all on ``device`` in ``prec``."""
    trainer = build(toy_root, tmp_path, name, *on(device), *backbone_opts(backbone, request), *prec_opts(name, prec))
    assert trainer.device.type == device and trainer.prec == prec
    assert (trainer.scaler is not None) == (prec == "amp")
    assert trainer.model.visual.dtype == (torch.float16 if prec == "fp16" else torch.float32)
    learn = learnable(trainer)
    before = frozen_state(trainer)
    if trainer.optim is not None:
        trainer.set_model_mode("train")
        trainer.batch_idx, trainer.num_batches = 0, 1000  # not the epoch's last batch: the LR stays put
        summary = accepted_step(trainer, next(iter(trainer.train_loader_x)))
        assert math.isfinite(summary["loss"])
        for n, p in trainer.model.named_parameters():
            if n in learn:
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"{n}: no or non-finite gradient"
                assert p.grad.abs().max() > 0, f"learnable {n} got an all-zero gradient"
            else:
                assert p.grad is None, f"frozen {n} got a gradient"
    else:
        assert not learn
    after = frozen_state(trainer)
    for n, value in before.items():
        assert torch.equal(after[n], value), f"frozen {n} changed"
    trainer.set_model_mode("eval")
    images, labels, extras = first_batch(trainer)
    assert images.device.type == device and labels.device.type == device
    logits = trainer.model_inference(images, **extras)
    assert logits.shape == (images.shape[0], trainer.num_classes) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@requires_dassl
@pytest.mark.parametrize("prec", GPU_ONLY)
def test_gpu_precisions_fall_back_on_cpu(prec, toy_root, tmp_path):
    """fp16 and amp need a GPU: on a CPU the trainers run in fp32 (weights, no GradScaler); train.py's header says
    so once (tests/test_faults.py) and results.json records the precision used."""
    trainer = build(toy_root, tmp_path, "CoOp", *on("cpu"), *prec_opts("CoOp", prec))
    assert trainer.prec == "fp32" and trainer.scaler is None
    assert trainer.model.visual.dtype == torch.float32 and trainer.model.prompt_learner.ctx.dtype == torch.float32


# ------------------------------------------------------------------------------------------ text path
def low_precision_tolerance(prec: str, layers: int) -> float:
    """Bound on max|fast - straightforward| / max|straightforward| when both run in the format of ``prec``.

    Each formulation rounds the outputs of about six operations per layer (queries/keys/values, attention,
    out-projection, MLP in, activation, MLP out) and of the final layer norm and projection, R = 6 L + 2
    roundings of relative size u (the unit roundoff). Independent rounding errors add up like a random walk,
    about u sqrt(R) for each formulation, and the difference of two such results is about sqrt(2) u sqrt(R);
    we allow 2 u sqrt(R): bf16 0.029 (toy, L = 2) and 0.067 (ViT-B/16, L = 12), fp16 and amp eight times
    less. Measured on a CPU the differences are 2 to 3.5 u (the residual stream stays in fp32 under
    autocast), 3.5 to 5 times below the bound; a real error (a wrong mask, position or end-of-text row) is O(1).
    """
    return 2 * UNIT_ROUNDOFF[prec] * math.sqrt(6 * layers + 2)


@pytest.fixture(scope="module")
def random_clip():
    """A fresh copy of a random CLIP per call (built once per backbone; the fp16 cases convert their copy)."""
    built: dict[str, CLIP] = {}

    def get(backbone: str) -> CLIP:
        if backbone not in built:
            built[backbone] = build_random_clip(backbone)
        return copy.deepcopy(built[backbone])

    return get


TEXT_CASES = [case("cpu", "toy", p, id=f"toy-{p}") for p in PRECISIONS] + [
    case("cuda", b, p, id=f"{slug(b)}-{p}") for b in ("toy", VIT_B16) for p in PRECISIONS
]


@pytest.mark.parametrize(("device", "backbone", "prec"), TEXT_CASES)
def test_fast_text_path_equals_straightforward(device, backbone, prec, random_clip):
    """The truncated, batched text encoder against CLIP's stock transformer over all 77 tokens, both in ``prec``:
    per-image prefixes shared by the classes (CoCoOp, BiMoRS) and whole class prompts (CoOp)."""
    clip_model = random_clip(backbone)
    if prec == "fp16":
        convert_weights(clip_model)  # as PromptTrainer.build_model does
    clip_model.to(device)
    dtype = clip_model.dtype
    names = bench_classnames("patternnet")[:12]  # names of 1 to 4 tokens: the prompts end at different places
    pieces = ClassPrompts(clip_model, names, n_ctx=4).to(device)
    emb, tokens = reference.placeholder_prompts(clip_model, names, 4)  # the same prompts at all 77 positions
    width = pieces.token_suffix.shape[-1]
    ctx = 0.02 * torch.randn(3, 4, width, generator=torch.Generator().manual_seed(0))  # per image, as CoCoOp shifts it
    prefix = pieces.prefix(ctx.to(device, dtype)).requires_grad_(prec == "fp32")
    prefix_ref = prefix.detach().clone().requires_grad_(prec == "fp32")
    encoder = TextEncoder(clip_model)
    with torch.set_grad_enabled(prec == "fp32"), autocast(device, prec):
        shared = encoder.forward_shared_prefix(prefix, pieces.token_suffix.to(dtype), pieces.eot)
        shared_ref = reference.per_image_text(clip_model, prefix_ref, emb, tokens.argmax(-1))
        whole = encoder(pieces.full(prefix[0, 1:].detach()), pieces.eot)  # image 0's context in every class prompt
        whole_ref = reference.per_image_text(clip_model, prefix[:1].detach(), emb, tokens.argmax(-1))[0]
    assert shared.shape == (3, len(names), clip_model.text_projection.shape[1])
    if prec == "fp32":  # values and gradients within fp32 rounding (1e-5 of the largest element)
        assert_same_values_and_grads(shared, shared_ref, prefix, prefix_ref)
        assert_close_fp32(whole, whole_ref, what="class prompts")
        return
    tol = low_precision_tolerance(prec, len(clip_model.transformer.resblocks))
    for what, fast, ref in (("shared prefix", shared, shared_ref), ("class prompts", whole, whole_ref)):
        fast, ref = fast.float(), ref.float()
        error = float((fast - ref).abs().max() / ref.abs().max())
        assert error <= tol, f"{what}: max difference {error:.2e} of the largest element exceeds {tol:.2e} ({prec})"


# ------------------------------------------------------------------------------------------ checkpoints
@requires_dassl
@pytest.mark.parametrize(
    ("device", "name"), [case(d, n, id=n) for d in ("cpu", "cuda") for n in TRAINER_NAMES if learns(n)]
)
def test_checkpoint_saved_on_device_loads_on_cpu(device, name, toy_root, tmp_path):
    """After a step on ``device``: the checkpoint holds the optimizer state on that device; a CPU trainer loads
    it for evaluation (same weights) and resumes from it (same optimizer state)."""
    src = build(toy_root, tmp_path / "train", name, *on(device))
    src.set_model_mode("train")
    src.batch_idx, src.num_batches = 0, 1000
    accepted_step(src, next(iter(src.train_loader_x)))
    src.save_model(0, str(tmp_path / "train"))
    path = tmp_path / "train" / src.MODULE_NAME / "model.pth.tar-1"
    raw = torch.load(path, weights_only=True)  # no map_location: tensors come back where they were saved
    momentum = [s["momentum_buffer"] for s in raw["optimizer"]["state"].values()]
    assert momentum and all(m.device.type == device for m in momentum)
    weights = {k: v.detach().cpu() for k, v in src.model.prompt_learner.state_dict().items()}
    src_optim = src.optim.state_dict()["state"]

    evaluator = build(toy_root, tmp_path / "eval", name, *on("cpu"))
    evaluator.load_model(str(tmp_path / "train"), epoch=1)
    for key, value in evaluator.model.prompt_learner.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, weights[key]), key
    images, _, extras = first_batch(evaluator)
    assert torch.isfinite(evaluator.model_inference(images, **extras)).all()

    resumed = build(toy_root, tmp_path / "train", name, *on("cpu"))
    assert resumed.resume_model_if_exist(str(tmp_path / "train")) == 1
    state = resumed.optim.state_dict()["state"]
    assert state.keys() == src_optim.keys()
    for index, entry in state.items():
        buffer = entry["momentum_buffer"]
        assert buffer.device.type == "cpu" and torch.equal(buffer, src_optim[index]["momentum_buffer"].cpu())


# ------------------------------------------------------------------------------------------ data loading
@requires_dassl
@pytest.mark.parametrize("device", [case("cpu", id="BiMoRS"), case("cuda", id="BiMoRS")])
def test_loader_workers_pinned_memory_and_one_epoch(device, toy_root, tmp_path):
    """Dassl's loaders use worker processes and, on CUDA, pinned memory; batches (images, labels, the caption
    vectors BiMoRS gathers per batch) reach the device intact; one epoch with workers trains and tests."""
    trainer = build(toy_root, tmp_path, "BiMoRS", *on(device), "DATALOADER.NUM_WORKERS", "2")
    pinned = device == "cuda"
    for loader in (trainer.train_loader_x, trainer.val_loader, trainer.test_loader):
        assert loader.num_workers == 2 and loader.pin_memory == pinned
    batch = next(iter(trainer.train_loader_x))
    assert batch["img"].is_pinned() == pinned and batch["label"].is_pinned() == pinned
    images, labels, extras = trainer.parse_batch(batch)
    assert images.device.type == labels.device.type == extras["captions"].device.type == device
    assert torch.equal(images.cpu(), batch["img"]) and torch.equal(labels.cpu(), batch["label"])
    rows = trainer.caption_index.index(trainer.relpaths(batch["impath"]))
    assert torch.equal(extras["captions"].cpu(), trainer.caption_index.features[rows])
    trainer.train()
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["epoch"] == 1 and result["n_test"] == len(trainer.test_loader.dataset)
