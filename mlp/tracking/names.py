"""The names of runs and models: what a run is in a few characters (`relu-h100-lr1e-3`),
numbers as a person writes them (`1e-3`), and a model name MLflow accepts whatever the run
is called. A leaf of the tracking package: sweeps' figures and reports use it too."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


def short_number(x: float) -> str:
    """1e-3 -> '1e-3', 0.0005 -> '5e-4', 0 -> '0', 0.5 -> '0.5'."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.0e}".split("e")
    if float(f"{x:.0e}") == x and not 0.1 <= abs(x) < 1000:
        return f"{mantissa}e{int(exponent)}"
    return f"{x:g}"


def run_name(cfg: Mapping[str, Any]) -> str:
    """A run name that says what the run is, e.g. `relu-h100-lr1e-3-reg1e-4`, with `-bn`
    or `-ln` (a norm), `-drop0.5` (dropout) and the loss when it is not softmax."""
    m, o = cfg["model"], cfg["optim"]
    hidden = "h" + "x".join(str(h) for h in m["hidden_sizes"]) if m["hidden_sizes"] else "linear"
    lr, reg = short_number(o["lr"]), short_number(m["reg"])
    name = f"{m['activation']}-{hidden}-lr{lr}-reg{reg}"
    if m.get("norm") not in (None, "none"):
        name += {"batch": "-bn", "layer": "-ln"}.get(m["norm"], f"-{m['norm']}")
    if m.get("dropout"):
        name += f"-drop{m['dropout']:g}"
    if m["loss"] != "softmax":
        name += f"-{m['loss']}"
    return name


def model_name(name: str) -> str:
    """A model name MLflow accepts whatever the run's name: letters, digits, `-` and `_`
    (MLflow 3.17 refuses `.` among others), each other run of characters becoming one
    `_`: `reg=0.00507361 lr=0.0119698` -> `reg_0_00507361_lr_0_0119698`."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "model"
