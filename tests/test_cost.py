"""The matrix cost report (tools/cost.py, ``python -m tools.sweep cost``) at toy sizes.

The FLOPs of a batch are affine in its size (checked against direct counts), the runs of a sweep get the
steps and test images their configs and splits give, and the three totals keep the relations that define them:
the cache removes each cached run's image-encoder passes and adds one pass per distinct entry set.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import HAVE_DASSL, requires_dassl

from tools import bench

pytestmark = [requires_dassl]
if HAVE_DASSL:
    from datasets.catalog import resolve_dataset
    from datasets.splits import load_splits
    from tools import cost, sweep

TRAINERS = ["ZeroshotCLIP", "CoOp", "CoCoOp", "MaPLe", "BiMoRS"]


def _count(fn, *args, **kwargs) -> int:
    return bench.count_flops(lambda: fn(*args, **kwargs))


def _reference_step(case, images, labels, extras) -> None:
    case.training_loss(images, labels, "reference", **extras).backward()


def test_flops_are_affine_in_the_batch_size():
    """What the report extrapolates from batches of 1 and 2 equals a direct count at a batch of 3."""
    counts = cost.FlopCounts()
    names = bench.bench_classnames("5")
    gen = torch.Generator().manual_seed(0)
    for trainer in ("CoOp", "CoCoOp", "BiMoRS", "MaPLe"):  # text once per batch; per image; captions; prompted
        flops = counts.get(trainer, "toy", {}, names, train=True)
        case = bench.CASES[trainer](counts.clips["toy"], names)
        images, extras = torch.randn(3, 3, 224, 224, generator=gen), case.extras(3)
        labels = torch.randint(0, 5, (3,), generator=gen)
        assert flops.eval["ours"].at(3) == _count(case.model, images, **extras), trainer
        assert flops.eval["published"].at(3) == _count(case.reference, images, **extras), trainer
        assert flops.train["published"].at(3) == _count(_reference_step, case, images, labels, extras), trainer
        if trainer == "MaPLe":  # prompts its image encoder: nothing to cache
            assert "cached" not in flops.eval and flops.visual == 0
        else:  # the forward = the image encoder's pass + what follows it
            assert flops.eval["ours"].at(4) == 4 * flops.visual + flops.eval["cached"].at(4)
        assert flops.train["ours"].at(4) < flops.train["published"].at(4)


def test_counts_kept_in_a_file_are_reused(tmp_path):
    path = tmp_path / "counts.json"
    first = cost.FlopCounts(path)
    flops = first.get("CoCoOp", "toy", {}, ["a", "b"], train=True)
    again = cost.FlopCounts(path)
    assert again.get("CoCoOp", "toy", {}, ["a", "b"], train=True) == flops
    assert not again.clips  # nothing was built or counted again
    assert again.get("CoCoOp", "toy", {}, ["a", "b", "c"], train=False).eval and again.clips  # a new model: counted


@pytest.fixture(scope="module")
def counts():
    """FLOP counts shared by the tests of this module (each model is counted once)."""
    return cost.FlopCounts()


@pytest.fixture(scope="module")
def toy_sweep(toy_root, tmp_path_factory):
    """A base-to-new sweep of five trainers on the session's ToyRS (its generated split: exact sizes)."""
    load_splits(resolve_dataset("toyrs", toy_root))  # writes the generated split if it is not there yet
    tmp_path = tmp_path_factory.mktemp("cost")
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({
        "backbone": "toy", "shots": 2, "seeds": [1, 2], "trainers": TRAINERS,
        "opts": {"OPTIM.MAX_EPOCH": 2, "DATALOADER.TEST.BATCH_SIZE": 5}, "protocols": {"base2new": {"datasets": ["toyrs"]}},
    }))  # fmt: skip
    return sweep.load_sweep(path, sweep.build_parser().parse_args(
        ["cost", str(path), "--data", str(toy_root), "--output", str(tmp_path / "out")]))  # fmt: skip


