"""The benchmark tool runs (toy backbone) and both formulations agree; timings are never asserted."""

from __future__ import annotations

import json

import torch

from tools import bench


def test_bench_runs_on_toy_backbone_and_formulations_agree(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--backbone", "toy", "--dataset-classes", "patternnet", "--batch", "2", "--repeats", "1",
            "--device", "cpu", "--json", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    trainers = {r["trainer"] for r in data["results"]}
    assert trainers == set(bench.CASES)
    assert data["classes"] == 38
    for name, diff in data["max_logit_diff"].items():
        assert diff <= 1e-4, name
    for r in data["results"]:
        assert r["train_flops"] > 0 and r["eval_flops"] > 0 and r["train_step_s"] > 0
        assert r["seq_len"] == 77 if r["formulation"] == "reference" else r["seq_len"] < 77
    ours = {r["trainer"]: r for r in data["results"] if r["formulation"] == "ours"}
    ref = {r["trainer"]: r for r in data["results"] if r["formulation"] == "reference"}
    for name in ("BiMoRS", "CoCoOp"):  # exact work saved: fewer FLOPs, whatever the timing noise
        assert ours[name]["train_flops"] < ref[name]["train_flops"]
    table = capsys.readouterr().out
    assert "| BiMoRS | ours |" in table and "speed-up" in table


def test_reference_matches_model_for_each_case():
    torch.manual_seed(0)
    names = bench.bench_classnames("6")
    for name, make in bench.CASES.items():
        case = make(bench.build_random_clip("toy"), names)
        images = torch.randn(2, 3, 224, 224)
        extras = case.extras(2)
        with torch.no_grad():
            fast, ref = case.model(images, **extras), case.reference(images, **extras)
        assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-4), name
