"""Split files, generated splits, few-shot sampling and base/new halves (pure, no Dassl needed)."""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

import pytest
from PIL import Image
from yacs.config import CfgNode

from common.io import file_digest
from datasets.catalog import (
    ChecksumError,
    DatasetNotFoundError,
    DatasetSpec,
    SplitError,
    add_dataset_config,
    resolve_dataset,
    spec_from_cfg,
)
from datasets.splits import (
    few_shot,
    generate_split,
    list_image_tree,
    load_splits,
    protocol_relpaths,
    read_split_file,
    subsample_classes,
)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 40)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


def make_tree(image_dir: Path, classes, per_class: int, ext: str = ".png") -> dict[str, list[str]]:
    """Write ``per_class`` tiny valid images per class; return class -> relpaths."""
    out = {}
    for cls in classes:
        (image_dir / cls).mkdir(parents=True, exist_ok=True)
        out[cls] = []
        for i in range(per_class):
            (image_dir / cls / f"{cls}_{i:03d}{ext}").write_bytes(PNG)
            out[cls].append(f"{cls}/{cls}_{i:03d}{ext}")
    return out


def write_official_split(path: Path, classes, per_class: tuple[int, int, int]) -> dict:
    """A split file in the official format: labels in the order of ``classes``, grouped by label."""
    data = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(classes):
        index = 0
        for key, count in zip(("train", "val", "test"), per_class):
            for _ in range(count):
                data[key].append([f"{cls}/{cls}_{index:03d}.png", label, cls])
                index += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data


def generic_spec(root: Path, folder: str = "Mine", split_file: str = "") -> DatasetSpec:
    """The spec of a yaml-only (ImageFolderRS) dataset in ``root/folder``."""
    cfg = CfgNode()
    cfg.DATASET = CfgNode()
    cfg.DATASET.NAME = "ImageFolderRS"
    cfg.DATASET.ROOT = str(root)
    add_dataset_config(cfg)
    cfg.DATASET.FOLDER = folder
    cfg.DATASET.SPLIT_FILE = split_file
    return spec_from_cfg(cfg)


@pytest.fixture(autouse=True)
def logging_enabled():
    """Warnings are asserted here; Dassl's import (in another test module) disables them process-wide."""
    previous = logging.getLogger().manager.disable
    logging.disable(logging.NOTSET)
    yield
    logging.disable(previous)


ORDER = ["zebra_crossing", "airport", "lake", "meadow", "beach"]  # deliberately not alphabetical


# ------------------------------------------------------------------------------------------ split files
def test_read_split_file_keeps_counts_and_label_order(tmp_path):
    path = tmp_path / "s.json"
    write_official_split(path, ORDER, (5, 3, 4))
    splits = read_split_file(path)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [25, 15, 20]
    first_by_label = {}
    for rel, label, cls in splits["train"]:
        first_by_label.setdefault(label, cls)
        assert rel.startswith(cls + "/")
    assert [first_by_label[i] for i in range(5)] == ORDER
    assert splits["test"][0] == ("zebra_crossing/zebra_crossing_008.png", 0, "zebra_crossing")


def test_read_split_file_checks_md5(tmp_path, caplog):
    path = tmp_path / "s.json"
    write_official_split(path, ORDER, (2, 1, 1))
    good = file_digest(path, "md5")
    assert len(read_split_file(path, expected_md5=good)["train"]) == 10
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as err:
        read_split_file(path, expected_md5=wrong, expected_sizes=(14896, 6384, 9120))
    message = str(err.value)
    assert good in message and wrong in message and str(path) in message
    assert "10/5/5" in message and "14896/6384/9120" in message and "ALLOW_SPLIT_MISMATCH" in message
    with caplog.at_level(logging.WARNING, logger="datasets.splits"):
        splits = read_split_file(path, expected_md5=wrong, allow_mismatch=True)
    assert len(splits["val"]) == 5 and "md5" in caplog.text


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"train": [], "val": []}, "'test'"),
        ({"train": [["a/b.png", "0", "a"]], "val": [], "test": []}, "entry 0 of 'train'"),
        ({"train": [["a/b.png", 0, "a"]], "val": [["c/d.png", 0, "c"]], "test": []}, "label 0"),
    ],
)
def test_bad_split_files_are_named(tmp_path, data, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SplitError, match=match):
        read_split_file(path)


