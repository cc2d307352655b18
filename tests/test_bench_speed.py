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

SCRIPT = Path(__file__).parents[1] / "experiments" / "bench_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_speed"] = module
    spec.loader.exec_module(module)
    return module


def test_quick_mode_reports_every_part(bench, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "speed.json"
    results = bench.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text()) == results
    assert [row["net"] for row in results["nets"]] == list(bench.QUICK_NETS)
    for row in results["nets"]:
        for key in ("floor_s_per_epoch", "mlp-lab_s_per_epoch", "mlp_lab_over_floor"):
            assert math.isfinite(row[key]) and row[key] > 0
    assert set(results["data"]) == {"gather+normalize_s_per_epoch",
                                    "gather+crop+flip+normalize_s_per_epoch"}
    assert results["memory"]["peak_rss_mib"] > results["memory"]["data_mib"] >= 0
    printed = capsys.readouterr().out
    assert "lab/floor" in printed and "peak memory" in printed


def test_the_measured_step_trains(bench):
    # the closure times the real step: it must change the parameters like training does
    import numpy as np

    step = bench.mlp_lab_step((12, (8,), 3), batch=4)
    model = step.__closure__  # the model is held by the closure; find it by its type
    from mlp.model import MLP

    (model,) = [c.cell_contents for c in model if isinstance(c.cell_contents, MLP)]
    before = model.params["W1"].copy()
    step()
    assert not np.array_equal(before, model.params["W1"])
