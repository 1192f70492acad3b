"""The benchmark tool runs (toy backbone) and both formulations agree; timings are never asserted."""

from __future__ import annotations

import json

import torch
from conftest import assert_close_fp32

from tools import bench


def test_bench_runs_on_toy_backbone_and_formulations_agree(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--backbone", "toy", "--dataset-classes", "patternnet", "--batch", "2", "--repeats", "1",
            "--device", "cpu", "--json", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    trainers = {r["trainer"] for r in data["results"]}
    assert trainers == set(bench.TIMED)
    assert data["classes"] == 38
    for name, diff in data["max_logit_diff"].items():
        assert diff <= 1e-4, name
    for r in data["results"]:
        assert r["train_flops"] > 0 and r["eval_flops"] > 0 and r["train_step_s"] > 0
        assert r["seq_len"] == 77 if r["formulation"] == "reference" else r["seq_len"] < 77
        assert len(r["matmul_samples"]) == 2  # before and after the one timed training step
        assert r["peak_fraction"] > 0 and r["peak_fraction_best"] > 0
    ours = {r["trainer"]: r for r in data["results"] if r["formulation"] == "ours"}
    assert all(0 < r["eval_cached_s"] for r in ours.values())  # every timed model's image encoder is frozen
    ref = {r["trainer"]: r for r in data["results"] if r["formulation"] == "reference"}
    for name in ("BiMoRS", "CoCoOp", "APPLeNet"):  # exact work saved: fewer FLOPs, whatever the timing noise
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
        assert_close_fp32(fast, ref, what=name)


def test_cpu_attention_flops_are_counted():
    """torch's counter registers only the CUDA attention kernels; the CPU kernel must count the same FLOPs."""
    b, h, lq, lk, d = 2, 3, 7, 11, 8
    q = torch.randn(b, h, lq, d, requires_grad=True)
    k, v = torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
    forward = 2 * (2 * b * h * lq * lk * d)  # QK^T and PV
    assert bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == forward

    def fwd_bwd():
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    # flash backward: scores recomputed (QK^T), dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: five products
    assert bench.count_flops(fwd_bwd) == forward + 5 * forward // 2


def test_matmul_probe_samples_the_best_size():
    probe = bench.MatmulProbe(torch.device("cpu"), torch.float32, sizes=(32, 64), repeats=2, sample_s=0.01)
    assert probe.size in (32, 64) and probe.burst >= 1 and probe.samples == [] and probe.scan_best > 0
    rate = probe.sample()
    assert rate > 0 and probe.samples == [rate]


def test_every_case_has_the_training_loss_of_its_formulation():
    """The training loss of both formulations agrees for every case (what the matrix cost report counts)."""
    torch.manual_seed(0)
    names = bench.bench_classnames("6")
    labels = torch.tensor([0, 5])
    for name, make in bench.CASES.items():
        case = make(bench.build_random_clip("toy"), names)
        images = torch.randn(2, 3, 224, 224)
        extras = case.extras(2)
        ours, ref = (case.training_loss(images, labels, f, **extras) for f in ("ours", "reference"))
        assert_close_fp32(ours, ref, what=name)