def test_runs_get_their_steps_images_and_cache_groups(toy_sweep, counts):
    costs = {c.key: c for c in cost.run_costs(toy_sweep, "cuda", counts)}
    assert len(costs) == 20  # 5 trainers x 2 seeds x (train base, test new)
    for c in costs.values():  # ToyRS of 12 images per class: 4 test images per class, 4 classes per half
        assert (c.n_test, c.classes, c.test_batch, c.exact) == (16, 4, 5, True)
        trains = "/train_base/" in c.key and c.trainer != "ZeroshotCLIP"
        batch = {"CoOp": 32, "CoCoOp": 1, "MaPLe": 4, "BiMoRS": 4}.get(c.trainer, 0)
        # 2 shots x 4 classes = 8 images per epoch, batch B: floor(8 / B) steps (1 when B > 8), 2 epochs
        assert c.steps == (2 * (8 // batch if batch <= 8 else 1) if trains else 0), c.key
        assert bool(c.group) == (c.trainer != "MaPLe")
    groups = {c.group for c in costs.values() if c.group}
    assert len(groups) == 6  # base and new x precision on a GPU: fp32 (ZeroshotCLIP), fp16 (CoOp, CoCoOp), amp (BiMoRS)
    on_cpu = {c.group for c in cost.run_costs(toy_sweep, "cpu", counts) if c.group}
    assert len(on_cpu) == 2  # everything in fp32: base and new


def test_totals_keep_their_definitions_and_the_command_prints_them(toy_sweep, counts, tmp_path, capsys):
    costs = cost.run_costs(toy_sweep, "cuda", counts)
    total = cost.totals(costs)
    cached_runs = [c for c in costs if c.group]
    fills = {c.group: c.n_test * c.flops.visual for c in cached_runs}
    # (c) = (b) - the cached runs' image-encoder passes + one pass per distinct entry set
    assert total["cached"]["total"] == (total["ours"]["total"] - sum(c.n_test * c.flops.visual for c in cached_runs)
                                        + sum(fills.values()))  # fmt: skip
    assert total["cached"]["train"] == total["ours"]["train"]
    assert total["published"]["total"] > total["ours"]["total"] > total["cached"]["total"]
    assert total["encoder_images"] == {"without_cache": 16 * len(cached_runs), "with_cache": 16 * 6}
    for c in costs:  # a run's evaluation: ceil(16 / 5) = 4 batches
        ours = c.flops.eval["ours"]
        assert c.eval_flops("ours") == 4 * ours.once + 16 * ours.per_item
        steps_flops = c.steps * c.flops.train["published"].at(c.train_batch) if c.steps else 0
        assert c.train_flops("published") == steps_flops

    out = tmp_path / "cost.json"  # the command, on part of the sweep
    argv = ["cost", str(toy_sweep.path), "--data", str(toy_sweep.data), "--output", str(toy_sweep.output), "--json",
            str(out), "--trainers", "ZeroshotCLIP", "CoCoOp", "--device", "cpu"]  # fmt: skip
    assert sweep.main(argv) == 0
    table = capsys.readouterr().out
    part = [c for c in cost.run_costs(sweep.load_sweep(toy_sweep.path, sweep.build_parser().parse_args(argv)), "cpu",
                                      counts)]  # fmt: skip
    expected = cost.totals(part)
    data = json.loads(out.read_text())["cpu"]
    assert data["totals"] == json.loads(json.dumps(expected)) and len(data["runs"]) == 8
    assert f"(a)/(c) {expected['published']['total'] / expected['cached']['total']:.2f}x" in table
    assert "| **total** |" in table and "| ZeroshotCLIP | 0 / 4 | 0 | 64 |" in table
    shared = {c.group: c.n_test * c.flops.visual for c in part if c.group}  # on a CPU both share the fp32 entries
    assert len(shared) == 2 and math.isclose(sum(r["cached_flops"] for r in data["runs"]) + sum(shared.values()),
                                             expected["cached"]["total"])  # fmt: skip
