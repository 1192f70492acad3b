"""Tests of tools.results on synthetic run folders with known accuracies."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from scipy import stats as scipy_stats

from tools import results as R

CFG = "vit_b16_ep50_ctxv1"
CFG2 = "vit_b16_ep50_ctxv2"

# CoOp (CFG) on PatternNet and RSICD, seeds 1-3: base and new accuracies.
COOP = {
    ("PatternNet", "base"): {1: 90.0, 2: 92.0, 3: 94.0},
    ("PatternNet", "new"): {1: 60.0, 2: 63.0, 3: 66.0},
    ("RSICD", "base"): {1: 80.0, 2: 81.0, 3: 85.0},
    ("RSICD", "new"): {1: 50.0, 2: 55.0, 3: 57.0},
}
# CoOp (CFG2), seed 3 missing.
COOP2 = {("PatternNet", "base"): {1: 88.0, 2: 89.0}, ("PatternNet", "new"): {1: 70.0, 2: 71.0}}
# MaPLe from upstream code: only Dassl logs, PatternNet, seeds 1-3.
MAPLE_LOG = {("patternnet", "base"): {1: 95.1, 2: 94.9, 3: 95.3}, ("patternnet", "new"): {1: 66.2, 2: 65.8, 3: 67.0}}

PHASE = {"base": "train_base", "new": "test_new"}


def write_run(root: Path, rel: str, **fields) -> Path:
    """A run folder with a results.json in our schema (docs/design.md section 3)."""
    data = {
        "trainer": "CoOp", "dataset": "PatternNet", "protocol": "base2new", "split": "test",
        "subsample": "all", "shots": 16, "seed": 1, "backbone": "ViT-B/16", "config": CFG, "epoch": 50,
        "accuracy": 50.0, "macro_f1": 49.0, "n_test": 100, "seconds": 1.0, "git_sha": None,
    }
    data.update(fields)
    run_dir = root / rel
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(data))
    (run_dir / "log.txt").write_text("our log\n")
    return run_dir


def dassl_result(acc: float, f1: float, split: str = "test") -> str:
    return (
        f"Evaluate on the *{split}* set\n=> result\n* total: 1,000\n* correct: {int(acc * 10)}\n"
        f"* accuracy: {acc:.1f}%\n* error: {100 - acc:.1f}%\n* macro_f1: {f1:.1f}%\n"
    )


def write_log_run(root: Path, rel: str, acc: float, f1: float = 1.0) -> Path:
    """A run of upstream CoOp-family code: Dassl log only (training val results, then test)."""
    run_dir = root / rel
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "Loading trainer\nepoch [1/5] loss 1.0\n" + dassl_result(12.3, 11.1, "val") + dassl_result(acc, f1)
    (run_dir / "log.txt").write_text(text)
    return run_dir


def b2n_rel(dataset: str, sub: str, trainer: str, cfg: str, seed: int, shots: int = 16) -> str:
    return f"base2new/{PHASE[sub]}/{dataset.lower()}/shots_{shots}/{trainer}/{cfg}/seed{seed}"


@pytest.fixture
def b2n_root(tmp_path: Path) -> Path:
    root = tmp_path / "output"
    for table, trainer, cfg in ((COOP, "CoOp", CFG), (COOP2, "CoOp", CFG2)):
        for (dataset, sub), accs in table.items():
            for seed, acc in accs.items():
                write_run(root, b2n_rel(dataset, sub, trainer, cfg, seed), trainer=trainer, config=cfg,
                          dataset=dataset, subsample=sub, seed=seed, accuracy=acc)
    for (dataset, sub), accs in MAPLE_LOG.items():
        for seed, acc in accs.items():
            write_log_run(root, b2n_rel(dataset, sub, "MaPLe", "vit_b16_c2_ep5", seed), acc)
    return root


def b2n_table(root: Path, published: bool = False) -> R.Table:
    found = R.collect_runs([root])
    tables = R.build_tables(R.aggregate(found.runs), "base2new", R.load_published() if published else None)
    assert len(tables) == 1
    return tables[0]


def row(table: R.Table, prefix: str, kind: str = "ours") -> R.Row:
    rows = [r for r in table.rows if r.label.startswith(prefix) and r.kind == kind]
    assert len(rows) == 1, [r.label for r in table.rows]
    return rows[0]


def mean(xs) -> float:
    return sum(xs) / len(xs)


def sd(xs) -> float:
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def hm(b: float, n: float) -> float:
    return 2 * b * n / (b + n)


# ------------------------------------------------------------------------------------------- stats
def test_summarize_mean_std_ci():
    s = R.summarize([90.0, 92.0, 94.0])
    assert s.mean == pytest.approx(92.0) and s.std == pytest.approx(2.0) and s.n == 3
    assert s.ci95 == pytest.approx(scipy_stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3))
    assert s.ci95 == pytest.approx(4.9683, abs=1e-4)
    one = R.summarize([70.0])
    assert (one.mean, one.std, one.ci95) == (70.0, None, None)
    with pytest.raises(ValueError):
        R.summarize([])


def test_harmonic_mean():
    assert R.harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert R.harmonic_mean(0.0, 0.0) == 0.0


# ----------------------------------------------------------------------------------------- reading
def test_parse_log_takes_last_test_result_and_ignores_val():
    text = dassl_result(91.0, 90.0) + dassl_result(55.5, 54.4, "val")
    assert R.parse_log(text) == (91.0, 90.0)
    assert R.parse_log(dassl_result(91.0, 90.0) + dassl_result(92.5, 91.5)) == (92.5, 91.5)
    # Older CoOp-family logs without a split announcement.
    assert R.parse_log("=> result\n* accuracy: 77.7%\n") == (77.7, None)
    assert R.parse_log("epoch [1/5]\n") is None


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("output/base2new/train_base/patternnet/shots_16/CoOp/vit_b16/seed2",
         dict(protocol="base2new", dataset="patternnet", shots=16, trainer="CoOp", config="vit_b16", seed=2,
              subsample="base", is_eval=False)),
        ("outputs/base2new/test_new/rsicd/shots_16/MaPLe/vit_b16_c2/seed3",
         dict(protocol="base2new", dataset="rsicd", subsample="new", seed=3, trainer="MaPLe")),
        ("out/crossdata/test/rsicd/shots_16/CoOp/vit_b16/seed1",
         dict(protocol="crossdata", dataset="rsicd", is_eval=True, subsample="all")),
        ("out/crossdata/train/patternnet/shots_16/CoOp/vit_b16/seed1",
         dict(protocol="crossdata", dataset="patternnet", is_eval=False)),
        ("outputs/crosstransfer/patternnet/APPLeNet/vit_b16_shots16/seed1",  # APPLeNet training
         dict(protocol="crossdata", dataset="patternnet", trainer="APPLeNet", config="vit_b16", shots=16, is_eval=False)),
        ("outputs/domain_generalization/tests/APPLeNet/vit_b16_shots16/rsicdv2/seed2",  # APPLeNet eval
         dict(protocol="domaingen", dataset="rsicdv2", trainer="APPLeNet", shots=16, is_eval=True, seed=2)),
        ("output/eurosat/CoOp/rn50_ep50_4shots/nctx16_cscFalse_ctpend/seed1",  # CoOp few-shot
         dict(protocol="fewshot", dataset="eurosat", trainer="CoOp", config="rn50_ep50/nctx16_cscFalse_ctpend", shots=4)),
    ],
)
def test_infer_from_path(rel, expected):
    info = R.infer_from_path(Path(rel))
    assert {k: info[k] for k in expected} == expected


@pytest.mark.parametrize("rel", ["output/base2new/CoOp/seed1", "output/patternnet/shots_16/CoOp/cfg/final"])
def test_infer_from_path_rejects_unknown_trees(rel):
    with pytest.raises(ValueError):
        R.infer_from_path(Path(rel))


def test_collect_reads_results_and_upstream_logs(b2n_root, caplog):
    with caplog.at_level(logging.WARNING, logger=R.__name__):
        found = R.collect_runs([b2n_root])
    assert len(found.runs) == 12 + 4 + 6 and not found.skipped
    assert found.n_from_log == 6
    maple = sorted((r for r in found.runs if r.trainer == "MaPLe"), key=lambda r: (r.subsample, r.seed))
    # dataset spelled as elsewhere, test accuracy (not the val one) of the log
    assert {r.dataset for r in maple} == {"PatternNet"}
    assert [r.accuracy for r in maple] == [95.1, 94.9, 95.3, 66.2, 65.8, 67.0]
    assert all(r.from_log and r.config == "vit_b16_c2_ep5" and r.shots == 16 for r in maple)
    inferred = [m for m in caplog.messages if "inferred" in m]
    assert len(inferred) == 6 and "trainer=MaPLe" in inferred[0] and "seed=" in inferred[0]


def test_corrupt_and_partial_results_are_skipped_and_counted(b2n_root, caplog, capsys):
    bad = write_run(b2n_root, b2n_rel("RSICD", "base", "CoOp", "cfg_bad", 1))
    (bad / "results.json").write_text('{"trainer": "CoOp", "accur')
    partial = write_run(b2n_root, b2n_rel("RSICD", "new", "CoOp", "cfg_bad", 1))
    (partial / "results.json").write_text(json.dumps({"trainer": "CoOp", "dataset": "RSICD", "seed": 1}))
    wrong = write_run(b2n_root, b2n_rel("RSICD", "new", "CoOp", "cfg_bad", 2), accuracy=0.9 * 1000)
    with caplog.at_level(logging.INFO, logger=R.__name__):
        found = R.collect_runs([b2n_root])
        assert R.main([str(b2n_root), "--protocol", "base2new"]) == 0
    assert {p.parent for p, _ in found.skipped} == {bad, partial, wrong}
    warnings = " ".join(caplog.messages)
    assert str(bad / "results.json") in warnings and "not valid JSON" in warnings
    assert "missing keys ['accuracy']" in warnings and "not a percentage" in warnings
    assert "3 skipped" in caplog.messages[-1]
    assert "cfg_bad" not in capsys.readouterr().out


def test_empty_folder_exits_1(tmp_path, caplog, capsys):
    with caplog.at_level(logging.ERROR, logger=R.__name__):
        assert R.main([str(tmp_path)]) == 1
    assert "no runs found under" in caplog.text and str(tmp_path) in caplog.text
    assert capsys.readouterr().out == ""
    assert R.main([str(tmp_path / "missing")]) == 1
    assert "is not a folder" in caplog.text


def test_missing_protocol_exits_1(b2n_root, caplog):
    with caplog.at_level(logging.ERROR, logger=R.__name__):
        assert R.main([str(b2n_root), "--protocol", "crossdata"]) == 1
    assert "no crossdata runs" in caplog.text and "base2new" in caplog.text


# -------------------------------------------------------------------------------------- aggregation
def test_groups_seeds_and_incomplete(b2n_root):
    groups = R.aggregate(R.collect_runs([b2n_root]).runs)
    by_key = {(g.method.trainer, g.method.config, g.dataset, g.subsample): g for g in groups}
    coop = by_key[("CoOp", CFG, "PatternNet", "base")]
    assert coop.seeds == (1, 2, 3) and coop.complete
    assert coop.stats.mean == pytest.approx(92.0) and coop.stats.std == pytest.approx(2.0)
    coop2 = by_key[("CoOp", CFG2, "PatternNet", "new")]
    assert coop2.seeds == (1, 2) and coop2.missing == (3,) and not coop2.complete
    assert coop2.stats.mean == pytest.approx(70.5)
    assert R.aggregate(R.collect_runs([b2n_root]).runs, seeds=[1, 2])[0].expected_seeds == (1, 2)


def test_mixed_shots_are_kept_apart(tmp_path):
    root = tmp_path / "out"
    for seed in (1, 2):
        write_run(root, f"fewshot/patternnet/shots_4/CoOp/{CFG}/seed{seed}", protocol="fewshot", shots=4,
                  seed=seed, accuracy=70.0 + seed)
        write_run(root, f"fewshot/patternnet/shots_16/CoOp/{CFG}/seed{seed}", protocol="fewshot", shots=16,
                  seed=seed, accuracy=90.0 + seed)
    groups = R.aggregate(R.collect_runs([root]).runs)
    assert sorted((g.method.shots, g.stats.mean) for g in groups) == [(4, 71.5), (16, 91.5)]
    (table,) = R.build_tables(groups)
    labels = [r.label for r in table.rows]
    assert labels == [f"CoOp ({CFG}, 4 shots)", f"CoOp ({CFG}, 16 shots)"]
    assert [r.cells[R.Column("PatternNet")].mean for r in table.rows] == [71.5, 91.5]


def test_duplicate_seed_kept_once_and_labelled_trees_compared(tmp_path, caplog):
    ours, upstream = tmp_path / "ours", tmp_path / "upstream"
    for seed in (1, 2):
        write_run(ours, b2n_rel("PatternNet", "base", "CoOp", CFG, seed), subsample="base", seed=seed, accuracy=90.0)
        write_log_run(upstream, b2n_rel("PatternNet", "base", "CoOp", CFG, seed), acc=80.0)
    write_run(tmp_path / "copy", b2n_rel("PatternNet", "base", "CoOp", CFG, 1), subsample="base", accuracy=10.0)
    with caplog.at_level(logging.WARNING, logger=R.__name__):
        groups = R.aggregate(R.collect_runs([ours, tmp_path / "copy"]).runs)
    assert len(groups) == 1 and groups[0].values == {1: 90.0, 2: 90.0}
    assert "found twice" in caplog.text
    found = R.collect_runs([ours, upstream], ["ours", "upstream"])
    (table,) = R.build_tables(R.aggregate(found.runs), "base2new")
    assert {r.label.split("[")[-1]: r.cells[R.Column("PatternNet", "Base")].mean for r in table.rows} == {
        "ours]": 90.0, "upstream]": 80.0,
    }
    # unlabelled: the log-only rows (backbone unknown) still stay apart, and their labels say so
    (table,) = R.build_tables(R.aggregate(R.collect_runs([ours, upstream]).runs), "base2new")
    assert sorted(r.label for r in table.rows) == [f"CoOp ({CFG}, ViT-B/16)", f"CoOp ({CFG}, backbone ?)"]
    assert R.parse_tree_arg("ours=/x/y") == ("ours", Path("/x/y"))
    assert R.parse_tree_arg(str(ours)) == ("", ours)


# -------------------------------------------------------------------------------------------- tables
def test_base2new_table_exact(b2n_root):
    table = b2n_table(b2n_root)
    col = R.Column
    coop = row(table, f"CoOp ({CFG})")
    for dataset in ("PatternNet", "RSICD"):
        base, new = COOP[(dataset, "base")], COOP[(dataset, "new")]
        b, n = list(base.values()), list(new.values())
        cell = coop.cells[col(dataset, "Base")]
        assert (cell.mean, cell.std, cell.seeds, cell.incomplete) == (
            pytest.approx(mean(b)), pytest.approx(sd(b)), (1, 2, 3), False)
        assert cell.ci95 == pytest.approx(scipy_stats.t.ppf(0.975, 2) * sd(b) / math.sqrt(3))
        assert coop.cells[col(dataset, "New")].std == pytest.approx(sd(n))
        assert coop.cells[col(dataset, "HM")].mean == pytest.approx(hm(mean(b), mean(n)))
        per_seed = [hm(base[s], new[s]) for s in (1, 2, 3)]
        mhm = coop.cells[col(dataset, "mHM")]
        assert (mhm.mean, mhm.std) == (pytest.approx(mean(per_seed)), pytest.approx(sd(per_seed)))
        assert mhm.mean != pytest.approx(coop.cells[col(dataset, "HM")].mean)
    avg_b = mean([mean(COOP[(d, "base")].values()) for d in ("PatternNet", "RSICD")])
    avg_n = mean([mean(COOP[(d, "new")].values()) for d in ("PatternNet", "RSICD")])
    assert coop.cells[col("Average", "Base")].mean == pytest.approx(avg_b)
    assert coop.cells[col("Average", "New")].mean == pytest.approx(avg_n)
    assert coop.cells[col("Average", "HM")].mean == pytest.approx(hm(avg_b, avg_n))
    assert not coop.cells[col("Average", "HM")].incomplete

    # the log-only upstream run is a row of its own, averaged over its seeds
    maple = row(table, "MaPLe")
    assert maple.cells[col("PatternNet", "Base")].mean == pytest.approx(mean([95.1, 94.9, 95.3]))
    assert maple.cells[col("PatternNet", "New")].mean == pytest.approx(mean([66.2, 65.8, 67.0]))
    # only one of two datasets: its average is flagged
    assert maple.cells[col("Average", "Base")].incomplete


def test_two_configs_and_incomplete_group_flagged(b2n_root):
    table = b2n_table(b2n_root)
    coop2 = row(table, f"CoOp ({CFG2}")
    assert coop2.cells[R.Column("PatternNet", "Base")].mean == pytest.approx(88.5)
    assert coop2.cells[R.Column("PatternNet", "Base")].incomplete
    assert coop2.cells[R.Column("PatternNet", "HM")].incomplete
    assert coop2.cells[R.Column("PatternNet", "HM")].mean == pytest.approx(hm(88.5, 70.5))
    assert coop2.cells[R.Column("PatternNet", "mHM")].seeds == (1, 2)
    assert not row(table, f"CoOp ({CFG})").cells[R.Column("PatternNet", "Base")].incomplete
    text = R.render([table], "md")
    line = next(x for x in text.splitlines() if x.startswith(f"| CoOp ({CFG2}"))
    assert "88.50 ± 0.71†" in line
    assert f"† CoOp ({CFG2}) on PatternNet (base): seeds 1 2 of 1 2 3 (missing 3)" in text


def test_published_rows_and_differences(b2n_root):
    table = b2n_table(b2n_root, published=True)
    pub = row(table, "CoOp (published)", "published")
    assert pub.cells[R.Column("PatternNet", "Base")].mean == 91.62
    assert pub.cells[R.Column("RSICD", "HM")].mean == pytest.approx(hm(92.52, 56.08))
    avg_b, avg_n = (91.62 + 92.52) / 2, (62.23 + 56.08) / 2
    assert pub.cells[R.Column("Average", "HM")].mean == pytest.approx(hm(avg_b, avg_n))
    assert R.Column("MLRSNet", "Base") not in table.columns  # only datasets we ran
    diff = row(table, f"Δ CoOp ({CFG})", "diff")
    assert diff.cells[R.Column("PatternNet", "Base")].mean == pytest.approx(92.0 - 91.62)
    assert diff.cells[R.Column("PatternNet", "New")].mean == pytest.approx(63.0 - 62.23)
    maple_pub = row(table, "MaPLe (published)", "published")
    maple_diff = row(table, "Δ MaPLe", "diff")  # log-only run: backbone unknown, compared
    assert maple_diff.cells[R.Column("PatternNet", "Base")].mean == pytest.approx(
        mean([95.1, 94.9, 95.3]) - maple_pub.cells[R.Column("PatternNet", "Base")].mean)
    assert any("Δ = ours − published" in n for n in table.notes)


def test_new_trainers_and_published_only_methods(tmp_path):
    """APPLeNet and CLIP-Adapter runs get a Δ row against their published numbers; ProGrad, StyLIP and C-SAW
    (not run here) appear as published rows only; EuroSAT is a column once a run has it."""
    root = tmp_path / "output"
    accs = {("PatternNet", "base"): 90.0, ("PatternNet", "new"): 60.0, ("EuroSAT", "base"): 80.0, ("EuroSAT", "new"): 50.0}
    for trainer, cfg in (("APPLeNet", "vit_b16_c4"), ("CLIP_Adapter", "vit_b16")):
        for (dataset, sub), acc in accs.items():
            for seed in (1, 2, 3):
                write_run(root, b2n_rel(dataset, sub, trainer, cfg, seed), trainer=trainer, config=cfg,
                          dataset=dataset, subsample=sub, seed=seed, accuracy=acc)
    table = b2n_table(root, published=True)
    assert [c.group for c in table.columns if c.metric == "Base"] == ["PatternNet", "EuroSAT", "Average"]
    for trainer, name in (("APPLeNet", "APPLeNet"), ("CLIP_Adapter", "CLIP-Adapter")):
        pub = R.load_published()["base2new"]["results"][name]
        diff = row(table, f"Δ {trainer}", "diff")
        assert diff.cells[R.Column("EuroSAT", "New")].mean == pytest.approx(50.0 - pub["EuroSAT"]["new"])
        assert diff.cells[R.Column("PatternNet", "Base")].mean == pytest.approx(90.0 - pub["PatternNet"]["base"])
    csaw = row(table, "C-SAW (published)", "published")
    assert csaw.cells[R.Column("EuroSAT", "HM")].mean == pytest.approx(hm(95.39, 77.2))  # recomputed, not 85.33
    for name in ("ProGrad", "StyLIP", "C-SAW"):
        row(table, f"{name} (published)", "published")
        assert not [r for r in table.rows if r.kind == "diff" and name in r.label]


def test_published_file_recomputed_hms():
    published = R.load_published()
    assert set(published["methods"].values()) >= {"ZeroshotCLIP", "CoOp", "CoCoOp", "MaPLe"}
    for block in ("base2new", "crossdata", "domaingen"):
        assert published[block]["sources"] and all(s in published["sources"] for s in published[block]["sources"])
    slips = []
    for method, per_dataset in published["base2new"]["results"].items():
        assert list(per_dataset) == published["datasets"][:5]  # the four of both sources, then EuroSAT (C-SAW)
        for dataset, v in per_dataset.items():
            if abs(R.harmonic_mean(v["base"], v["new"]) - v["hm_printed"]) > 0.005:
                slips.append((method, dataset))
                assert "note" in v
    assert slips == [("CoOp", "EuroSAT"), ("MaPLe", "MLRSNet"), ("C-SAW", "EuroSAT")]
    for block in ("crossdata", "domaingen"):  # every row names the source and only datasets of the list
        for per_dataset in published[block]["results"].values():
            assert published[block]["source_dataset"] in per_dataset and set(per_dataset) <= set(published["datasets"])
    # every trainer a published row maps to is registered here; null marks a published-only method
    published_only = {name for name, trainer in published["methods"].items() if trainer is None}
    assert published_only == {"ProGrad", "StyLIP", "C-SAW"}
    assert {"APPLeNet", "CLIP-Adapter"} <= set(published["methods"]) - published_only
    mlrs = published["base2new"]["results"]["MaPLe"]["MLRSNet"]
    assert round(R.harmonic_mean(mlrs["base"], mlrs["new"]), 2) == 64.77


@pytest.mark.parametrize(
    ("protocol", "source", "targets"),
    [("crossdata", "PatternNet", ["RSICD", "RESISC45", "MLRSNet"]),
     ("domaingen", "PatternNetv2", ["RSICDv2", "RESISC45v2", "MLRSNetv2"])],
)
def test_transfer_tables(tmp_path, protocol, source, targets):
    root = tmp_path / "output"
    accs = {source: {1: 85.0, 2: 87.0}, targets[0]: {1: 40.0, 2: 44.0}, targets[1]: {1: 50.0, 2: 52.0},
            targets[2]: {1: 45.0, 2: 47.0}}
    for dataset, per_seed in accs.items():
        phase = "train" if dataset == source else "test"
        for seed, acc in per_seed.items():
            extra = {} if dataset == source else {"source_dataset": source}
            write_run(root, f"{protocol}/{phase}/{dataset.lower()}/shots_16/CoOp/{CFG}/seed{seed}",
                      protocol=protocol, dataset=dataset, seed=seed, accuracy=acc, **extra)
            # the same protocol run by upstream code, in APPLeNet's tree (eval source inferred)
            upstream = tmp_path / "applenet" / ("crosstransfer" if protocol == "crossdata" else "domain_generalization")
            rel = (f"{dataset.lower()}/APPLeNet/vit_b16_shots16/seed{seed}" if dataset == source
                   else f"tests/APPLeNet/vit_b16_shots16/{dataset.lower()}/seed{seed}")
            write_log_run(upstream, rel, acc - 1.0)
    found = R.collect_runs([root, tmp_path / "applenet"])
    assert not found.skipped
    (table,) = R.build_tables(R.aggregate(found.runs), protocol, R.load_published())
    assert [c.title for c in table.columns] == [f"{source} (source)"] + targets + ["Target avg"]
    coop = row(table, "CoOp")
    assert coop.cells[R.Column(source, "(source)")].mean == pytest.approx(86.0)
    assert coop.cells[R.Column(source, "(source)")].std == pytest.approx(math.sqrt(2.0))
    assert coop.cells[R.Column(targets[0])].mean == pytest.approx(42.0)
    assert coop.cells[R.Column("Target avg")].mean == pytest.approx((42.0 + 51.0 + 46.0) / 3)
    applenet = row(table, "APPLeNet")
    assert applenet.cells[R.Column("Target avg")].mean == pytest.approx((41.0 + 50.0 + 45.0) / 3)
    pub = published_row = row(table, "CoOp (published)", "published")
    values = R.load_published()[protocol]["results"]["CoOp"]
    assert published_row.cells[R.Column("Target avg")].mean == pytest.approx(mean([values[t] for t in targets]))
    diff = row(table, "Δ CoOp", "diff")
    assert diff.cells[R.Column(source, "(source)")].mean == pytest.approx(86.0 - pub.cells[R.Column(source, "(source)")].mean)


def test_eval_log_run_without_training_run_is_skipped(tmp_path):
    write_log_run(tmp_path / "crosstransfer", "tests/APPLeNet/vit_b16_shots16/rsicd/seed1", 40.0)
    found = R.collect_runs([tmp_path])
    assert not found.runs and "cannot tell which dataset trained" in found.skipped[0][1]


# ---------------------------------------------------------------------------------------- rendering
def test_csv_parses_back_to_the_same_numbers(b2n_root):
    table = b2n_table(b2n_root, published=True)
    rows = list(csv.DictReader(io.StringIO(R.render([table], "csv"))))
    assert len(rows) == len(table.rows)
    for parsed, original in zip(rows, table.rows):
        assert (parsed["Method"], parsed["Kind"]) == (original.label, original.kind)
        for column in table.columns:
            cell = original.cells.get(column)
            if cell is None:
                assert parsed[column.title] == ""
                continue
            assert float(parsed[column.title]) == pytest.approx(cell.mean, abs=5e-5)
            if cell.std is not None:
                assert float(parsed[f"{column.title} std"]) == pytest.approx(cell.std, abs=5e-5)
                assert float(parsed[f"{column.title} ci95"]) == pytest.approx(cell.ci95, abs=5e-5)
            assert parsed[f"{column.title} seeds"] == " ".join(map(str, cell.seeds))
            assert parsed[f"{column.title} incomplete"] == str(int(cell.incomplete))


def test_latex_booktabs_parses_back(b2n_root):
    table = b2n_table(b2n_root, published=True)
    text = R.render([table], "latex")
    for command in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\cmidrule(lr){2-5}"):
        assert command in text
    assert r"\multicolumn{4}{c}{PatternNet}" in text and r"CoOp (vit\_b16\_ep50\_ctxv1)" in text
    body = [line for line in text.splitlines() if line.endswith(r"\\") and not line.startswith((" &", "Method"))]
    assert len(body) == len(table.rows)
    for line, original in zip(body, table.rows):
        fields = [f.strip() for f in line[: -len(r"\\")].split(" & ")]
        assert len(fields) == 1 + len(table.columns)
        for text_cell, column in zip(fields[1:], table.columns):
            cell = original.cells.get(column)
            if cell is None:
                assert text_cell == "--"
                continue
            numbers = [float(x) for x in re.findall(r"[+-]?\d+\.\d+", text_cell)]
            assert numbers[0] == pytest.approx(cell.mean, abs=0.005)
            if cell.std is not None:
                assert numbers[1] == pytest.approx(cell.std, abs=0.005)
            assert (r"$^\dagger$" in text_cell) == cell.incomplete


def test_markdown_table_shape(b2n_root):
    text = R.render([b2n_table(b2n_root)], "md")
    lines = [x for x in text.splitlines() if x.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    assert header[:5] == ["Method", "PatternNet Base", "PatternNet New", "PatternNet HM", "PatternNet mHM"]
    assert header[-3:] == ["Average Base", "Average New", "Average HM"]
    assert all(len(x.strip("|").split("|")) == len(header) for x in lines)
    coop = next(x for x in lines if x.startswith(f"| CoOp ({CFG})"))
    assert "| 92.00 ± 2.00 | 63.00 ± 3.00 | " + f"{hm(92, 63):.2f} |" in coop
    with pytest.raises(ValueError):
        R.render([], "html")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_png_of_expected_size(b2n_root, tmp_path):
    table = b2n_table(b2n_root, published=True)
    out = R.plot([table], tmp_path / "plots" / "b2n.png")
    dpi, (w, h) = R.PLOT_DPI, R.PLOT_PANEL_INCHES
    width, height = png_size(out)
    assert (width, height) == R.plot_size([table])
    assert width == round(3 * w * dpi)  # three panels (Base, New, HM), the legend under them
    assert height > h * dpi  # the panels, plus the heading and the legend


def test_main_writes_formats_and_plot(b2n_root, tmp_path, capsys):
    assert R.main([str(b2n_root), "--protocol", "base2new"]) == 0
    out = capsys.readouterr().out
    assert "### base2new" in out and "| PatternNet Base |" in out and "92.00 ± 2.00" in out
    csv_file, png = tmp_path / "t.csv", tmp_path / "t.png"
    assert R.main([str(b2n_root), "--format", "csv", "-o", str(csv_file), "--plot", str(png), "--published"]) == 0
    assert capsys.readouterr().out == ""
    assert any(r["Kind"] == "published" for r in csv.DictReader(csv_file.open()))
    groups = R.aggregate(R.collect_runs([b2n_root]).runs)
    assert png_size(png) == R.plot_size(R.build_tables(groups, published=R.load_published()))


def test_module_entry_point_as_called_by_protocol_scripts(b2n_root):
    proc = subprocess.run(
        [sys.executable, "-m", "tools.results", str(b2n_root), "--protocol", "base2new"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| Method | PatternNet Base |" in proc.stdout and "summary: 22 runs" in proc.stderr
