"""KgCoOp and PromptSRC through train.py and Dassl on ToyRS: config keys, the aggregated prompts of a real run,
exact resume of the aggregation (1 shot: 2 steps an epoch). The registry-wide trainer tests (tests/test_trainers.py) cover the rest."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAVE_DASSL, REPO_ROOT, assert_close_fp32, kill_in_epoch, requires_dassl

pytestmark = [requires_dassl]
if HAVE_DASSL:
    from dassl.engine import build_trainer

    import datasets.remote_sensing  # noqa: F401  (registers the datasets)
    import train
    import trainers.base as trainer_base
    import trainers.promptsrc as trainer_promptsrc

TOYRS_CFG = str(REPO_ROOT / "configs/datasets/toyrs.yaml")
PROMPTSRC_CFG = str(REPO_ROOT / "configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml")
KGCOOP_CFG = str(REPO_ROOT / "configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml")
FAST = ["MODEL.BACKBONE.NAME", "toy", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "144",
        "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "DATASET.NUM_SHOTS", "1", "OPTIM.MAX_EPOCH", "3"]
# GPA over 3 epochs centred on epoch 2: every epoch gets a weight that matters
GPA = ["TRAINER.PROMPTSRC.PREC", "fp32", "TRAINER.PROMPTSRC.GPA_MEAN", "2", "TRAINER.PROMPTSRC.GPA_STD", "1"]


def _argv(root, out, trainer: str, config: str, *opts: str) -> list[str]:
    return ["--root", str(root), "--seed", "1", "--trainer", trainer, "--dataset-config-file", TOYRS_CFG,
            "--config-file", config, "--output-dir", str(out), *FAST, *opts]  # fmt: skip


def _final_prompts(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "prompt_learner" / "model.pth.tar-3", weights_only=True)["state_dict"]


def test_kgcoop_reads_its_weight_from_coops_node(toyrs_root, tmp_path):
    cfg = train.setup_cfg(train.build_parser().parse_args(
        _argv(toyrs_root, tmp_path, "KgCoOp", KGCOOP_CFG, "TRAINER.COOP.PREC", "fp32", "TRAINER.COOP.W", "2.5")))  # fmt: skip
    trainer = build_trainer(cfg)
    assert trainer.model.weight == 2.5 and trainer.model.prompt_learner.ctx.shape[0] == 4  # N_CTX 4 of the config
    assert cfg.TRAINER.COOP.CTX_INIT == "a photo of a"


def test_promptsrc_keeps_the_gaussian_weighted_mean_of_its_epoch_prompts_and_resumes_it(toyrs_root, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    """The last checkpoint (the model tested) holds sum_e w_e theta_e with w_e from the Gaussian density; a run
    killed in its second epoch and re-run gets the aggregation state back from its checkpoint: same prompts."""
    seen: list[dict[str, torch.Tensor]] = []
    original_end = trainer_promptsrc.PromptSRC.on_epoch_end

    def record(self):
        seen.append({k: v.detach().clone() for k, v in self.model.prompt_learner.state_dict().items()})
        original_end(self)

    monkeypatch.setattr(trainer_promptsrc.PromptSRC, "on_epoch_end", record)
    full = tmp_path / "full"
    assert train.main(_argv(toyrs_root, full, "PromptSRC", PROMPTSRC_CFG, *GPA)) == 0
    assert len(seen) == 3
    density = [math.exp(-0.5 * (e - 2) ** 2) for e in (1, 2, 3)]
    final = _final_prompts(full)
    assert set(final) == set(seen[0])
    for key, value in final.items():
        expected = sum(d * s[key].double() for d, s in zip(density, seen)) / sum(density)
        assert not torch.allclose(seen[-1][key], value)  # the last epoch's own prompts are not what is kept
        assert_close_fp32(value.double(), expected, what=key)
    monkeypatch.undo()

    kill_in_epoch(monkeypatch, 1)  # in the second epoch
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train.main(_argv(toyrs_root, part, "PromptSRC", PROMPTSRC_CFG, *GPA))
    resume = torch.load(part / "prompt_learner" / trainer_base.RESUME_FILE, weights_only=True)
    assert resume["trainer_state"]["gpa"]["epochs"] == [0]
    monkeypatch.undo()
    assert train.main(_argv(toyrs_root, part, "PromptSRC", PROMPTSRC_CFG, *GPA)) == 0
    again = _final_prompts(part)
    for key, value in final.items():
        assert torch.allclose(value, again[key], atol=1e-6), key  # as the BiMoRS resume test: same ops, same order
