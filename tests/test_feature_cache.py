"""The feature cache (datasets/feature_cache.py, trainers/base.py, tools/features.py): exact, safe, shared.

Every registered trainer whose image encoder is frozen and unprompted evaluates to bit-identical logits with and
without the cache (fp32, CPU), whether the entries are computed on the way or read; the others never use it.
Damaged and foreign entries are reported and recomputed; two processes filling the same entries at once leave
valid entries; a read-only data root keeps its entries in the user cache. Toy backbone, a private ToyRS.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HAVE_DASSL, REPO_ROOT, requires_dassl, write_random_caption_store

pytestmark = [requires_dassl]
if HAVE_DASSL:
    from dassl.engine import TRAINER_REGISTRY, build_trainer

    import datasets.remote_sensing  # noqa: F401  (registers the datasets)
    import train
    import trainers  # noqa: F401  (registers the trainers)
    from datasets import feature_cache as fc
    from tools.planner import TRAINERS
    from trainers.base import PromptTrainer

TOYRS_CFG = str(REPO_ROOT / "configs/datasets/toyrs.yaml")
# 32 test images in batches of 5: six full batches and a short last one
FAST = ["MODEL.BACKBONE.NAME", "toy", "DATASET.NUM_SHOTS", "2", "DATALOADER.NUM_WORKERS", "0",
        "DATALOADER.TEST.BATCH_SIZE", "5", "OPTIM.MAX_EPOCH", "1"]  # fmt: skip
N_BATCHES = 7
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
WAIT_S = 300  # bound on every wait for a child process


def _registered() -> list:
    if not HAVE_DASSL:
        return []
    return [pytest.param(n, id=n) for n in sorted(TRAINER_REGISTRY.registered_names())
            if issubclass(TRAINER_REGISTRY.get(n), PromptTrainer)]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A private ToyRS (12 images per class, 4 of them test) with a random caption store; each test starts from
    an empty feature cache."""
    from datasets import toyrs

    path = tmp_path_factory.mktemp("fc-data")
    toyrs.generate(path / "ToyRS" / "images", per_class=12, progress=False)
    write_random_caption_store(path)
    return path


@pytest.fixture
def data(root, monkeypatch, tmp_path) -> Path:
    """The module's data root with no feature cache yet (and a user cache of this test's own)."""
    import shutil

    shutil.rmtree(root / "ToyRS" / fc.FOLDER, ignore_errors=True)
    monkeypatch.setenv("BIMORS_CACHE", str(tmp_path / "user-cache"))
    return root


def run_args(root: Path, name: str, *opts: str) -> list[str]:
    """train.py arguments of a toy run of trainer ``name`` (fp32, its first ViT-B/16 config)."""
    cls = TRAINER_REGISTRY.get(name)
    files = sorted((REPO_ROOT / "configs" / "trainers" / name).glob("vit_b16*.yaml"))
    args = ["--root", str(root), "--seed", "1", "--trainer", name, "--dataset-config-file", TOYRS_CFG]
    args += ["--config-file", str(files[0])] if files else []
    node = cls.CONFIG_NODE
    extra = [f"TRAINER.{node}.PREC", "fp32"] if node else []
    if getattr(cls, "NEEDS_CAPTIONS", False):
        extra += [f"TRAINER.{node}.CAPTIONER", "toy-blip2", f"TRAINER.{node}.CAPTION_ENCODER", "toy-bert"]
    return args + FAST + extra + list(opts)


def build(root: Path, out: Path, name: str, *opts: str):
    """A trainer as train.main builds it, with learned parameters moved off their initialisation (seeded)."""
    cfg = train.setup_cfg(train.build_parser().parse_args(["--output-dir", str(out), *run_args(root, name, *opts)]))
    torch.manual_seed(0)
    trainer = build_trainer(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (p for p in trainer.model.parameters() if p.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p))
    return trainer


def logits(trainer, cache=None) -> torch.Tensor:
    """Every test batch's logits, as the trainer's evaluation computes them (with ``cache``, from it)."""
    return torch.cat([batch_logits for _, batch_logits in trainer.eval_logits(trainer.test_loader, cache)])


