"""The benchmark scripts run in their quick modes, so that they cannot rot (their numbers are not asserted here:
machine-dependent timings never are)."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
        "--output", str(out_json), "--plot", str(plot), cwd=tmp_path)
    rows = json.loads(out_json.read_text())
    assert {r["method"] for r in rows} >= {"data", "ddpm-small", "analytic-ddpm", "sn-ddpm", "npr-ddpm"}
    for row in rows:
        assert set(row) == {"method", "steps", "nll_bpd", "fid", "seconds"}
    by_method = {r["method"]: r for r in rows if r["steps"] == 10}
    assert by_method["ddim"]["nll_bpd"] is None and by_method["analytic-ddpm"]["nll_bpd"] is not None
    assert plot.stat().st_size > 0


def test_nll_table_and_gamma_throughput_quick(tmp_path):
    assert "Analytic < DDPM beta" in run("nll_table.py", "--quick", cwd=tmp_path)
    run("gamma_throughput.py", "--quick", "--threads", "1", "--repeats", "1", cwd=tmp_path)


def test_data_free_quick(tmp_path):
    out = run("data_free.py", "--quick", "--output", str(tmp_path / "d.json"), cwd=tmp_path)
    results = json.loads((tmp_path / "d.json").read_text())
    summary = {(e["metric"], e["sampler"]) for e in results["summary"]}
    assert summary == {("fid", "analytic-ddpm"), ("fid", "analytic-ddim"), ("nll_bpd", "analytic-ddpm")}
    assert {r["route"] for r in results["rows"]} == {"table", "batch"} and "batch - table" in out
    assert all(r["cpu_seconds"] > 0 for r in results["rows"])
