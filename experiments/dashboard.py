"""See the MLflow dashboard as a reviewer does: a small sweep, the UI, headless screenshots.

    python experiments/dashboard.py [--archive cifar-10-python.tar.gz] [--out docs/dashboard]

Trains a 2 x 2 sweep (learning rate x L2 strength) into a temporary SQLite store (on
CIFAR-10 with --archive, 5,000 images; else on the synthetic set), starts the MLflow UI on
127.0.0.1, and takes screenshots with headless Chromium (Debian's `chromium`, driven by
Playwright): the experiment's runs table, one child run's
overview and its model metrics, the sweep parent, the compare view of the children and
the registered model (Playwright drives the system Chromium; no browser download).
Then it checks in the rendered pages what a reviewer must see
first: the learning curves (acc/, loss/) before the gradient check and the health charts,
and gradient-check errors that are not zero. Exit 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
EXPERIMENT = "dashboard-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_sweep(work: Path, archive: str | None) -> None:
    """A 2 x 2 sweep into work/mlflow.db (children in parallel would race on 2 cores: the
    basic launcher runs them one after the other)."""
    data = ([f"data.archive={archive}", "data.limit=5000", "data.val_size=1000",
             "trainer.train_eval_size=1000", "trainer.epochs=6"] if archive
            else ["data=synthetic", "trainer.epochs=4", "trainer.batch_size=50"])
    env = dict(os.environ, MLP_LAB_DATA=str(work / "data"), MLFLOW_DISABLE_TELEMETRY="true")
    subprocess.run([str(BIN / "mlp-train"), "-m", *data, "optim.lr=3e-3,1e-2",
                    "model.reg=1e-4,1e-2", f"tracking.experiment={EXPERIMENT}",
                    "trainer.progress=false"], cwd=work, env=env, check=True, timeout=1800)


def start_ui(work: Path, port: int) -> subprocess.Popen:
    """`mlflow server` (what `mlflow ui` runs) on 127.0.0.1, lean: one worker, no job runner."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_DISABLE_TELEMETRY="true")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(1)
    server.kill()
    raise RuntimeError("the MLflow UI did not answer /health within 180 s")


def _chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise RuntimeError("no chromium on PATH: apt-get install -y chromium")
    return browser


COLUMNS = ("acc/best_val", "acc/test", "acc/gap", "loss/val", "rel_error/max", "optim.lr",
           "model.reg", "gradcheck.passed")  # what a reviewer adds once (Columns)


def shoot(pages: dict[str, str], out: Path) -> dict[str, str]:
    """Open each page in headless Chromium as a reviewer would (the assistant panel closed,
    the runs table with the key columns), save a full-page PNG and return the page's text."""
    from playwright.sync_api import sync_playwright

    texts = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        for i, (name, url) in enumerate(pages.items()):
            page.goto(url)
            page.wait_for_timeout(6000)
            if i == 0:
                close = page.get_by_role("button", name="Close")
                if close.count():
                    close.first.click()
                page.get_by_role("button", name="Columns").click()
                for column in COLUMNS:
                    page.get_by_text(column, exact=True).first.click()
                page.keyboard.press("Escape")
            page.wait_for_timeout(4000)
            page.screenshot(path=out / f"{name}.png")
            texts[name] = page.locator("body").inner_text()
            print(f"{out / name}.png  <-  {url}")
        browser.close()
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", help="a cifar-10-python.tar.gz (default: synthetic data)")
    parser.add_argument("--out", default="docs/dashboard", help="where the PNGs go")
    parser.add_argument("--store", help="a directory to keep the sweep in (reused when it "
                        "holds one; default: a temporary directory)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    archive = str(Path(args.archive).resolve()) if args.archive else None
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="mlp-dashboard-") as tmp:
        work = Path(args.store or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "mlflow.db").exists():
            make_sweep(work, archive)
        client = MlflowClient(f"sqlite:///{work}/mlflow.db")
        eid = client.get_experiment_by_name(EXPERIMENT).experiment_id
        runs = client.search_runs([eid], order_by=["metrics.`acc/best_val` DESC"])
        parent = next(r for r in runs if r.data.tags.get("mlp.sweep") == "true")
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        best = children[0]
        registered = parent.data.tags.get("mlp.sweep.registered_model", "").split("@")[0]
        port = free_port()
        server = start_ui(work, port)
        base = f"http://127.0.0.1:{port}/#"
        view = "workflowType=machine_learning"
        pages = {
            "1-runs-table": f"{base}/experiments/{eid}/runs?{view}&orderByKey="
                            "metrics.%60acc%2Fbest_val%60&orderByAsc=false",
            "2-run-overview": f"{base}/experiments/{eid}/runs/{best.info.run_id}?{view}",
            "3-run-metrics": f"{base}/experiments/{eid}/runs/{best.info.run_id}/model-metrics"
                             f"?{view}",
            "4-sweep-parent": f"{base}/experiments/{eid}/runs/{parent.info.run_id}?{view}",
            "5-sweep-parent-artifacts": f"{base}/experiments/{eid}/runs/{parent.info.run_id}"
                                        f"/artifacts/val_acc_heatmap.png?{view}",
            "6-compare-children": f"{base}/compare-runs?runs="
                                  f"{json.dumps([r.info.run_id for r in children])}"
                                  f"&experiments={json.dumps([eid])}&{view}",
            "7-registered-model": f"{base}/models/{registered}?{view}",
        }
        try:
            doms = shoot(pages, out)
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    return check(doms)


def sections(text: str) -> list[str]:
    """The chart sections of a run's metrics page, in page order ("acc (5)" -> "acc")."""
    return [m.group(1) for m in re.finditer(r"^([\w./-]+)\n\((\d+)\)$", text, re.M)]


def check(texts: dict[str, str]) -> int:
    """What a reviewer must see first, checked in the rendered pages' text."""
    order = sections(texts["3-run-metrics"])
    overview = texts["2-run-overview"]
    checks = {
        "learning curves come first on the metrics page (acc, loss, then the rest)":
            order[:2] == ["acc", "loss"] and "rel_error" in order
            and order.index("rel_error") < min(i for i, s in enumerate(order)
                                               if s.startswith("weights")),
        "the gradient-check error shows non-zero (e-1x) on the run overview":
            re.search(r"gradcheck.max_rel_error\W+\d\.\d+e-1\d", overview) is not None,
        "the run's description leads with the test accuracy":
            "Test accuracy" in overview.split("Metrics")[0],
        "the runs table shows acc/test, best run first": "acc/test" in texts["1-runs-table"],
        "the parent has a description naming the best run": "Best:" in texts["4-sweep-parent"],
    }
    for what, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    print(f"sections of the metrics page: {order}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
