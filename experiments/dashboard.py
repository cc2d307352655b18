"""See the MLflow dashboard as a first-time reviewer does: a small sweep, the UI, screenshots
of what each page shows before any scrolling, and checks of that visible region.

    python experiments/dashboard.py [--archive cifar-10-python.tar.gz] [--out docs/dashboard]
                                    [--store DIR] [--port PORT] [--window 1920x960]

Trains a 2 x 2 sweep (learning rate x L2 strength) into a SQLite store (on CIFAR-10 with
--archive, 5,000 images; else on the synthetic set; the data directory is mlp-train's own,
`$MLP_LAB_DATA` when set), starts the MLflow UI on 127.0.0.1:PORT, and opens each page in
a fresh headless Chromium profile (Debian's `chromium`, driven by Playwright; no browser
download), as a first visit: nothing dismissed, MLflow's Assistant panel open where it
opens by itself (a UI at 127.0.0.1). It saves what the window shows (1920 x 960, a browser
maximized on a full-HD screen; --window) as docs/dashboard/*.png, and checks in that
window, with the elements' boxes (inside the window, and what is drawn at their points is
them, not a panel over them nor the Overview's "Show more" fold clipping them):

- the sweep parent's Overview: its glance (the description, `mlp.tracking.glance`) whole on
  the first screen: the small figure and the best children's rows, nothing folded under
  "Show more" nor faded;
- the best child's Overview: its glance whole: the train vs validation figure, and the test
  accuracy the store holds (`acc/test`, as the description writes it);
- the gradient check: its error is not zero in the store, and the child's first screen and
  its tags show it at that value;
- the child's Model metrics: the learning curves' sections first (acc, loss).

The runs table is shot with the columns a reviewer adds once (printed; the only clicks).
Exit 0 when every check holds, 1 otherwise, each failed check printed with why.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
EXPERIMENT = "dashboard-demo"
# A browser maximized on a 1920 x 1080 screen. In a window narrower than ~1,660 px with the
# Assistant panel open, MLflow 3.17 stacks a run's Overview in one column, its description
# last, below the fold (--window 1500x1000 shows it).
WINDOW = "1920x960"
SETTLE_MS = 8000  # after loading, until charts and images are drawn (grey placeholders before)
COLUMNS = ("acc/best_val", "acc/test", "acc/gap", "loss/val", "rel_error/max", "optim.lr",
           "model.reg", "gradcheck.passed")  # what a reviewer adds once (Columns)

# Where an element is drawn: its box against the window, and whether what the page draws
# at its centre and near its corners is the element (not a panel over it, nor the fold of
# a long description clipping it). Images: whether they loaded.
BOX_JS = """el => {
  const r = el.getBoundingClientRect(), vw = window.innerWidth, vh = window.innerHeight;
  const inset = Math.min(3, r.width / 4, r.height / 4);
  const points = [[r.left + r.width / 2, r.top + r.height / 2],
                  [r.left + inset, r.top + inset], [r.right - inset, r.top + inset],
                  [r.left + inset, r.bottom - inset], [r.right - inset, r.bottom - inset]];
  let over = null;
  for (const [x, y] of points) {
    if (x < 0 || y < 0 || x >= vw || y >= vh) continue;
    const hit = document.elementFromPoint(x, y);
    if (!hit || !(hit === el || el.contains(hit))) {
      over = hit ? (hit.getAttribute('aria-label') || hit.innerText || hit.tagName) : 'nothing';
      over = String(over).replace(/\\s+/g, ' ').slice(0, 60);
      break;
    }
  }
  return {top: Math.round(r.top), bottom: Math.round(r.bottom), left: Math.round(r.left),
          right: Math.round(r.right), vw, vh, over,
          loaded: el.tagName !== 'IMG' || (el.complete && el.naturalWidth > 0)};
}"""


@dataclass
class Check:
    """One thing a reviewer must see: what, whether it holds, and why (a box, a value)."""

    what: str
    ok: bool
    why: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_sweep(work: Path, archive: str | None) -> None:
    """A 2 x 2 sweep into work/mlflow.db (children in parallel would race on 2 cores: the
    basic launcher runs them one after the other); data where mlp-train keeps it."""
    data = ([f"data.archive={archive}", "data.limit=5000", "data.val_size=1000",
             "trainer.train_eval_size=1000", "trainer.epochs=6"] if archive
            else ["data=synthetic", "trainer.epochs=4", "trainer.batch_size=50"])
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    subprocess.run([str(BIN / "mlp-train"), "-m", *data, "optim.lr=3e-3,1e-2",
                    "model.reg=1e-4,1e-2", f"tracking.uri=sqlite:///{work}/mlflow.db",
                    f"tracking.experiment={EXPERIMENT}", "trainer.progress=false"],
                   cwd=work, env=env, check=True, timeout=1800)


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
        if server.poll() is not None:
            raise RuntimeError(f"the MLflow UI exited with {server.returncode} (port {port} "
                               "taken?)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(1)
    os.killpg(server.pid, 15)
    raise RuntimeError("the MLflow UI did not answer /health within 180 s")


def _chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise RuntimeError("no chromium on PATH: apt-get install -y chromium")
    return browser


def box(locator: Any) -> dict | None:
    """Where the first element of `locator` is drawn (BOX_JS), None when there is none."""
    if locator.count() == 0:
        return None
    return locator.first.evaluate(BOX_JS)


def on_first_screen(what: str, found: dict | None) -> Check:
    """Whether an element (its `box`) is drawn whole inside the window, uncovered."""
    if found is None:
        return Check(what, False, "not on the page")
    b = found
    where = f"box y {b['top']}..{b['bottom']}, x {b['left']}..{b['right']} in {b['vw']}x{b['vh']}"
    if not b["loaded"]:
        return Check(what, False, f"the image did not load ({where})")
    if b["top"] < 0 or b["left"] < 0 or b["bottom"] > b["vh"] or b["right"] > b["vw"]:
        return Check(what, False, f"not inside the window: {where}")
    if b["over"] is not None:
        return Check(what, False, f"covered or clipped by {b['over']!r} ({where})")
    return Check(what, True, where)


def look(page: Any, name: str, url: str | None, out: Path) -> str:
    """Open `url` (or stay on the page) and wait for the page to settle, save what the
    window shows as out/<name>.png; return the page's text."""
    if url is not None:
        page.goto(url)  # the UI polls the server: it is never network-idle
    page.wait_for_timeout(SETTLE_MS if url is not None else 2000)
    page.screenshot(path=out / f"{name}.png")
    print(f"{out / name}.png  <-  {url or 'the page above'}")
    return page.locator("body").inner_text()


