"""What tests in several folders share: quick configs, running the installed commands,
reading runs back from a store, the sweep contract, and tar archives made to measure."""

from __future__ import annotations

import atexit
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import tool
from mlflow import MlflowClient

from mlp.tracking import keys as metrics

_MIGRATED: list[Path] = []  # a SQLite store whose tables MLflow made, once per session


def migrated_store(path: Path) -> str:
    """The URI of a SQLite store at `path` whose tables exist already: a copy of one
    MLflow migrated once per test session (a migration takes 1-4 s, a copy 0.15 s). For
    tests of what a run records; the tests of a store's creation make theirs."""
    if not _MIGRATED:
        folder = Path(tempfile.mkdtemp(prefix="mlp-store-"))
        atexit.register(shutil.rmtree, folder, True)
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
        _MIGRATED.append(folder / "mlflow.db")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_MIGRATED[0], path)
    return f"sqlite:///{path}"

QUICK = ["data=synthetic", "data.synthetic.n_train=300", "data.synthetic.n_test=100",
         "data.val_size=60", "model.hidden_sizes=[32]", "trainer.epochs=2",
         "trainer.batch_size=50", "trainer.train_eval_size=100", "trainer.progress=false",
         "optim.lr=0.02", "gradcheck.max_width=8", "gradcheck.num_checks=10"]