def entries(data: Path) -> list[Path]:
    return sorted((data / "ToyRS" / fc.FOLDER).glob(f"*/*{fc.SUFFIX}"))


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", _registered())
def test_cached_evaluation_is_bit_equal_to_uncached(name, data, tmp_path):
    """Registry-wide: the logits from entries computed on the way, and from entries read back, equal the
    uncached evaluation's bit for bit; a model that prompts its image encoder never uses the cache."""
    plain = build(data, tmp_path / "plain", name, "BENCH.FEATURE_CACHE", "False")
    cached = build(data, tmp_path / "cached", name)
    assert plain.feature_cache(plain.test_loader) is None  # switched off
    model = type(cached.model)
    uses_cache = not model.IMAGE_ENCODER_PROMPTED
    if name in TRAINERS:  # the planner fills the cache for the same trainers
        assert TRAINERS[name].cached_features == uses_cache
    if not uses_cache:
        assert cached.feature_cache(cached.test_loader) is None
        return
    expected = logits(plain)
    first = cached.feature_cache(cached.test_loader)
    assert first.outputs == model.VISUAL_OUTPUTS and len(cached.test_loader) == N_BATCHES
    assert torch.equal(logits(cached, first), expected)
    assert (first.stats.computed, first.stats.read) == (N_BATCHES, 0)
    assert len(entries(data)) == N_BATCHES * len(model.VISUAL_OUTPUTS)
    second = cached.feature_cache(cached.test_loader)
    assert torch.equal(logits(cached, second), expected)
    assert (second.stats.computed, second.stats.read, second.stats.rejected) == (0, N_BATCHES, 0)


def test_test_reads_the_cache_and_writes_the_same_results(data, tmp_path):
    """``test()`` itself (results.json) with the cache filled by an earlier run of another seed's trainer."""
    first = build(data, tmp_path / "a", "CoCoOp")
    first.test()
    second = build(data, tmp_path / "b", "CoCoOp", "BENCH.FEATURE_CACHE", "False")
    second.test()
    third = build(data, tmp_path / "c", "CoCoOp")
    cache = third.feature_cache(third.test_loader)
    assert all(cache.has(cache.batch_key([third.test_loader.dataset.data_source[i].impath for i in b]))
               for b in third.test_loader.batch_sampler)  # fmt: skip
    third.test()
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in "abc"]
    for r in results:
        r.pop("seconds")
    assert results[0] == results[1] == results[2]


# ------------------------------------------------------------------------------------- damaged, foreign
def _flip_byte(path: Path, offset_from_end: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(raw))


def test_damaged_and_foreign_entries_are_reported_and_recomputed(data, tmp_path, caplog):
    """Four entries spoiled four ways (a flipped bit, a truncated file, another setting's entry and another batch's
    under their names): each is reported, recomputed and replaced; the logits stay those of an uncached run."""
    trainer = build(data, tmp_path / "run", "BiMoRS")
    expected = logits(build(data, tmp_path / "plain", "BiMoRS", "BENCH.FEATURE_CACHE", "False"))
    fill = trainer.feature_cache(trainer.test_loader)
    logits(trainer, fill)
    source = trainer.test_loader.dataset.data_source
    impaths = [[source[i].impath for i in b] for b in trainer.test_loader.batch_sampler]
    keys = [fill.batch_key(paths) for paths in impaths]
    folder = fill.folders[0]

    def path(batch: int, output: str) -> Path:
        return folder / f"{keys[batch].name}.{output}{fc.SUFFIX}"

    raw = bytearray(path(0, "tokens").read_bytes())
    raw[-100] ^= 0x01  # one bit of the tensor data
    path(0, "tokens").write_bytes(bytes(raw))
    path(1, "tokens").write_bytes(path(1, "tokens").read_bytes()[:-1000])  # truncated
    other = fc.FeatureCache(fill.dataset_dir, fill.image_dir,
                            fc.Setting(**{**fill.setting.as_dict(), "transform": "Compose(Resize(size=336))"}),
                            ("features",))  # fmt: skip
    other_key = other.batch_key(impaths[2])
    other.write(other_key, {"features": torch.zeros(len(impaths[2]), 64)})
    path(2, "features").write_bytes((other.folders[0] / f"{other_key.name}.features{fc.SUFFIX}").read_bytes())
    path(3, "features").write_bytes(path(4, "features").read_bytes())  # another batch's entry: other images
    caplog.set_level(logging.WARNING, logger="datasets.feature_cache")
    again = trainer.feature_cache(trainer.test_loader)
    assert torch.equal(logits(trainer, again), expected)
    assert (again.stats.rejected, again.stats.computed, again.stats.read) == (4, 4, N_BATCHES - 4)
    reasons = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{path(0, 'tokens')} is damaged (its bytes do not match their checksum): not used" in reasons
    assert f"{path(1, 'tokens')} cannot be read" in reasons
    assert f"{path(2, 'features')} was made with another transform: not used" in reasons
    assert f"{path(3, 'features')} was made for other images: not used" in reasons
    last = trainer.feature_cache(trainer.test_loader)  # the replaced entries are good
    assert torch.equal(logits(trainer, last), expected)
    assert (last.stats.read, last.stats.rejected) == (N_BATCHES, 0)