def shoot(pages: dict[str, str], out: Path, facts: dict[str, Any], window: dict[str, int]
          ) -> list[Check]:
    """Visit each page as a first-time visitor (a fresh browser profile each) in a window
    of `window` pixels, save its first screen, and check what must be on it."""
    from playwright.sync_api import sync_playwright

    checks: list[Check] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS)
        for name, url in pages.items():
            context = browser.new_context(viewport=window)
            context.set_default_timeout(90_000)  # a loaded 2-core machine answers slowly
            page = context.new_page()
            if name == "1-runs-table":
                page.goto(url)
                page.get_by_role("button", name="Columns").first.click()
                for column in COLUMNS:  # in the open menu (the names show elsewhere too)
                    page.locator(f"text='{column}' >> visible=true").first.click()
                page.keyboard.press("Escape")
                print(f"runs table: columns added as a reviewer does once: {', '.join(COLUMNS)}")
            text = look(page, name, url, out)
            check = CHECKS.get(name)
            if check is not None:
                checks += check(page, text, facts)
            context.close()
        browser.close()
    return checks


def _whole(page: Any, whose: str) -> Check:
    """The description shows whole: no "Show more" (MLflow folds a description taller than
    100 pixels and fades the lower 60 of those)."""
    folded = page.get_by_label("Expand description").count()
    return Check(f"{whose} Overview: the description whole, nothing folded or faded",
                 folded == 0, "a \"Show more\" under it" if folded else "no \"Show more\"")


