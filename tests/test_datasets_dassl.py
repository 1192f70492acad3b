"""The Dassl dataset classes: every catalogue row loads from a fake image tree, and DataManager works."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from conftest import requires_dassl
from test_splits import make_tree, write_official_split

from datasets.catalog import (
    CATALOG,
    CONFIG_DIR,
    ChecksumError,
    DatasetNotFoundError,
    add_dataset_config,
    resolve_dataset,
)

pytestmark = [requires_dassl, pytest.mark.dassl]

PER_CLASS = (6, 3, 4)  # train/val/test images per class in the fake split files
N_GENERATED = 13  # images per class when the split is generated: 6/3/4 after 49/21/30


@pytest.fixture(scope="module")
def dassl():
    from dassl.config import get_cfg_default
    from dassl.data.datasets import DATASET_REGISTRY

    import datasets.remote_sensing  # noqa: F401  (registers the classes)

    return get_cfg_default, DATASET_REGISTRY


def make_cfg(get_cfg_default, name: str, root: Path, **dataset):
    cfg = get_cfg_default()
    add_dataset_config(cfg)
    cfg.DATASET.NAME = name
    cfg.DATASET.ROOT = str(root)
    cfg.SEED = 1
    for key, value in dataset.items():
        cfg.DATASET[key] = value
    return cfg


def fake_dataset(name: str, root: Path) -> Path:
    """A fake image tree (and a fake split file in the official format) for one catalogue row."""
    info = CATALOG[name]
    spec = resolve_dataset(name, root)
    if info.split_file:
        make_tree(spec.image_dir, info.classnames, sum(PER_CLASS))
        write_official_split(spec.split_path, info.classnames, PER_CLASS)
    else:
        make_tree(spec.image_dir, info.classnames, N_GENERATED)
    return spec.image_dir


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_catalogue_row_loads(dassl, tmp_path, name):
    get_cfg_default, registry = dassl
    info = CATALOG[name]
    image_dir = fake_dataset(name, tmp_path)
    n = info.num_classes
    # The fake split file is not the official one: its md5 differs, hence the explicit override.
    cfg = make_cfg(get_cfg_default, name, tmp_path, ALLOW_SPLIT_MISMATCH=True)
    ds = registry.get(name)(cfg)

    assert ds.image_dir == str(image_dir) and Path(ds.image_dir).is_absolute()
    assert ds.template == info.template and ds.spec.name == name
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == (6 * n, 3 * n, 4 * n)
    assert ds.num_classes == n
    assert ds.classnames == [ds.spec.display_name(c) for c in info.classnames]  # label order kept
    for datum in ds.test:
        raw = info.classnames[datum.label]
        assert datum.classname == ds.spec.display_name(raw)
        assert Path(datum.impath).parent.name == raw and Path(datum.impath).is_file()

    base = registry.get(name)(make_cfg(get_cfg_default, name, tmp_path, ALLOW_SPLIT_MISMATCH=True,
                                       SUBSAMPLE_CLASSES="base"))  # fmt: skip
    new = registry.get(name)(make_cfg(get_cfg_default, name, tmp_path, ALLOW_SPLIT_MISMATCH=True,
                                      SUBSAMPLE_CLASSES="new"))  # fmt: skip
    half = math.ceil(n / 2)
    assert base.classnames == ds.classnames[:half] and new.classnames == ds.classnames[half:]
    assert {d.label for d in new.test} == set(range(n - half))
    assert len(base.test) + len(new.test) == len(ds.test)

    shots = [
        registry.get(name)(make_cfg(get_cfg_default, name, tmp_path, ALLOW_SPLIT_MISMATCH=True, NUM_SHOTS=2))
        for _ in range(2)
    ]
    assert len(shots[0].train_x) == 2 * n and len(shots[0].val) == 2 * n
    assert [d.impath for d in shots[0].train_x] == [d.impath for d in shots[1].train_x]
    assert (Path(ds.spec.fewshot_dir) / "shot_2-seed_1.json").is_file()
    cfg2 = make_cfg(get_cfg_default, name, tmp_path, ALLOW_SPLIT_MISMATCH=True, NUM_SHOTS=2)
    cfg2.SEED = 2
    other = registry.get(name)(cfg2)
    assert [d.impath for d in other.train_x] != [d.impath for d in shots[0].train_x]


def test_warnings_stay_enabled_after_the_dassl_import(dassl):
    # dassl.data.datasets disables logging up to WARNING when imported; datasets.remote_sensing undoes it.
    assert logging.getLogger().manager.disable < logging.WARNING


def test_split_md5_mismatch_needs_the_explicit_override(dassl, tmp_path):
    get_cfg_default, registry = dassl
    fake_dataset("RSICD", tmp_path)
    with pytest.raises(ChecksumError, match="ALLOW_SPLIT_MISMATCH"):
        registry.get("RSICD")(make_cfg(get_cfg_default, "RSICD", tmp_path))


def test_missing_dataset_shows_the_prepare_command(dassl, tmp_path):
    get_cfg_default, registry = dassl
    with pytest.raises(DatasetNotFoundError) as err:
        registry.get("PatternNet")(make_cfg(get_cfg_default, "PatternNet", tmp_path))
    assert f"python -m tools.prepare_data patternnet --root {tmp_path}" in str(err.value)


def test_yaml_only_dataset(dassl, tmp_path):
    get_cfg_default, registry = dassl
    make_tree(tmp_path / "MyScenes" / "images", ["storagetanks", "parkinglot", "river"], N_GENERATED)
    cfg = get_cfg_default()
    add_dataset_config(cfg)
    cfg.merge_from_file(str(CONFIG_DIR / "examples" / "my_scenes.yaml"))
    cfg.DATASET.ROOT = str(tmp_path)
    ds = registry.get(cfg.DATASET.NAME)(cfg)
    assert type(ds).__name__ == "ImageFolderRS"
    assert ds.classnames == ["parking lot", "river", "storage tanks"]  # sorted folders, mapped names
    assert ds.template == "a satellite photo of a {}."
    assert (tmp_path / "MyScenes" / "split_generated.json").is_file()


def test_datamanager_builds_loaders_for_base_and_new(dassl, tmp_path):
    from dassl.data import DataManager

    get_cfg_default, _ = dassl
    classes = ["c_field", "a_water", "d_road", "b_forest"]
    make_tree(tmp_path / "Fake" / "images", classes, 10)
    seen = {}
    for subsample in ("base", "new"):
        cfg = make_cfg(get_cfg_default, "ImageFolderRS", tmp_path, FOLDER="Fake", NUM_SHOTS=2,
                       SUBSAMPLE_CLASSES=subsample)  # fmt: skip
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 2
        cfg.DATALOADER.TEST.BATCH_SIZE = 4
        cfg.INPUT.SIZE = (32, 32)
        cfg.INPUT.TRANSFORMS = ("random_flip", "normalize")
        dm = DataManager(cfg)
        assert dm.num_classes == 2
        assert len(dm.dataset.train_x) == 4 and len(dm.dataset.val) == 4
        batch = next(iter(dm.train_loader_x))
        assert tuple(batch["img"].shape) == (2, 3, 32, 32)
        assert set(batch["label"].tolist()) <= {0, 1}
        test_batch = next(iter(dm.test_loader))
        assert tuple(test_batch["img"].shape[1:]) == (3, 32, 32)
        assert dm.val_loader is not None
        seen[subsample] = dm.dataset.classnames
    assert seen == {"base": ["a water", "b forest"], "new": ["c field", "d road"]}
