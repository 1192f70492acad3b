"""Published zero-shot rows (one backbone per row) in tools.results: like is compared with like."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from models.weights import BACKBONES
from tools import results as R

PUBLISHED = R.load_published()
BLOCK = PUBLISHED[R.ZEROSHOT_BLOCK]


def write_run(root: Path, rel: str, **fields) -> None:
    data = {"trainer": "ZeroshotCLIP", "dataset": "AID", "protocol": "custom", "split": "test", "subsample": "all",
            "shots": 16, "seed": 1, "backbone": "ViT-B/32", "config": "vit_b32_rs106", "accuracy": 50.0}  # fmt: skip
    data.update(fields)
    (root / rel).mkdir(parents=True)
    (root / rel / "results.json").write_text(json.dumps(data))


def tables_for(root: Path, protocol: str | None = None) -> list[R.Table]:
    groups = R.aggregate(R.collect_runs([root]).runs)
    return R.build_tables(groups, protocol, PUBLISHED)


def rows(table: R.Table) -> dict[str, R.Row]:
    return {r.label: r for r in table.rows}


def test_published_zero_shot_rows_name_real_backbones_datasets_and_the_source():
    assert BLOCK["source"]["url"] == "https://github.com/elkhouryk/RS-TransCLIP"
    for name, entry in BLOCK["results"].items():
        assert entry["backbone"] in BACKBONES, name
        assert BACKBONES[entry["backbone"]].arch.vision_patch_size == 32  # every row is a ViT-B/32
        assert set(entry["accuracy"]) == {"AID", "EuroSAT", "MLRSNet", "OPTIMAL31", "PatternNet", "RESISC45", "WHURS19"}
        assert all(0 < v < 100 for v in entry["accuracy"].values())
    assert BLOCK["results"]["GeoRSCLIP ViT-B/32"]["accuracy"]["PatternNet"] == 75.8  # the numbers
    assert BLOCK["results"]["RemoteCLIP ViT-B/32"]["accuracy"]["AID"] == 91.7


def test_delta_only_for_the_same_trainer_config_and_backbone(tmp_path):
    for seed, acc in ((1, 74.0), (2, 76.0)):  # GeoRSCLIP with the published comparison config
        write_run(tmp_path, f"geo/aid/seed{seed}", seed=seed, backbone="GeoRSCLIP-ViT-B-32", accuracy=acc)
        write_run(tmp_path, f"geo/pn/seed{seed}", seed=seed, backbone="GeoRSCLIP-ViT-B-32", dataset="PatternNet",
                  accuracy=acc + 5)  # fmt: skip
    write_run(tmp_path, "b16/aid/seed1", backbone="ViT-B/16", accuracy=60.0)  # another backbone
    write_run(tmp_path, "b16/aid/seed2", seed=2, backbone="ViT-B/16", accuracy=60.0)
    write_run(tmp_path, "ens/aid/seed1", trainer="ZeroshotCLIPEnsemble", config="vit_b16", accuracy=61.0)
    write_run(tmp_path, "ens/aid/seed2", seed=2, trainer="ZeroshotCLIPEnsemble", config="vit_b16", accuracy=61.0)
    (table,) = tables_for(tmp_path, "custom")
    by_label = rows(table)
    published = {label for label, r in by_label.items() if r.kind == "published"}
    assert published == {f"{name} (published zero-shot)" for name in BLOCK["results"]}
    geo = by_label["GeoRSCLIP ViT-B/32 (published zero-shot)"]
    assert geo.cells[R.Column("AID")].mean == 70.3 and geo.cells[R.Column("PatternNet")].mean == 75.8
    assert math.isclose(geo.cells[R.Column("Average")].mean, (70.3 + 75.8) / 2)
    diffs = {label: r for label, r in by_label.items() if r.kind == "diff"}
    assert len(diffs) == 1  # only our GeoRSCLIP run matches a published row's trainer, config and backbone
    (diff,) = diffs.values()
    assert diff.method.backbone == "GeoRSCLIP-ViT-B-32" and "vs GeoRSCLIP ViT-B/32" in diff.label
    assert math.isclose(diff.cells[R.Column("AID")].mean, 75.0 - 70.3)
    assert math.isclose(diff.cells[R.Column("PatternNet")].mean, 80.0 - 75.8)
    ours = [label for label, r in by_label.items() if r.kind == "ours"]
    assert any("GeoRSCLIP-ViT-B-32" in label for label in ours)  # a non-OpenAI backbone is always named
    assert any("RS-TransCLIP" in note for note in table.notes)


def test_zero_shot_rows_join_a_transfer_table_of_zero_shot_runs(tmp_path):
    """scripts/zsclip/crossdata.sh with SOURCE/TARGETS evaluates all classes: its cells are zero-shot accuracies."""
    for dataset, acc in (("AID", 90.0), ("WHURS19", 94.0), ("EuroSAT", 36.0)):
        write_run(tmp_path, f"x/{dataset}/seed1", protocol="crossdata", dataset=dataset, source_dataset="AID",
                  backbone="RemoteCLIP-ViT-B-32", accuracy=acc)  # fmt: skip
    (table,) = tables_for(tmp_path, "crossdata")
    by_label = rows(table)
    remote = by_label["RemoteCLIP ViT-B/32 (published zero-shot)"]
    assert remote.cells[R.Column("AID", "(source)")].mean == 91.7
    assert math.isclose(remote.cells[R.Column("Target avg")].mean, (95.2 + 35.5) / 2)
    (diff,) = [r for r in table.rows if r.kind == "diff" and "zero-shot" in r.label]
    assert math.isclose(diff.cells[R.Column("WHURS19")].mean, 94.0 - 95.2)


def test_no_zero_shot_rows_without_zero_shot_runs_or_for_base_to_new(tmp_path):
    write_run(tmp_path, "coop/seed1", trainer="CoOp", config="vit_b16", backbone="ViT-B/16")
    write_run(tmp_path, "zs/base/seed1", protocol="base2new", subsample="base")
    write_run(tmp_path, "zs/new/seed1", protocol="base2new", subsample="new")
    for table in tables_for(tmp_path):
        assert not any("zero-shot" in r.label for r in table.rows), table.title


def test_a_published_zero_shot_row_without_its_backbone_is_refused(tmp_path):
    data = json.loads(R.PUBLISHED_FILE.read_text())
    del data[R.ZEROSHOT_BLOCK]["results"]["CLIP ViT-B/32"]["backbone"]
    bad = tmp_path / "published.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(R.ResultsError, match=r"zero-shot row 'CLIP ViT-B/32' .* lacks \['backbone'\]"):
        R.load_published(bad)
