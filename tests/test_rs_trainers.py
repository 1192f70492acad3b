"""Every trainer on the remote-sensing backbones through Dassl (ToyRS): the GELU toy row, an open_clip
checkpoint given as MODEL.BACKBONE.PATH, the input-size check, and the zero-shot template sets named in the config.
"""

from __future__ import annotations

import warnings

import pytest
import test_trainers
import torch
import torch.nn.functional as F
from conftest import assert_close_fp32, requires_dassl
from torch import nn

from models.encoders import tokenize
from models.prompts import TEMPLATE_SETS

pytestmark = [requires_dassl]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import open_clip

# The registry-wide trainer tests' trainer builder (fp32, toy captioner) and list; ``toy_root`` is conftest's.
build, first_batch, TRAINERS = test_trainers.build, test_trainers.first_batch, test_trainers.TRAINERS


@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_runs_on_the_gelu_toy_backbone(name, toy_root, tmp_path):
    trainer = build(toy_root, tmp_path / "out", name, "MODEL.BACKBONE.NAME", "toy-gelu")
    blocks = trainer.model.visual.visual.transformer.resblocks
    assert all(type(b.mlp.gelu) is nn.GELU for b in blocks)
    images, labels, extras = first_batch(trainer)
    logits = trainer.model_inference(images, **extras)
    assert logits.shape == (len(labels), trainer.dm.num_classes) and torch.isfinite(logits).all()


def tiny_open_clip_gelu(seed: int = 0) -> nn.Module:
    """A small random open_clip CLIP with GELU MLPs and 32-pixel inputs."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=32, vision_cfg=dict(image_size=32, patch_size=16, layers=2, width=128),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
    )  # fmt: skip
    return model.eval()


def test_zero_shot_trainer_on_an_open_clip_training_checkpoint_matches_open_clip(toy_root, tmp_path):
    """SkyCLIP's layout ({'state_dict': {'module.*': ...}}) via MODEL.BACKBONE.PATH: open_clip's logits."""
    theirs = tiny_open_clip_gelu()
    path = tmp_path / "epoch_20.pt"
    torch.save({"epoch": 20, "state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, path)
    trainer = build(toy_root, tmp_path / "out", "ZeroshotCLIP", "MODEL.BACKBONE.NAME", "SkyCLIP50-ViT-B-32",
                    "MODEL.BACKBONE.PATH", str(path), "INPUT.SIZE", "(32, 32)")  # fmt: skip
    template = trainer.dataset_template()
    names = trainer.dm.dataset.classnames
    images, _, _ = first_batch(trainer)
    with torch.no_grad():
        text = F.normalize(theirs.encode_text(tokenize([template.format(n.replace("_", " ")) for n in names])), dim=-1)
        image = F.normalize(theirs.encode_image(images), dim=-1)
        expected = theirs.logit_scale.exp() * image @ text.t()
    assert_close_fp32(trainer.model_inference(images), expected, what="ZeroshotCLIP logits vs open_clip")


def test_input_size_must_fit_the_backbone(toy_root, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_open_clip_gelu().state_dict(), path)
    with pytest.raises(ValueError, match=r"takes 32x32 images but INPUT.SIZE is \(224, 224\): add the option "
                                         r"INPUT.SIZE \"\(32, 32\)\""):  # fmt: skip
        build(toy_root, tmp_path / "out", "CoOp", "MODEL.BACKBONE.NAME", "RemoteCLIP-ViT-B-32",
              "MODEL.BACKBONE.PATH", str(path))  # fmt: skip


# ------------------------------------------------------------------------------------ zero-shot templates
@pytest.mark.parametrize(("trainer_name", "spec", "expected"), [
    ("ZeroshotCLIP", "", lambda d: [d]),
    ("ZeroshotCLIPEnsemble", "", lambda d: list(dict.fromkeys([d, *TEMPLATE_SETS["rs"]]))),
    ("ZeroshotCLIP", "rs106", lambda d: list(TEMPLATE_SETS["rs106"])),
    ("ZeroshotCLIPEnsemble", "a satellite photo of a {}.", lambda d: ["a satellite photo of a {}."]),
    ("ZeroshotCLIP", "dataset+rs106", lambda d: list(dict.fromkeys([d, *TEMPLATE_SETS["rs106"]]))),
])  # fmt: skip
def test_zero_shot_templates_are_named_in_the_config(trainer_name, spec, expected, toy_root, tmp_path):
    trainer = build(toy_root, tmp_path / "out", trainer_name, "MODEL.BACKBONE.NAME", "toy",
                    "TRAINER.ZSCLIP.TEMPLATES", spec)  # fmt: skip
    assert trainer.templates() == expected(trainer.dataset_template())


def test_unknown_template_set_is_a_one_line_error(toy_root, tmp_path):
    with pytest.raises(ValueError, match=r"^Unknown zero-shot template set 'rs107' in 'rs107': use dataset, rs, rs106"):
        build(toy_root, tmp_path / "out", "ZeroshotCLIP", "MODEL.BACKBONE.NAME", "toy", "TRAINER.ZSCLIP.TEMPLATES",
              "rs107")  # fmt: skip

