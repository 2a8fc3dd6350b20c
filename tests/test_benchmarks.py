"""`make bench` still runs (a smoke test of its code paths; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_bench_quick_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--quick", "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=600,
    )
    records = json.loads(out.read_text())["results"]
    # rows against the real learn2learn exist only where make bench-env built .venv-l2l
    records = [r for r in records if not r["benchmark"].startswith("maml_vs_l2l_")]
    learners = ["protonet", "siamese", "matching", "relation", "relation_networks"]
    steps = [f"{name}_step" for name in learners for _ in range(2)]  # 5w1s and 20w1s each
    maml = ["maml_a", "maml_b", "maml_imaml_memory"]
    threads = ["reptile_step", "reptile_predict", "imaml_step", "imaml_predict"]
    threads.append("imaml_step_kernels")  # the same step with PyTorch's second derivatives
    continual = ["ewc_penalty"] * 3 + ["den_step"] * 2  # --quick: two DEN sizes
    names = ["sampler"] * 2 + ["sampler_84"] + steps + maml + threads + continual
    assert [r["benchmark"] for r in records] == names
    records, continual = records[: -len(continual)], records[-len(continual) :]
    records, threaded = records[: -len(threads)], records[-len(threads) :]
    assert all(r["metarun"] > 0 for r in threaded)
    for r in threaded:  # the same computation: float64 agrees; float32 only to its rounding
        if r["rel_diff_vs_loop_float64"] is None:  # predictions
            assert r["rel_diff_vs_loop"] < 1e-2, r
        else:
            assert r["rel_diff_vs_loop_float64"] < 1e-9, r
    assert all(r["metarun"] > 0 and r["baseline"] > 0 for r in records[:-1] + continual)
    for r in records[-3:-1]:  # the same meta-gradients, whichever way they are computed
        assert max(r["meta_gradient_rel_diff_vs_baseline"].values()) < 1e-4, r
    assert continual[-1]["units"] == [362, 178]  # one expansion of 50 units per layer
    memory = records[-1]
    assert memory["inner_steps"] == [1, 5] and len(memory["maml_mb"]) == 2