def _parent_overview(page: Any, text: str, facts: dict) -> list[Check]:
    # the glance: the figure (MLflow drops an image's alt text), the best children's rows
    figure = on_first_screen("", box(page.locator("img[src*='plots%2Fglance.png'], "
                                                  "img[src*='plots/glance.png']")))
    best = page.locator("td:not(:has(table))", has_text=facts["best_child"])
    row = on_first_screen("", box(best.locator("xpath=..")))
    best_row = best.first.locator("xpath=..").inner_text() if best.count() else ""
    return [
        Check("the sweep parent's Overview: its figure on the first screen", figure.ok,
              figure.why),
        Check("the sweep parent's Overview: the best children's rows, the best first, on "
              "the first screen", row.ok and best_row.startswith(facts["best_child"]),
              f"{row.why}; best row: {best_row!r:.80}"),
        _whole(page, "the sweep parent's"),
    ]


def _child_overview(page: Any, text: str, facts: dict) -> list[Check]:
    figure = on_first_screen("", box(page.locator("img[src*='plots%2Fglance.png'], "
                                                  "img[src*='plots/glance.png']")))
    result = page.locator("td", has_text="Test accuracy")
    line = result.last.inner_text() if result.count() else ""
    test = f"Test accuracy {facts['acc_test']:.2%}"
    error = f"max relative error {facts['rel_error']:.1e}"
    shown = on_first_screen("", box(result.last) if result.count() else None)
    tag = re.search(r"gradcheck\.max_rel_error\W+([0-9.e+-]+)", text)
    return [
        Check("the child's Overview: the train vs validation figure on the first screen",
              figure.ok, figure.why),
        Check(f"the child's Overview: acc/test as stored ({test}) on the first screen",
              shown.ok and test in line, f"{shown.why}; the glance reads {line!r:.90}"),
        Check("the child's gradient check: non-zero in the store, and at that value on its "
              "first screen and in its tags",
              facts["rel_error"] > 0 and shown.ok and error in line and tag is not None
              and float(tag.group(1)) == float(f"{facts['rel_error']:.2e}"),
              f"rel_error/max {facts['rel_error']:.3e}; the description says "
              f"{error if error in line else 'no ' + repr(error)}; tag "
              f"{tag.group(1) if tag else 'not shown'}"),
        _whole(page, "the child's"),
    ]


def sections(text: str) -> list[str]:
    """The chart sections of a run's metrics page, in page order ("acc (5)" -> "acc")."""
    return [m.group(1) for m in re.finditer(r"^([\w./-]+)\n\((\d+)\)$", text, re.M)]


def _child_metrics(page: Any, text: str, facts: dict) -> list[Check]:
    order = sections(text)
    return [Check("the child's Model metrics: the learning curves first (acc, loss)",
                  order[:2] == ["acc", "loss"], f"sections {order}")]


CHECKS = {"2-run-overview": _child_overview, "3-run-metrics": _child_metrics,
          "4-sweep-parent": _parent_overview}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", help="a cifar-10-python.tar.gz (default: synthetic data)")
    parser.add_argument("--out", default="docs/dashboard", help="where the PNGs go")
    parser.add_argument("--store", help="a directory to keep the sweep in (reused when it "
                        "holds one; default: a temporary directory)")
    parser.add_argument("--port", type=int, default=None,
                        help="the MLflow UI's port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--window", default=WINDOW, help=f"the browser window's inner size, "
                        f"WIDTHxHEIGHT (default: {WINDOW})")
    args = parser.parse_args(argv)
    width, _, height = args.window.partition("x")
    window = {"width": int(width), "height": int(height)}
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
        facts = {"best_child": best.info.run_name, "acc_test": best.data.metrics["acc/test"],
                 "rel_error": best.data.metrics["rel_error/max"]}
        registered = parent.data.tags.get("mlp.sweep.registered_model", "").split("@")[0]
        port = args.port or free_port()
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
                                        f"/artifacts/report.html?{view}",
            "6-compare-children": f"{base}/compare-runs?runs="
                                  f"{json.dumps([r.info.run_id for r in children])}"
                                  f"&experiments={json.dumps([eid])}&{view}",
            "7-registered-model": f"{base}/models/{registered}?{view}",
        }
        try:
            checks = shoot(pages, out, facts, window)
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    for c in checks:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.what}: {c.why}")
    return 0 if checks and all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
