"""The benchmark scripts run end to end (`--smoke`: tiny sizes, numbers meaningless) and write consistent JSON.

What is checked is what the numbers rest on: every `speedup*` ratio equals the ratio of the raw times stored next to
it, the fast paths give the same results as the reference ones (values, solvers), and the machine is recorded.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import ratio, table  # noqa: E402


def test_table_and_ratio():
    out = table([dict(a=1, b=0.5), dict(a=10, b=None)], [("a", "A", "d"), ("b", "B", ".2f")], title="T")
    assert out.splitlines() == ["T", " A     B", "--  ----", " 1  0.50", "10     -"]
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(1.0, 0) is None


def speedups(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k.startswith("speedup"): yield f"{path}.{k}", v
            yield from speedups(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj): yield from speedups(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke",
                        "--out", str(out)], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "smoke-cpu.json").read_text()), r.stdout


def test_smoke_suite_writes_every_suite(smoke):
    res, stdout = smoke
    assert set(res["suites"]) == {"values", "profile", "stats", "e2e", "solvers"}
    assert res["machine"]["usable_cores"] >= 1 and res["machine"]["torch_threads"] >= 1
    assert "Target values" in stdout and "Key statistics" in stdout and "End to end" in stdout
    keys = list(speedups(res))
    assert len(keys) > 20
    bad = [(k, v) for k, v in keys if v is not None and not (math.isfinite(v) and v > 0)]
    assert not bad, bad


def test_smoke_ratios_are_the_ratios_of_the_raw_times(smoke):
    res, _ = smoke
    for r in res["suites"]["values"]["rows"]:
        assert r["speedup_batched_vs_serial"] == pytest.approx(r["serial_seconds"] / r["seconds"], rel=1e-12)
    for c in res["suites"]["stats"]["cases"]:
        assert c["speedup_one_pass_vs_truncated_forward"] == pytest.approx(
            c["seconds_truncated_forward"] / c["seconds_one_pass"], rel=1e-12)
    p = res["suites"]["profile"]
    assert p["speedup_after_vs_before"] == pytest.approx(p["seconds_before"] / p["seconds_after"], rel=1e-12)


def test_smoke_fast_paths_give_the_reference_results(smoke):
    res, _ = smoke
    p = res["suites"]["profile"]                       # suffix path vs full-sequence path, same edits and steps
    assert p["n_steps_equal"] and p["max_rel_err_delta"] < 1e-3
    for r in res["suites"]["solvers"]["rows"]:         # Cholesky routes vs explicit inverses
        assert r["max_rel_diff_emmet_routes_vs_inverse"] < 1e-8 and r["max_rel_diff_memit_routes_vs_inverse"] < 1e-8
    fm = res["suites"]["values"]["flops_model"]        # the suffix path does fewer FLOPs per loss evaluation
    assert fm["batched"]["per_eval"] < fm["serial"]["per_eval"] / 3


@pytest.fixture(scope="module")
def gpu_smoke(tmp_path_factory):
    "`run.py --gpu --smoke`: the scale suites (issue 12) at tiny sizes, on whatever device this machine has."
    out = tmp_path_factory.mktemp("bench-gpu")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--gpu", "--smoke",
                        "--out", str(out)], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (path,) = out.glob("gpu-smoke-*.json")
    return json.loads(path.read_text()), r.stdout


def test_gpu_suite_runs_every_part_and_its_ratios_are_consistent(gpu_smoke):
    res, stdout = gpu_smoke
    assert set(res["suites"]) == {"scale", "quality", "llama7b", "sweep", "solvers"}
    g = res["suites"]["scale"]["values_grid"]
    assert {(r["B"], r["precision"]) for r in g["rows"]} == {(1, "float32"), (8, "float32"), (8, "bfloat16")}
    for r in g["rows"]:
        assert r["speedup_batched_vs_serial"] == pytest.approx(r["reference_seconds_estimate"] / r["seconds"], rel=1e-12)
        assert r["speedup_vs_matmul_limit"] == pytest.approx(r["flops_per_s"] / r["matmul_flops_per_s"], rel=1e-12)
        assert 0 < r["speedup_vs_matmul_limit"] < 1.5
    q = res["suites"]["quality"]["results"]
    assert set(q) == {"float32", "bfloat16"} and q["float32"]["within_float32_intervals"]
    l7 = res["suites"]["llama7b"]["llama7b"]
    assert [r["B"] for r in l7["values"]] == [1, 4] and l7["keys"]["seconds"] > 0 and l7["stats"]["cases"]
    assert set(res["suites"]["sweep"]["methods"]) == {"emmet", "memit"}
    assert "Target values at scale" in stdout and "Llama-2-7B-shaped" in stdout
