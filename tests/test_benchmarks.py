"""The benchmark scripts run in their quick modes, so that they cannot rot (their numbers are not asserted here:
machine-dependent timings never are)."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_overhead_quick(tmp_path):
    out = run("overhead.py", "--quick", "--threads", "1", "--json", str(tmp_path / "o.json"), cwd=tmp_path)
    results = json.loads((tmp_path / "o.json").read_text())
    assert {"analytic-ddpm", "analytic-ddim", "sn-ddpm", "npr-ddpm"} <= set(results["steps"])
    assert results["estimate_gamma"]["ratio"] > 0 and "/ forward" in out


def test_quality_vs_steps_quick(tmp_path):
    out_json, plot = tmp_path / "q.json", tmp_path / "q.png"
    run("quality_vs_steps.py", "--quick", "--threads", "1", "--steps", "10", "--num-samples", "32",
        "--methods", "ddpm-small,ddim,analytic-ddpm,sn-ddpm,npr-ddpm", "--nll-images", "8", "--seeds", "0,1",
        "--output", str(out_json), "--plot", str(plot), cwd=tmp_path)
    results = json.loads(out_json.read_text())
    rows = results["rows"]
    assert {r["method"] for r in rows} >= {"data", "ddpm-small", "analytic-ddpm", "sn-ddpm", "npr-ddpm"}
    by_method = {r["method"]: r for r in rows if r["steps"] == 10}
    for row in by_method.values():
        assert set(row["per_seed"]) == {"0", "1"} and row["fid_std"] is not None
        assert row["fid"] == pytest.approx(sum(m["fid"] for m in row["per_seed"].values()) / 2)
    assert by_method["ddim"]["nll_bpd"] is None and by_method["analytic-ddpm"]["nll_bpd"] is not None
    # common random numbers: the paired differences are per seed
    (npr,) = [d for d in results["differences"] if d["method"] == "npr-ddpm" and d["metric"] == "nll_bpd"]
    per_seed = [by_method["npr-ddpm"]["per_seed"][s]["nll_bpd"] - by_method["analytic-ddpm"]["per_seed"][s]["nll_bpd"]
                for s in ("0", "1")]
    assert npr["difference"] == pytest.approx(sum(per_seed) / 2) and npr["seeds"] == 2
    assert plot.stat().st_size > 0


def test_nll_table_and_gamma_throughput_quick(tmp_path):
    assert "Analytic < DDPM beta" in run("nll_table.py", "--quick", "--num-images", "16", cwd=tmp_path)
    run("gamma_throughput.py", "--quick", "--threads", "1", "--repeats", "1", cwd=tmp_path)


def test_heads_quick(tmp_path):
    out = run("heads.py", "--quick", "--output", str(tmp_path / "h.json"), cwd=tmp_path)
    results = json.loads((tmp_path / "h.json").read_text())
    labels = {e["label"] for e in results["summary"]}
    assert labels == {"analytic", "npr-cached", "sn-cached", "npr-plain", "sn-plain", "analytic-noclip",
                      "npr-cached-noclip"}
    by_label = {e["label"]: e for e in results["summary"]}
    assert by_label["npr-cached"]["head_cpu_seconds"] > 0 and by_label["npr-plain"]["plain_steps"] >= 1
    assert "nll_bpd_vs_analytic" in by_label["npr-cached"] and "nll_bpd" not in by_label["npr-cached-noclip"]
    assert results["meta"]["recipe"]["num_draws"] == 200 and "ΔNLL vs Analytic" in out


@pytest.fixture
def gpu_report(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_report")


def test_gpu_report_quick_writes_the_keys_of_the_full_run(tmp_path, gpu_report):
    out = run("gpu_report.py", "--quick", "--threads", "1", "--output", str(tmp_path / "g.json"), cwd=tmp_path)
    report = json.loads((tmp_path / "g.json").read_text())
    assert gpu_report.key_paths(report) == gpu_report.key_paths(gpu_report.empty_report(gpu_report.FULL))
    # the first cell of each section is measured, at the quick sizes; the rest is null with a reason
    cells = report["sampling"]["eager"]["fp32"]["batch_64"]["K_10"]
    assert all(cell["images_per_s"] > 0 and cell["skipped"] is None for cell in cells.values())
    assert cells["ddpm"]["ratio_to_ddpm"] == 1.0
    assert (cells["sn-ddpm"]["batch_size"], cells["sn-ddpm"]["num_inference_steps"]) == (2, 2)
    untimed = report["sampling"]["compiled"]["bf16"]["batch_256"]["K_50"]["sn-ddpm"]
    assert untimed["images_per_s"] is None and "quick mode" in untimed["skipped"]
    assert report["sync_debug"]["analytic-ddpm"]["skipped"].startswith("needs a CUDA device")
    assert report["estimate_gamma"]["fp32"]["ratio"] > 0 and report["estimate_gamma"]["bf16"]["ratio"] is None
    assert report["head_training"]["fp32"]["seconds_per_step"] is not None
    assert report["machine"]["torch"] and report["quick"] and "images/s" in out


def test_gpu_report_records_what_the_budget_or_an_error_skips(gpu_report):
    report = gpu_report.empty_report()
    run = gpu_report.Run(report, gpu_report.QUICK, {}, None, gpu_report.Budget(0.0), strict=False)
    cells = report["sampling"]["eager"]["fp32"]["batch_64"]["K_10"]
    run.attempt(list(cells.values()), 1.0, lambda: pytest.fail("the budget should refuse"))
    assert cells["ddpm"]["images_per_s"] is None and cells["ddpm"]["skipped"].startswith("time budget")
    run.budget = gpu_report.Budget(60.0)
    item = report["estimate_gamma"]["fp16"]

    def fails():
        item["ratio"] = 2.0
        raise RuntimeError("CUDA out of memory")

    run.attempt([item], 1.0, fails)
    assert item["ratio"] is None and item["skipped"] == "error: RuntimeError: CUDA out of memory"


def test_data_free_quick(tmp_path):
    out = run("data_free.py", "--quick", "--output", str(tmp_path / "d.json"), cwd=tmp_path)
    results = json.loads((tmp_path / "d.json").read_text())
    summary = {(e["metric"], e["sampler"]) for e in results["summary"]}
    assert summary == {("fid", "analytic-ddpm"), ("fid", "analytic-ddim"), ("nll_bpd", "analytic-ddpm")}
    assert {r["route"] for r in results["rows"]} == {"table", "batch"} and "batch - table" in out
    assert all(r["cpu_seconds"] > 0 for r in results["rows"])
