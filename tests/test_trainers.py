"""Every registered prompt trainer through Dassl on ToyRS with the toy backbone (parametrised over the registry).

A new trainer is covered by registering it; one that reads caption vectors sets ``NEEDS_CAPTIONS = True``
and gets a caption store of random vectors (named after the toy captioner and encoder) here.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import HAVE_DASSL, REPO_ROOT, requires_dassl

pytestmark = [requires_dassl]
if HAVE_DASSL:
    from dassl.engine import TRAINER_REGISTRY, build_trainer

    import datasets.remote_sensing  # noqa: F401  (registers the datasets)
    import train
    import trainers  # noqa: F401  (registers the trainers)
    from trainers.base import PromptTrainer

TOYRS_CFG = str(REPO_ROOT / "configs/datasets/toyrs.yaml")
FAST = ["MODEL.BACKBONE.NAME", "toy", "DATASET.NUM_SHOTS", "2", "DATALOADER.NUM_WORKERS", "0",
        "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "DATALOADER.TEST.BATCH_SIZE", "48", "OPTIM.MAX_EPOCH", "1"]


def _registered(learns: bool | None = None) -> list:
    """Our registered trainers; ``learns`` True/False keeps those with/without a config node (learnable part)."""
    if not HAVE_DASSL:
        return []
    params = []
    for name in sorted(TRAINER_REGISTRY.registered_names()):
        cls = TRAINER_REGISTRY.get(name)
        if not issubclass(cls, PromptTrainer):
            continue  # Dassl's own trainers
        if learns is None or bool(cls.CONFIG_NODE) == learns:
            params.append(pytest.param(name, id=name))
    return params


TRAINERS = _registered()
LEARNING = _registered(learns=True)  # trainers with a prompt learner
ZERO_SHOT = _registered(learns=False)


def config_file(trainer: str) -> str | None:
    """The trainer's ViT-B/16 config (first by name), so the shipped yaml files are exercised; None if it has none."""
    files = sorted((REPO_ROOT / "configs" / "trainers" / trainer).glob("*.yaml"))
    vit = [f for f in files if f.name.startswith("vit_b16")]
    return str((vit or files)[0]) if files else None


def argv(root, out, trainer: str, *opts: str, eval_only: bool = False, model_dir=None, epoch=None) -> list[str]:
    """train.py arguments for a fast toy run (fp32; the shipped configs say fp16)."""
    args = ["--root", str(root), "--seed", "1", "--trainer", trainer, "--dataset-config-file", TOYRS_CFG,
            "--output-dir", str(out)]  # fmt: skip
    cfg = config_file(trainer)
    if cfg:
        args += ["--config-file", cfg]
    if eval_only:
        args.append("--eval-only")
        args += ["--model-dir", str(model_dir)] if model_dir else []
        args += ["--load-epoch", str(epoch)] if epoch else []
    cls = TRAINER_REGISTRY.get(trainer)
    node = cls.CONFIG_NODE
    prec = [f"TRAINER.{node}.PREC", "fp32"] if node else []
    if getattr(cls, "NEEDS_CAPTIONS", False):
        prec += [f"TRAINER.{node}.CAPTIONER", "toy-blip2", f"TRAINER.{node}.CAPTION_ENCODER", "toy-bert"]
    return args + FAST + prec + list(opts)


def build(root, out, trainer: str, *opts: str):
    """A trainer built as train.main builds it (same config path)."""
    cfg = train.setup_cfg(train.build_parser().parse_args(argv(root, out, trainer, *opts)))
    torch.manual_seed(0)
    return build_trainer(cfg)


def first_batch(trainer, loader="test"):
    batch = next(iter(trainer.test_loader if loader == "test" else trainer.train_loader_x))
    return trainer.parse_batch(batch)