def test_another_backbone_or_transform_computes_its_own_entries(data, tmp_path):
    """The setting (the encoder's fingerprint, the transform, the precision) names the folder: entries of the toy
    backbone are never read by a run on another backbone (same sizes, GELU) or with another interpolation."""
    base = build(data, tmp_path / "a", "ZeroshotCLIP")
    logits(base, base.feature_cache(base.test_loader))
    for opts in (["MODEL.BACKBONE.NAME", "toy-gelu"], ["INPUT.INTERPOLATION", "bilinear"]):
        run = build(data, tmp_path / opts[1], "ZeroshotCLIP", *opts)
        cache = run.feature_cache(run.test_loader)
        assert cache.setting.key != base.feature_cache(base.test_loader).setting.key
        expected = logits(build(data, tmp_path / f"{opts[1]}-plain", "ZeroshotCLIP", *opts, "BENCH.FEATURE_CACHE",
                                "False"))  # fmt: skip
        assert torch.equal(logits(run, cache), expected)
        assert (cache.stats.computed, cache.stats.read) == (N_BATCHES, 0)


def test_an_unreadable_image_is_reported_as_without_the_cache(data, tmp_path, capsys):
    """A batch whose image cannot be read has no key: it is loaded as usual, which names the file."""
    import shutil

    from datasets.catalog import CorruptImageError

    copy = tmp_path / "data"
    shutil.copytree(data / "ToyRS", copy / "ToyRS")
    trainer = build(copy, tmp_path / "run", "CoOp")
    image = Path(trainer.test_loader.dataset.data_source[7].impath)
    image.write_bytes(b"not an image")
    with pytest.raises(CorruptImageError, match=f"cannot read image {image}"):
        logits(trainer, trainer.feature_cache(trainer.test_loader))


# ----------------------------------------------------------------------------------------- concurrency
CHILD = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import test_feature_cache as t
folder, args = Path(sys.argv[2]), sys.argv[3:]
import datasets.remote_sensing, trainers, train
from dassl.engine import build_trainer
cfg = train.setup_cfg(train.build_parser().parse_args(["--output-dir", str(folder / "out"), *args]))
trainer = build_trainer(cfg)
(folder / "ready").write_text("")
while not (folder.parent / "go").exists():
    time.sleep(0.001)