def test_missing_split_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nope.json"):
        read_split_file(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------- generated split
@pytest.mark.parametrize(("n", "sizes"), [(100, (49, 21, 30)), (800, (392, 168, 240)), (260, (127, 55, 78)), (60, (29, 13, 18))])
def test_generated_split_is_49_21_30_per_class(n, sizes):
    tree = {"b": [f"b/{i}.png" for i in range(n)], "a": [f"a/{i}.png" for i in range(n)]}
    splits = generate_split(tree, seed=1)
    for label, cls in enumerate(["b", "a"]):  # label order = tree order
        counts = tuple(sum(1 for _, lab, c in splits[k] if lab == label and c == cls) for k in ("train", "val", "test"))
        assert counts == sizes
    all_paths = [rel for items in splits.values() for rel, _, _ in items]
    assert len(all_paths) == len(set(all_paths)) == 2 * n
    assert generate_split(tree, seed=1) == splits
    assert generate_split(tree, seed=2) != splits


def test_generated_split_written_once_and_reused(tmp_path):
    spec = generic_spec(tmp_path)
    make_tree(spec.image_dir, ["river", "forest", "airport"], 20)
    first = load_splits(spec)
    assert spec.generated_split_path.is_file()
    saved = spec.generated_split_path.read_bytes()
    assert {label: cls for _, label, cls in first["train"]} == {0: "airport", 1: "forest", 2: "river"}  # sorted
    make_tree(spec.image_dir, ["river"], 30)  # new images after the split was made
    second = load_splits(spec)
    assert second == first
    assert spec.generated_split_path.read_bytes() == saved


def test_catalogue_class_order_drives_generated_labels(tmp_path):
    spec = resolve_dataset("toyrs", tmp_path)
    make_tree(spec.image_dir, spec.classnames, 10)
    splits = load_splits(spec)
    order = {label: cls for _, label, cls in splits["test"]}
    assert [order[i] for i in range(len(order))] == list(spec.classnames)


def test_missing_class_folder_for_catalogue_dataset(tmp_path):
    spec = resolve_dataset("toyrs", tmp_path)
    make_tree(spec.image_dir, spec.classnames[:-1], 5)
    with pytest.raises(SplitError, match=spec.classnames[-1]):
        load_splits(spec)
    assert not spec.generated_split_path.exists()


def test_non_image_files_are_ignored_with_a_warning(tmp_path, caplog):
    make_tree(tmp_path, ["a", "b"], 4)
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "b" / "sub").mkdir()
    (tmp_path / "a" / ".DS_Store").write_text("x")
    with caplog.at_level(logging.WARNING, logger="datasets.splits"):
        tree = list_image_tree(tmp_path)
    assert tree == {"a": [f"a/a_{i:03d}.png" for i in range(4)], "b": [f"b/b_{i:03d}.png" for i in range(4)]}
    assert "a/notes.txt" in caplog.text and "b/sub" in caplog.text and ".DS_Store" not in caplog.text


def test_empty_class_folder_is_an_error(tmp_path):
    spec = generic_spec(tmp_path)
    make_tree(spec.image_dir, ["a"], 3)
    (spec.image_dir / "empty").mkdir()
    (spec.image_dir / "empty" / "readme.txt").write_text("x")
    with pytest.raises(SplitError, match="empty") as err:
        load_splits(spec)
    assert "add images" in str(err.value)
    assert not spec.generated_split_path.exists()


# ------------------------------------------------------------------------------------- missing things
def test_missing_dataset_folder_shows_the_prepare_command(tmp_path):
    spec = resolve_dataset("patternnet", tmp_path)
    with pytest.raises(DatasetNotFoundError) as err:
        load_splits(spec)
    assert f"python -m tools.prepare_data patternnet --root {tmp_path}" in str(err.value)
    assert str(spec.dataset_dir) in str(err.value)


def test_missing_image_folder_and_split_file(tmp_path):
    spec = resolve_dataset("patternnet", tmp_path)
    spec.dataset_dir.mkdir()
    with pytest.raises(DatasetNotFoundError, match="images"):
        load_splits(spec)
    spec.image_dir.mkdir()
    with pytest.raises(DatasetNotFoundError, match="patternnet.json") as err:
        load_splits(spec)
    assert "tools.prepare_data" in str(err.value)


def test_missing_images_are_counted_and_listed(tmp_path):
    spec = generic_spec(tmp_path, split_file="split.json")
    write_official_split(spec.split_path, ORDER, (3, 1, 2))
    make_tree(spec.image_dir, ORDER, 6)
    (spec.image_dir / "lake" / "lake_000.png").unlink()
    (spec.image_dir / "beach" / "beach_005.png").unlink()
    with pytest.raises(SplitError) as err:
        load_splits(spec)
    message = str(err.value)
    assert "2 of 30 images" in message and "lake/lake_000.png" in message and "beach/beach_005.png" in message


