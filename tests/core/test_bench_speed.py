"""The speed benchmark runs end to end in its quick mode (tiny shapes): every implementation
and every part of the report is produced. No timing is asserted: times belong to the
machine, and experiments/bench_speed.py is where they are measured."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SCRIPT = ROOT / "experiments" / "bench_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_speed"] = module
    spec.loader.exec_module(module)
    return module


def test_quick_mode_reports_every_part(bench, tmp_path: Path, capsys: pytest.CaptureFixture):
    out, figure = tmp_path / "speed.json", tmp_path / "speed.png"
    results = bench.main(["--quick", "--threads", "1", "2", "--json", str(out),
                          "--plot", str(figure)])
    assert json.loads(out.read_text()) == results
    # batch 16 at 1 and 2 threads, then batch 8 at 2 threads: every net each time
    assert [(r["net"], r["batch"], r["threads"]) for r in results["nets"]] == [
        (net, b, t) for b, t in ((16, 1), (16, 2), (8, 2)) for net in bench.QUICK_NETS]
    for row in results["nets"]:
        for key in ("floor_s_per_epoch", "floor+memory_s_per_epoch", "mlp-lab_s_per_epoch",
                    "mlp_lab_over_floor", "mlp_lab_over_floor_memory"):
            assert math.isfinite(row[key]) and row[key] > 0
        assert row["floor+memory_s_per_epoch"] > row["floor_s_per_epoch"]
        assert row["params"] == bench.n_params(bench.QUICK_NETS[row["net"]])
    assert bench.n_params((48, (32, 32), 10)) == 48 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    assert set(results["machine"]["bandwidth_gb_s"]) == {"1", "2"}  # thread counts
    assert all(v > 0 for v in results["machine"]["bandwidth_gb_s"].values())
    assert set(results["data"]) == {"gather+normalize_s_per_epoch",
                                    "gather+crop+flip+normalize_s_per_epoch"}
    assert results["memory"]["peak_rss_mib"] > results["memory"]["data_mib"] >= 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "lab/floor" in printed and "lab/+mem" in printed and "peak memory" in printed
    assert "batch sizes, 2 thread(s)" in printed


def test_the_measured_step_is_the_trainers(bench):
    # the timed step is `mlp.train.step` on the benchmark's model: it trains
    import numpy as np

    from mlp.training import trainer as train

    step = bench.mlp_lab_step((12, (8,), 3), batch=4)
    assert step.func is train.step
    model = step.args[0]
    before = model.params["W1"].copy()
    step()
    assert not np.array_equal(before, model.params["W1"])
