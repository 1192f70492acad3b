"""The dataset catalogue, the dataset configs and dataset-name resolution (pure, no Dassl needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, requires_dassl
from yacs.config import CfgNode

from datasets.catalog import (
    CATALOG,
    CONFIG_DIR,
    DEFAULT_TEMPLATE,
    GENERIC_NAME,
    SPLIT_URL,
    DatasetError,
    DatasetInfo,
    add_dataset_config,
    config_files,
    humanize,
    prepare_command,
    resolve_dataset,
    source_kind,
    spec_from_cfg,
)

EXPECTED_ROWS = {
    "PatternNet", "RSICD", "RESISC45", "MLRSNet", "PatternNetv2", "RSICDv2", "RESISC45v2", "MLRSNetv2",
    "UCMerced", "AID", "WHURS19", "EuroSAT", "OPTIMAL31", "ToyRS",
}  # fmt: skip
MD5 = re.compile(r"^[0-9a-f]{32}$")


def test_catalogue_has_exactly_the_expected_rows():
    assert set(CATALOG) == EXPECTED_ROWS


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_row_is_consistent(name):
    info = CATALOG[name]
    assert info.name == name
    assert info.num_classes == len(info.classnames) == len(set(info.classnames))
    assert set(info.display_names) <= set(info.classnames), "display names for classes that do not exist"
    assert info.template.count("{}") == 1
    assert info.license and info.citation and info.dir
    assert source_kind(info.images_source) in {"gdrive", "url", "generated", "manual"}
    if info.images_md5 is not None:
        assert MD5.match(info.images_md5)
    if info.split_file is None:
        assert info.split_md5 is None and info.split_url is None and info.split_sizes is None
    else:
        assert MD5.match(info.split_md5)
        assert info.split_url.endswith(f"/{info.dir.lower()}.json")
        assert info.split_file == f"{info.dir.lower()}.json"
        assert len(info.split_sizes) == 3


def test_a_row_states_only_what_differs():
    row = DatasetInfo(name="MyRS", classnames=("a", "b"), images_source="manual:x", citation="c",
                      split_file="myrs.json", split_md5="0" * 32)  # fmt: skip
    assert row.dir == "MyRS" and row.num_classes == 2 and row.display_names == {} and row.images_md5 is None
    assert row.template == DEFAULT_TEMPLATE and row.split_url == SPLIT_URL.format("myrs") and row.license
    assert DatasetInfo(name="X", classnames=("a",), images_source="generated", citation="c").split_url is None
    with pytest.raises(ValueError, match="num_classes 3 but 2 classnames"):
        DatasetInfo(name="MyRS", classnames=("a", "b"), images_source="manual:x", citation="c", num_classes=3)


def test_published_split_facts():
    # docs/design.md section 5.1: class counts and train/val/test sizes of the official split files.
    assert CATALOG["PatternNet"].split_sizes == (14896, 6384, 9120)
    assert CATALOG["RSICD"].num_classes == 30 and CATALOG["RESISC45"].num_classes == 45
    assert CATALOG["MLRSNet"].num_classes == 46 and CATALOG["MLRSNet"].split_file is None
    assert CATALOG["PatternNet"].classnames[:3] == ("oil_well", "runway", "baseball_field")  # not alphabetical
    v2 = {CATALOG[n].classnames for n in ("PatternNetv2", "RSICDv2", "RESISC45v2", "MLRSNetv2")}
    assert len(v2) == 1, "the v2 sets share one 16-class list in one label order"


def test_toyrs_painters_match_the_catalogue():
    from datasets import toyrs

    assert tuple(toyrs.PAINTERS) == CATALOG["ToyRS"].classnames


def test_configs_match_catalogue_one_to_one():
    stems = config_files()
    assert set(stems) == {name.lower() for name in CATALOG}
    for name in CATALOG:
        loaded = CfgNode.load_cfg((CONFIG_DIR / f"{name.lower()}.yaml").read_text())
        assert loaded.DATASET.NAME == name


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_yaml_resolves_to_a_generic_dataset(path, tmp_path):
    spec = resolve_dataset(str(path), tmp_path)
    assert spec.name == GENERIC_NAME and spec.info is None
    assert spec.dataset_dir.parent == tmp_path
    assert spec.template.count("{}") == 1
    assert spec.ref == str(path) and str(path) in spec.prepare_command


def test_resolve_by_stem_path_and_name_agree(tmp_path):
    by_stem = resolve_dataset("patternnet", tmp_path)
    by_path = resolve_dataset(str(CONFIG_DIR / "patternnet.yaml"), tmp_path)
    by_name = resolve_dataset("PatternNet", tmp_path)
    for spec in (by_stem, by_path, by_name):
        assert spec.name == "PatternNet"
        assert spec.dataset_dir == tmp_path / "PatternNet"
        assert spec.image_dir == tmp_path / "PatternNet" / "images"
        assert spec.split_path == tmp_path / "PatternNet" / "patternnet.json"
        assert spec.split_md5 == CATALOG["PatternNet"].split_md5
        assert spec.fewshot_dir == tmp_path / "PatternNet" / "split_fewshot"
    assert by_stem.prepare_command == f"python -m tools.prepare_data patternnet --root {tmp_path}"


def test_resolve_generated_split_dataset(tmp_path):
    spec = resolve_dataset("whurs19", tmp_path)
    assert spec.dataset_dir == tmp_path / "WHU-RS19"
    assert spec.split_path is None
    assert spec.generated_split_path == tmp_path / "WHU-RS19" / "split_generated.json"
    assert spec.classnames == CATALOG["WHURS19"].classnames


def test_resolve_unknown_dataset_names_the_choices(tmp_path):
    with pytest.raises(DatasetError, match="patternnet") as err:
        resolve_dataset("no_such_set", tmp_path)
    assert "no_such_set" in str(err.value)


def _cfg(**dataset):
    cfg = CfgNode()
    cfg.DATASET = CfgNode()
    cfg.DATASET.NAME = ""
    cfg.DATASET.ROOT = ""
    add_dataset_config(cfg)
    for key, value in dataset.items():
        cfg.DATASET[key] = value
    return cfg


def test_add_dataset_config_adds_defaults_once_and_keeps_values():
    cfg = _cfg(SUBSAMPLE_CLASSES="base")
    add_dataset_config(cfg)
    d = cfg.DATASET
    assert d.SUBSAMPLE_CLASSES == "base"
    assert (d.FOLDER, d.SPLIT_FILE, d.SPLIT_MD5, d.TEMPLATE, d.ALLOW_SPLIT_MISMATCH) == ("", "", "", "", False)
    assert dict(d.CLASSNAME_MAP) == {}


def test_yaml_classname_map_and_template_override_the_catalogue(tmp_path):
    path = tmp_path / "rsicd_custom.yaml"
    path.write_text(
        'DATASET:\n  NAME: "RSICD"\n  TEMPLATE: "an aerial image of {}."\n'
        '  CLASSNAME_MAP:\n    center: "downtown"\n'
    )
    spec = resolve_dataset(str(path), tmp_path)
    assert spec.template == "an aerial image of {}."
    assert spec.display_name("center") == "downtown"
    assert spec.display_name("storagetanks") == "storage tanks"  # catalogue entry kept
    assert spec.display_name("beach") == "beach"


def test_spec_from_cfg_generic_and_errors(tmp_path):
    spec = spec_from_cfg(_cfg(NAME=GENERIC_NAME, ROOT=str(tmp_path), FOLDER="Mine", SPLIT_FILE="my.json"))
    assert spec.image_dir == tmp_path / "Mine" / "images"
    assert spec.split_path == tmp_path / "Mine" / "my.json" and spec.split_md5 is None
    assert spec.template == "a photo of a {}." and spec.classnames is None
    assert "<your dataset yaml>" in spec.prepare_command
    with pytest.raises(DatasetError, match="DATASET.FOLDER"):
        spec_from_cfg(_cfg(NAME=GENERIC_NAME, ROOT=str(tmp_path)))
    with pytest.raises(DatasetError, match="exactly one"):
        spec_from_cfg(_cfg(NAME="ToyRS", ROOT=str(tmp_path), TEMPLATE="no slot"))
    with pytest.raises(DatasetError, match="--root"):
        spec_from_cfg(_cfg(NAME="ToyRS"))
    with pytest.raises(DatasetError, match="Unknown dataset name"):
        spec_from_cfg(_cfg(NAME="Nope", ROOT=str(tmp_path)))


def test_humanize_and_prepare_command():
    assert humanize("oil_well") == "oil well"
    assert humanize("BareLand") == "bare land"
    assert humanize("footballField") == "football field"
    assert humanize("harbor&port") == "harbor&port"
    assert prepare_command("toyrs", "/data") == "python -m tools.prepare_data toyrs --root /data"


def test_pure_modules_do_not_import_dassl():
    code = (
        "import sys; import datasets, datasets.catalog, datasets.splits, datasets.toyrs; "
        "assert 'dassl' not in sys.modules, 'dassl imported'; assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@requires_dassl
def test_dassl_default_config_gains_the_keys_and_merges_the_example(tmp_path):
    from dassl.config import get_cfg_default

    cfg = get_cfg_default()
    add_dataset_config(cfg)
    assert cfg.DATASET.SUBSAMPLE_CLASSES == "all"
    cfg.merge_from_file(str(CONFIG_DIR / "examples" / "my_scenes.yaml"))
    cfg.DATASET.ROOT = str(tmp_path)
    spec = spec_from_cfg(cfg)
    assert spec.display_name("parkinglot") == "parking lot"
    assert Path(spec.dataset_dir) == tmp_path / "MyScenes"