cache = trainer.fill_feature_cache()
print("computed", cache.stats.computed, "read", cache.stats.read)
"""


def test_two_processes_filling_the_same_entries_leave_valid_entries(data, tmp_path):
    """Two processes fill the same entries, released at the same moment; every entry is then whole and right."""
    args = run_args(data, "APPLeNet", "DATALOADER.TEST.BATCH_SIZE", "1")  # 32 entries of 2 outputs
    children = []
    for i in (1, 2):
        folder = tmp_path / f"child{i}"
        folder.mkdir()
        children.append((folder, subprocess.Popen(
            [sys.executable, "-c", CHILD, str(REPO_ROOT / "tests"), str(folder), *args], cwd=REPO_ROOT, env=CHILD_ENV,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))  # fmt: skip
    deadline = time.monotonic() + WAIT_S
    while not all((f / "ready").exists() for f, _ in children):
        assert all(p.poll() is None for _, p in children), [p.communicate() for _, p in children]
        assert time.monotonic() < deadline, "the children did not get ready"
        time.sleep(0.01)
    (tmp_path / "go").write_text("")
    outs = [p.communicate(timeout=WAIT_S) for _, p in children]
    assert all(p.returncode == 0 for _, p in children), [err[-2000:] for _, err in outs]
    computed = [int(next(line for line in out.splitlines()[::-1] if line.startswith("computed ")).split()[1])
                for out, _ in outs]  # fmt: skip
    assert sum(computed) >= 32  # between them, every entry was computed at least once
    files = entries(data)
    assert len(files) == 64 and not list((data / "ToyRS" / fc.FOLDER).rglob("*.tmp"))  # no half-written leftovers
    reader = build(data, tmp_path / "reader", "APPLeNet", "DATALOADER.TEST.BATCH_SIZE", "1")
    cache = reader.feature_cache(reader.test_loader)
    expected = logits(build(data, tmp_path / "plain", "APPLeNet", "DATALOADER.TEST.BATCH_SIZE", "1",
                            "BENCH.FEATURE_CACHE", "False"))  # fmt: skip
    assert torch.equal(logits(reader, cache), expected)
    assert (cache.stats.read, cache.stats.computed, cache.stats.rejected) == (32, 0, 0)


# ------------------------------------------------------------------------------------------ the tool
def test_fill_tool_fills_runs_of_one_setting_in_one_pass_and_du_reports_it(data, tmp_path, capsys):
    """CoOp and APPLeNet (features; features and layer means) on the base classes share a setting: one pass
    stores the union; MaPLe has nothing to fill. Their evaluations then read every batch."""
    from tools import features

    runs = [run_args(data, n, "DATASET.SUBSAMPLE_CLASSES", "base") for n in ("CoOp", "APPLeNet", "MaPLe")]
    argv = ["fill", *runs[0], "--and", *runs[1], "--and", *runs[2]]
    assert features.main(argv) == 0
    files = entries(data)
    assert len(files) == 2 * 4  # 16 base test images in batches of 5: 4 batches x (features, layer_means)
    for name in ("CoOp", "APPLeNet"):
        trainer = build(data, tmp_path / name, name, "DATASET.SUBSAMPLE_CLASSES", "base")
        cache = trainer.feature_cache(trainer.test_loader)
        logits(trainer, cache)
        assert (cache.stats.read, cache.stats.computed) == (4, 0), name
    # a second fill computes only what is missing and reads nothing (an evaluation checks what it reads)
    files[0].unlink()
    filler = build(data, tmp_path / "again", "APPLeNet", "DATASET.SUBSAMPLE_CLASSES", "base")
    again = filler.fill_feature_cache()
    assert (again.stats.read, again.stats.computed) == (0, 1) and files[0].is_file()
    last = filler.fill_feature_cache()
    assert (last.stats.read, last.stats.computed) == (0, 0)
    capsys.readouterr()
    assert features.main(["du", "--root", str(data)]) == 0
    out = capsys.readouterr().out
    sizes = {p.name.split(".")[1]: 0 for p in files}
    for p in files:
        sizes[p.name.split(".")[1]] += p.stat().st_size
    assert f"features {sizes['features'] / 2**20:.1f} MB in 4 files" in out and "toy, fp32" in out
    assert f"layer_means {sizes['layer_means'] / 2**20:.1f} MB in 4 files" in out


def test_fill_tool_refuses_a_run_with_eval_flags(data, capsys):
    from tools import features

    assert features.main(["fill", "--eval-only", *run_args(data, "CoOp")]) == 2
    assert capsys.readouterr().err.startswith("error: run 1: give the run's arguments without --eval-only")


# ------------------------------------------------------------------------------------------ read-only data
def test_read_only_data_root_keeps_its_entries_in_the_user_cache(data, tmp_path):
    """On a read-only data root the first run stores its entries in the user cache ($BIMORS_CACHE), with a note,
    and the next run reads them there."""
    import shutil

    from test_faults import read_only

    root = tmp_path / "ro"
    shutil.copytree(data / "ToyRS", root / "ToyRS")
    user = tmp_path / "user"
    prefix = read_only(root)
    env = {**CHILD_ENV, "BIMORS_CACHE": str(user)}
    results, logs = [], []
    for run in ("first", "second"):
        out = tmp_path / run
        proc = subprocess.run([*prefix, sys.executable, str(REPO_ROOT / "train.py"), "--output-dir", str(out),
                               *run_args(root, "ZeroshotCLIP")], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=WAIT_S)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads((out / "results.json").read_text()))
        logs.append(proc.stdout)
        [folder] = user.glob(f"ToyRS-*/{fc.FOLDER}/*")
        done = "0 batches read, 7 computed" if run == "first" else "7 batches read, 0 computed"
        assert f"feature cache {folder}: {done}" in proc.stdout, proc.stdout[-3000:]
    primary = root / "ToyRS" / fc.FOLDER
    assert f"{primary} is read-only: cached image features go to {folder.parent} instead" in logs[0]
    assert not primary.exists() and len(list(folder.glob(f"*{fc.SUFFIX}"))) == N_BATCHES
    assert results[0]["per_class"] == results[1]["per_class"] and results[0]["accuracy"] == results[1]["accuracy"]