# ------------------------------------------------------------------------------------------ few-shot
@pytest.fixture
def splits(tmp_path):
    path = tmp_path / "s.json"
    write_official_split(path, ORDER, (20, 8, 6))
    return read_split_file(path)


def _reference_fewshot(splits, k, seed):
    """CoOp's formulation: seed the global `random`, then random.sample per label, train then val."""
    random.seed(seed)
    out = {}
    for key, shots in (("train", k), ("val", min(k, 4))):
        by_label = {}
        for item in splits[key]:
            by_label.setdefault(item[1], []).append(item)
        out[key] = [x for items in by_label.values() for x in (random.sample(items, shots) if len(items) >= shots else items)]
    return out


@pytest.mark.parametrize("k", [1, 2, 16])
def test_few_shot_counts_and_coop_equivalence(splits, tmp_path, k):
    result = few_shot(splits, k, seed=1, cache_dir=tmp_path / "fs")
    for label in range(5):
        assert sum(1 for _, lab, _ in result["train"] if lab == label) == k
        assert sum(1 for _, lab, _ in result["val"] if lab == label) == min(k, 4)
    assert result["test"] == splits["test"]
    reference = _reference_fewshot(splits, k, 1)
    assert result["train"] == reference["train"] and result["val"] == reference["val"]


def test_few_shot_is_cached_deterministic_and_seeded(splits, tmp_path):
    cache = tmp_path / "fs"
    first = few_shot(splits, 4, seed=1, cache_dir=cache)
    path = cache / "shot_4-seed_1.json"
    assert path.is_file()
    saved = json.loads(path.read_text())
    assert [tuple(x) for x in saved["train"]] == first["train"]
    assert few_shot(splits, 4, seed=1, cache_dir=cache) == first  # read back from the cache
    assert few_shot(splits, 4, seed=1, cache_dir=tmp_path / "other") == first  # drawn again: same
    assert few_shot(splits, 4, seed=2, cache_dir=cache)["train"] != first["train"]


def test_few_shot_all_and_small_classes(splits, tmp_path):
    assert few_shot(splits, -1, seed=1, cache_dir=tmp_path) == splits
    assert few_shot(splits, 0, seed=1, cache_dir=tmp_path) == splits
    assert not list(tmp_path.glob("shot_*"))
    big = few_shot(splits, 50, seed=1, cache_dir=tmp_path)
    assert sorted(big["train"]) == sorted(splits["train"])  # fewer than K: all of them


def test_stale_few_shot_cache_is_redrawn(splits, tmp_path, caplog):
    few_shot(splits, 2, seed=1, cache_dir=tmp_path)
    changed = {k: list(v) for k, v in splits.items()}
    changed["train"] = changed["train"][5:]
    with caplog.at_level(logging.WARNING, logger="datasets.splits"):
        result = few_shot(changed, 2, seed=1, cache_dir=tmp_path)
    assert "different split" in caplog.text
    assert set(result["train"]) <= set(changed["train"])


# ------------------------------------------------------------------------------------------- base/new
def test_subsample_classes_halves_and_relabels(splits):
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert subsample_classes(train, val, test, subsample="all") == (train, val, test)
    base = subsample_classes(train, val, test, subsample="base")
    new = subsample_classes(train, val, test, subsample="new")
    assert {(lab, cls) for _, lab, cls in base[0]} == {(0, "zebra_crossing"), (1, "airport"), (2, "lake")}
    assert {(lab, cls) for _, lab, cls in new[2]} == {(0, "meadow"), (1, "beach")}
    assert len(base[0]) + len(new[0]) == len(train) and len(base[2]) + len(new[2]) == len(test)
    with pytest.raises(ValueError, match="SUBSAMPLE_CLASSES"):
        subsample_classes(train, subsample="half")


# ------------------------------------------------------------------------------------------ protocols
def test_protocol_relpaths_cover_every_image_a_run_reads(tmp_path):
    spec = generic_spec(tmp_path, split_file="split.json")
    write_official_split(spec.split_path, ORDER, (20, 8, 6))
    make_tree(spec.image_dir, ORDER, 34)
    paths = protocol_relpaths(spec, shots=4, seeds=(1, 2))
    assert len(paths) == len(set(paths))
    splits = load_splits(spec)
    expected = set(rel for rel, _, _ in splits["test"])
    for seed in (1, 2):
        sampled = few_shot(splits, 4, seed, spec.fewshot_dir)
        expected |= {rel for rel, _, _ in sampled["train"] + sampled["val"]}
    assert set(paths) == expected
    assert paths[-len(splits["test"]) :] == [rel for rel, _, _ in splits["test"]]
    assert protocol_relpaths(spec, shots=4, seeds=(1, 2)) == paths