def mlp_train(args: list[str], cwd: Path, env: dict, timeout: float = 180,
              command: str = "mlp-train") -> subprocess.CompletedProcess:
    return subprocess.run([tool(command), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


class _Rows(HTMLParser):
    """The text of each cell of the innermost table rows of an HTML text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.open: list[list[str]] = []  # the rows being read, innermost last
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "tr":
            self.open.append([])
        elif tag == "td":
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self.cell is not None and self.open:
            self.open[-1].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr" and self.open:
            self.rows.append(self.open.pop())

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def glance_rows(description: str) -> list[list[str]]:
    """The rows of the table inside a sweep parent's glance (`mlp.tracking.glance`), each
    a list of its cells' text: run, val, test, gap, then what went wrong (status,
    gradient check) and the best's model version, or ""."""
    parser = _Rows()
    parser.feed(description)
    return [row for row in parser.rows if row and row[0]]  # not the row around them


def runs_of(db: Path, experiment: str = "mlp-lab") -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


FAST = ["data=synthetic", "data.synthetic.n_train=300", "data.synthetic.n_test=100",
        "data.val_size=60", "model.hidden_sizes=[16]", "trainer.epochs=2",
        "trainer.batch_size=50", "trainer.train_eval_size=100", "trainer.progress=false",
        "gradcheck.enabled=false", "tracking.plots=false", "tracking.log_model=false"]


GRID = ["optim.lr=0.01,0.03", "model.reg=0,0.001"]


def overriding(base: list[str], *changes: str) -> list[str]:
    """`base` with each `key=value` of `changes` in place of the same key's (appended when
    new): Hydra refuses a key given twice on one command line."""
    keys = {c.split("=", 1)[0] for c in changes}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(changes)


def sweep(args: list[str], cwd: Path, env: dict, timeout: float = 300
          ) -> subprocess.CompletedProcess:
    return subprocess.run([tool("mlp-train"), "-m", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def parent_and_children(db: Path) -> tuple[MlflowClient, list, list]:
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("mlp-lab")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlp.sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def check_grid(db: Path, models: bool = False) -> None:
    """The sweep contract: the parent summarizes (shared config as params, swept keys as
    tags, the best child's metrics under the children's keys, a description, the figures
    at the top level, the best model registered as @champion); children are named by their
    swept values and tagged with the sweep."""
    client, parents, children = parent_and_children(db)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted((c.data.params["optim.lr"], c.data.params["model.reg"]) for c in children) == [
        ("0.01", "0.0"), ("0.01", "0.001"), ("0.03", "0.0"), ("0.03", "0.001")]
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.info.run_name for c in children) == [
        "reg=0 lr=1e-2", "reg=0 lr=3e-2", "reg=1e-3 lr=1e-2", "reg=1e-3 lr=3e-2"]
    name = parent.data.tags["mlp.sweep.name"]
    assert {c.data.tags["mlp.sweep.name"] for c in children} == {name}

    tags, params = parent.data.tags, parent.data.params
    assert tags["mlp.swept"] == "model.reg optim.lr"
    assert tags["mlp.swept.optim.lr"] == "0.01,0.03" and tags["mlp.swept.model.reg"] == "0,0.001"
    assert "optim.lr" not in params and "model.reg" not in params
    assert params["model.hidden_sizes"] == "[16]" and params["trainer.epochs"] == "2"
    assert params == {k: v for k, v in children[0].data.params.items()
                      if k not in ("optim.lr", "model.reg")}

    from mlp.sweeps import report

    table = report.build_report(client, "mlp-lab", parent.info.run_id)
    assert len(table.rows) == 4
    accs = [row["val_acc"] for row in table.rows]
    assert accs == sorted(accs, reverse=True)
    assert set(table.swept) == {"optim.lr", "model.reg"}
    best = client.get_run(tags["mlp.sweep.best_run_id"])
    assert best.info.run_id == table.best["run_id"]
    for key in (metrics.ACC_BEST_VAL, metrics.ACC_TEST, metrics.ACC_GAP, metrics.LOSS_VAL):
        assert parent.data.metrics[key] == best.data.metrics[key], key
    first = glance_rows(tags["mlflow.note.content"])[0]
    assert first[0] == best.info.run_name and first[-1] in ("", "v1 @champion")
    assert tags["mlp.swept.optim.lr"] == "0.01,0.03"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.html", "val_acc_heatmap.png", "top_curves.png"} <= artifacts
    if models:
        registered = tags["mlp.sweep.registered_model"]
        model_name = registered.split("@")[0]
        version = client.get_model_version_by_alias(model_name, "champion")
        assert version.run_id == best.info.run_id


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, payload in members:
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def listing(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


class OutageProxy:
    """An HTTP proxy on 127.0.0.1 in front of a tracking server (`upstream`), that answers
    503 to a `POST .../runs/log-batch` whose JSON body `fails` says so, and with `uploads`
    to every artifact upload (`PUT .../mlflow-artifacts/artifacts/...`: an artifact store
    that refuses files while the tracking store takes the points), while `open` (a
    partial outage: the run's start, tags and end still pass). `url` is its address;
    `refused` counts the requests it answered 503. Use as a context manager."""

    def __init__(self, upstream: str, fails: Callable[[dict], bool],
                 uploads: bool = False) -> None:
        self.upstream, self.fails, self.open, self.refused = upstream, fails, False, 0
        self.uploads = uploads
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def refuse(self, body: bytes) -> bool:
                if not proxy.open:
                    return False
                if self.command == "PUT" and "/mlflow-artifacts/artifacts/" in self.path:
                    return proxy.uploads
                return (self.command == "POST" and self.path.endswith("/runs/log-batch")
                        and proxy.fails(json.loads(body or b"{}")))

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.refuse(body):
                    proxy.refused += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                request = urllib.request.Request(
                    proxy.upstream + self.path, data=body or None, method=self.command,
                    headers={k: v for k, v in self.headers.items()
                             if k.lower() not in ("host", "content-length")})
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        status, headers, data = answer.status, answer.headers, answer.read()
                except urllib.error.HTTPError as e:
                    status, headers, data = e.code, e.headers, e.read()
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection",
                                           "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OutageProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def point_counts(client: MlflowClient, run_id: str) -> dict[str, int]:
    """Points per metric key a run holds in the store, `system/*` left out (sampled by
    wall time)."""
    return {key: len(client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics if not key.startswith("system/")}