def learnable(trainer) -> dict[str, torch.Tensor]:
    return {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------ registry-wide
@pytest.mark.parametrize("name", ZERO_SHOT)
def test_zero_shot_trainers_learn_nothing(name, toy_root, tmp_path):
    trainer = build(toy_root, tmp_path, name)
    assert getattr(trainer.model, "prompt_learner", None) is None and trainer.optim is None
    assert not learnable(trainer), f"{name} has no prompt_learner but learnable parameters {sorted(learnable(trainer))}"


@pytest.mark.parametrize("name", LEARNING)
def test_one_training_step_changes_only_learnable_parameters(name, toy_root, tmp_path):
    trainer = build(toy_root, tmp_path, name, "OPTIM.WARMUP_EPOCH", "0")
    learn = learnable(trainer)
    assert getattr(trainer.model, "prompt_learner", None) is not None
    assert learn and all(n.startswith("prompt_learner.") for n in learn)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.set_model_mode("train")
    trainer.batch_idx, trainer.num_batches = 0, 2
    batch = next(iter(trainer.train_loader_x))
    summary = trainer.forward_backward(batch)
    assert torch.isfinite(torch.tensor(summary["loss"]))
    for n, p in trainer.model.named_parameters():
        if n in learn:
            assert not torch.equal(p.detach(), before[n]), f"learnable {n} did not change"
        else:
            assert torch.equal(p.detach(), before[n]), f"frozen {n} changed"


@pytest.mark.parametrize("name", TRAINERS)
def test_eval_forward_shapes(name, toy_root, tmp_path):
    trainer = build(toy_root, tmp_path, name, "DATASET.SUBSAMPLE_CLASSES", "base")
    images, labels, extras = first_batch(trainer)
    logits = trainer.model_inference(images, **extras)
    assert logits.shape == (images.shape[0], 4) and logits.dtype == torch.float32  # ToyRS base half: 4 classes
    assert torch.isfinite(logits).all()
    # whether cached image features could stand in for the image encoder: every model says so
    assert isinstance(type(trainer.model).IMAGE_ENCODER_PROMPTED, bool)


@pytest.mark.parametrize("name", LEARNING)
def test_save_then_reload_gives_identical_logits(name, toy_root, tmp_path):
    trainer = build(toy_root, tmp_path / "train", name)
    with torch.no_grad():  # stands in for training
        for p in learnable(trainer).values():
            p.add_(0.1 * torch.randn_like(p))
    trainer.save_model(0, str(tmp_path / "train"))
    images, _, extras = first_batch(trainer)
    expected = trainer.model_inference(images, **extras)

    fresh = build(toy_root, tmp_path / "eval", name)
    images_b, _, extras_b = first_batch(fresh)
    assert torch.equal(images_b, images)
    assert not torch.equal(fresh.model_inference(images_b, **extras_b), expected)
    fresh.load_model(str(tmp_path / "train"), epoch=1)
    assert torch.equal(fresh.model_inference(images_b, **extras_b), expected)


@pytest.mark.parametrize("name", TRAINERS)
def test_train_one_epoch_then_eval_only_reproduces_results(name, toy_root, tmp_path):
    out = tmp_path / "run"
    assert train.main(argv(toy_root, out, name, "DATASET.SUBSAMPLE_CLASSES", "base")) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["trainer"] == name and result["subsample"] == "base" and len(result["per_class"]) == 4
    assert "* accuracy:" in (out / "log.txt").read_text()
    if not TRAINER_REGISTRY.get(name).CONFIG_NODE:
        return  # zero-shot: nothing learned, nothing to reload
    ckpt = torch.load(out / "prompt_learner" / "model.pth.tar-1", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["state_dict"]
    evaluated = tmp_path / "eval"
    assert train.main(argv(toy_root, evaluated, name, "DATASET.SUBSAMPLE_CLASSES", "base", eval_only=True,
                           model_dir=out, epoch=1)) == 0  # fmt: skip
    again = json.loads((evaluated / "results.json").read_text())
    assert again["epoch"] == 1 and again["accuracy"] == result["accuracy"] and again["per_class"] == result["per_class"]


# ------------------------------------------------------------------------------------------ upstream checkpoints
def _upstream_key(name: str, key: str) -> str:
    """Where the upstream project saves our ``prompt_learner`` key ``key``."""
    if name == "MaPLe":  # upstream registers the whole model: prompt_learner.* plus the frozen CLIP weights
        return f"prompt_learner.{key}"
    if name == "PromptSRC":  # the whole model, with the vision and deep prompts inside the encoders' blocks
        tower, _, index = key.partition("_deep.")
        if index:
            encoder = "text_encoder" if tower == "text" else "image_encoder"
            return f"{encoder}.transformer.resblocks.{int(index) + 1}.VPT_shallow"
        return "image_encoder.VPT" if key == "VPT" else f"prompt_learner.{key}"
    return key


def _upstream_state(name: str, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict laid out as the upstream project saves it (class-dependent buffers included)."""
    junk = {"token_prefix": torch.zeros(100, 1, 64), "token_suffix": torch.zeros(100, 60, 64)}
    state = {_upstream_key(name, k): v for k, v in ({k: torch.randn_like(v) for k, v in ours.items()} | junk).items()}
    if name in ("MaPLe", "PromptSRC"):  # frozen CLIP weights of the whole model
        state |= {"image_encoder.conv1.weight": torch.zeros(1), "logit_scale": torch.zeros(())}
    if name == "KgCoOp":  # upstream's prompt learner also holds parameters it never trains
        state |= {"bias_vectors": torch.zeros(1, 512), "meta_net.linear1.weight": torch.zeros(512, 512)}
    return state


@pytest.mark.parametrize("name", ["CoOp", "CoCoOp", "MaPLe", "KgCoOp", "PromptSRC", "APPLeNet", "CLIP_Adapter"])
def test_upstream_checkpoint_layout_loads(name, toy_root, tmp_path):
    trainer = build(toy_root, tmp_path / "out", name)
    ours = trainer.model.prompt_learner.state_dict()
    upstream = _upstream_state(name, ours)
    folder = tmp_path / "released" / "prompt_learner"
    folder.mkdir(parents=True)
    torch.save({"state_dict": upstream, "epoch": 5}, folder / "model.pth.tar-5")
    trainer.load_model(str(tmp_path / "released"), epoch=5)
    loaded = trainer.model.prompt_learner.state_dict()
    for key in ours:
        assert torch.equal(loaded[key], upstream[_upstream_key(name, key)]), key


# ------------------------------------------------------------------------------------------ method-specific losses
def test_applenet_loss_reads_the_config(toy_root, tmp_path):
    """APPLeNet trains on cross-entropy + LOSS.CRP_WEIGHT x penalty(LOSS.T) of the model's own outputs."""
    from models.applenet import context_redundancy_penalty

    trainer = build(toy_root, tmp_path, "APPLeNet", "LOSS.CRP_WEIGHT", "0.5", "LOSS.T", "1.5")
    images, labels, extras = first_batch(trainer, "train")
    loss, logits, terms = trainer.compute_loss(images, labels, extras)
    expected_logits, ctx = trainer.model.forward_with_context(trainer.model.encode_visual(images))
    penalty, defined = context_redundancy_penalty(ctx, 1.5)
    assert defined and torch.equal(logits, expected_logits) and set(terms) == {"loss_ce", "loss_crp", "crp_defined"}
    expected = torch.nn.functional.cross_entropy(logits, labels) + 0.5 * penalty
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["loss_crp"].item() == pytest.approx(penalty.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------ bad input
def error_line(capsys) -> str:
    """The ``error:`` line train.main wrote to stderr (the first, and the only one)."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error: ") == 1, err
    return err.splitlines()[0]


def test_unknown_trainer_lists_the_names(toy_root, tmp_path, capsys):
    args = argv(toy_root, tmp_path, "CoOp")
    args[args.index("CoOp")] = "CoOpp"
    assert train.main(args) == 2
    err = error_line(capsys)
    assert "CoOpp" in err and all(n in err for n in ("CoOp", "CoCoOp", "MaPLe"))


def test_unknown_config_key_names_the_file(toy_root, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("TRAINER:\n  COOP:\n    N_CTXX: 4\n")
    args = argv(toy_root, tmp_path / "out", "CoOp")
    args[args.index("--config-file") + 1] = str(bad)
    assert train.main(args) == 2
    err = error_line(capsys)
    assert str(bad) in err and "N_CTXX" in err


def test_eval_only_without_checkpoint_names_folder_and_file(toy_root, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = argv(toy_root, tmp_path / "out", "CoCoOp", eval_only=True, model_dir=tmp_path / "empty", epoch=3)
    assert train.main(args) == 2
    err = error_line(capsys)
    assert str(tmp_path / "empty" / "prompt_learner") in err and "model.pth.tar-3" in err


def test_class_count_mismatch_is_a_clear_error(toy_root, tmp_path, capsys):
    """Class-specific CoOp context trained on the 8 ToyRS classes cannot be evaluated on the 4 base classes."""
    trainer = build(toy_root, tmp_path / "train", "CoOp", "TRAINER.COOP.CSC", "True")
    assert trainer.model.prompt_learner.ctx.shape[0] == 8
    trainer.save_model(0, str(tmp_path / "train"))
    assert train.main(argv(toy_root, tmp_path / "eval", "CoOp", "TRAINER.COOP.CSC", "True",
                           "DATASET.SUBSAMPLE_CLASSES", "base", eval_only=True, model_dir=tmp_path / "train", epoch=1)) == 2
    assert re.search(r"'ctx' has shape \(8, 16, 64\).*\(4, 16, 64\).*class count", error_line(capsys))
