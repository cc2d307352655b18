"""Where a sweep's time goes: its training share and the split of a job's fixed cost.

Runs a plain `mlp-train -m` sweep (the default, basic launcher) of 4 jobs and reports
its **training share**: the children's training-step time, as they logged it in
`speed/epoch_s` (summed over every epoch of every child, read back from MLflow), over the
sweep's wall time (the whole command, interpreter start to exit). Two sweeps:

- `cs231n`: the cs231n preset (`experiment=cs231n_two_layer`, 3072-100-10) at 10 epochs on
  49,000 training images (`data.val_size=1000`), `optim.lr` x `model.reg` 2 x 2;
- `small`: 3072-200-10 on 12,000 images (`data.limit`), 4 epochs, `optim.lr` x 4.

The sweep runs `mlp.cli.train.main` (what the `mlp-train` script runs) in a child
interpreter with perf_counter spans wrapped around the functions a job calls; a span's
time excludes the spans nested in it, so the rows add up. Rows that name work on a
helper thread (`[bg]`) are off the critical path and not part of the job's wall time.
With `--separate` the same jobs also run as separate `mlp-train` processes with one BLAS
thread each, as many at a time as there are cores, for the wall-time ratio.

Every sweep writes into a fresh experiment of one store created beforehand (a user's
store exists already), with the CIFAR-10 cache decoded beforehand (`$MLP_LAB_DATA`).

    python experiments/bench_sweep.py --archive ../shared/data/cifar-10-python.tar.gz
    python experiments/bench_sweep.py --archive ... --sweeps small --reps 3 --separate
    python experiments/bench_sweep.py ... --src /path/to/another/checkout   # before/after

A shared machine is noisy: compare shares and ratios measured in one session, and say how
loaded the machine was (the script prints the load average before and after).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SWEEPS = {
    "cs231n": ["experiment=cs231n_two_layer", "trainer.epochs=10", "data.val_size=1000",
               "optim.lr=0.005,0.01", "model.reg=1e-3,5e-3"],
    "small": ["model.hidden_sizes=[200]", "data.limit=12000", "data.val_size=1000",
              "trainer.epochs=4", "optim.lr=0.002,0.005,0.01,0.02"],
}

# (module, attribute, row): what a job's fixed cost is made of. A missing attribute (an
# older or newer checkout) is skipped.
SPANS = [
    ("mlp.cli.exits", "check_command_line", "config: every job's, before the sweep"),
    ("mlp.sweeps.callback", "SweepCallback.on_multirun_start", "sweep start (parent run)"),
    ("mlp.tracking.deferred", "wait", "sweep end: waiting for the last tails"),
    ("mlp.sweeps.callback", "SweepCallback.on_multirun_end", "sweep end (report, model)"),
    ("mlp.cli.train", "train", "job: other"),
    ("mlp.config.schema", "validate", "config"),
    ("mlp.config.schema", "inactive_overrides", "config"),
    ("mlp.cli.exits", "connect", "store connection"),
    ("mlp.tracking.liveness", "reap_dead_runs", "store: reap, repair, skip check"),
    ("mlp.tracking.receipt", "repair_incomplete", "store: reap, repair, skip check"),
    ("mlp.sweeps.callback", "earlier_attempts", "store: reap, repair, skip check"),
    ("mlp.cli.build", "load_data", "data"),
    ("mlp.cli.build", "build_trainer", "data: normalizer, model"),
    ("mlp.tracking.recorder", "environment_tags", "run start"),
    ("mlp.tracking.recorder", "start_run", "run start"),
    ("mlflow.system_metrics.system_metrics_monitor", "SystemMetricsMonitor.start",
     "system metrics start"),
    ("mlp.tracking.recorder", "RunRecorder.log_config", "config and datasets logged"),
    ("mlp.tracking.recorder", "split_datasets", "config and datasets logged"),
    ("mlp.tracking.recorder", "RunRecorder.log_datasets", "config and datasets logged"),
    ("mlp.cli.build", "run_gradcheck", "gradient check"),
    ("mlp.tracking.recorder", "RunRecorder.log_gradcheck", "gradient check"),
    ("mlp.training.trainer", "Trainer.fit", "fit: batches, health, other"),
    ("mlp.training.trainer", "Trainer.evaluate", "evaluation"),
    ("mlp.tracking.recorder", "RunRecorder.on_epoch", "per-epoch record"),
    ("mlp.training.trainer", "Trainer.save_checkpoint", "checkpoints"),
    ("mlp.cli.train", "record_result", "results, description"),
    ("mlp.tracking.plots", "curves_figure", "figures"),
    ("mlp.tracking.plots", "glance_figure", "figures"),
    ("mlp.tracking.plots", "confusion_figure", "figures"),
    ("mlp.tracking.plots", "per_class_figure", "figures"),
    ("mlp.tracking.plots", "weights_figure", "figures"),
    ("mlp.tracking.recorder", "RunRecorder.log_png", "figures"),
    ("mlp.tracking.painter", "_ask", "figures"),
    ("mlp.tracking.recorder", "RunRecorder.log_model", "model"),
    ("mlp.tracking.recorder", "RunRecorder.finish", "run end"),
    ("mlflow.system_metrics.system_metrics_monitor", "SystemMetricsMonitor.finish",
     "system metrics stop"),
]
TRAINING = "training steps (speed/epoch_s)"


# -- the child: one instrumented sweep -----------------------------------------------------

class Spans:
    """Exclusive time per (job, row, thread kind): a call's time minus the wrapped calls
    nested in it on the same thread."""

    def __init__(self) -> None:
        self.rows: dict[str, float] = {}
        self.job = 0
        self.local = threading.local()
        self.lock = threading.Lock()

    def wrap(self, fn, row: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            stack = self.local.__dict__.setdefault("stack", [])
            if row == "job: other" and not stack:
                self.job += 1
            stack.append(0.0)
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                nested = stack.pop()
                if stack:
                    stack[-1] += spent
                where = "" if threading.current_thread() is threading.main_thread() else " [bg]"
                self.add(f"{row}{where}", spent - nested)
            if row.startswith("fit") and hasattr(result, "history"):
                self.add(TRAINING, sum(result.history["epoch_time"]))
                self.add(f"{row}{where}", -sum(result.history["epoch_time"]))
            return result
        return timed

    def add(self, row: str, seconds: float) -> None:
        with self.lock:
            self.rows[row] = self.rows.get(row, 0.0) + seconds


def child(out: Path, argv: list[str]) -> None:
    """Run `mlp-train argv` here with SPANS timed; write {row: seconds, ...} to `out`."""
    start = time.perf_counter()
    import mlp.cli.train as train_module

    spans = Spans()
    spans.add("imports", time.perf_counter() - start)
    for module_name, attr, row in SPANS:
        try:
            module = importlib.import_module(module_name)
            owner, _, name = attr.rpartition(".")
            target = functools.reduce(getattr, owner.split("."), module) if owner else module
            fn = getattr(target, name)
        except (ImportError, AttributeError):
            continue
        wrapped = spans.wrap(getattr(fn, "__func__", fn), row)
        setattr(target, name, staticmethod(wrapped) if isinstance(
            target.__dict__.get(name), staticmethod) else wrapped)

    def dump() -> None:
        out.write_text(json.dumps({"rows": spans.rows, "jobs": spans.job,
                                   "in_process": time.perf_counter() - start}))

    atexit.register(dump)
    sys.argv = ["mlp-train", *argv]
    getattr(train_module, "main", train_module.train_main)()  # what `mlp-train` runs


# -- the parent: sweeps, separate processes, the table -----------------------------------

# `mlp-train` as the checkout on PYTHONPATH defines it (`--src`: its entry point may differ
# from the installed script's).
MLP_TRAIN = [sys.executable, "-c", "import sys; sys.argv[0] = 'mlp-train'; "
             "from mlp.cli import train; getattr(train, 'main', train.train_main)()"]


def env_for(args: argparse.Namespace, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ, MLP_LAB_DATA=str(args.data), MLFLOW_DISABLE_TELEMETRY="true")
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    if threads is not None:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    return env


def common(args: argparse.Namespace, experiment: str) -> list[str]:
    return [f"data.archive={Path(args.archive).resolve()}", "trainer.progress=false",
            f"tracking.uri={args.uri}", f"tracking.experiment={experiment}", *args.extra]


def run_sweep(args: argparse.Namespace, sweep: str, experiment: str, cwd: Path) -> dict:
    """One instrumented `mlp-train -m` sweep: wall time, rows, and the training time its
    children logged."""
    spans = cwd / f"{experiment}.json"
    cmd = [sys.executable, __file__, "--child", str(spans), "--", "-m",
           *SWEEPS[sweep], *common(args, experiment)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env_for(args), capture_output=True, text=True,
                          timeout=args.timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"sweep {experiment} exited {done.returncode}:\n{done.stderr[-3000:]}")
    data = json.loads(spans.read_text())
    logged, steady = logged_training(args.uri, experiment)
    rows = data["rows"]
    rows["interpreter start, exit"] = wall - data["in_process"]
    accounted = sum(v for k, v in rows.items() if not k.endswith("[bg]"))
    rows["Hydra between jobs, other"] = wall - accounted
    return {"wall": wall, "training": logged, "share": logged / wall, "steady": steady,
            "steady_share": steady / wall, "rows": rows, "jobs": data["jobs"]}


def logged_training(uri: str, experiment: str) -> tuple[float, float]:
    """The sum of `speed/epoch_s` over every epoch of the experiment's child runs, and
    the same at each run's steady pace (its median epoch times its epochs): an epoch that
    shared the cores (or the GIL) with the previous job's tail is slower, and counted as
    training in the first."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.mlflow.parentRunId != ''")
    if not runs or any(r.info.status != "FINISHED" for r in runs):
        sys.exit(f"{experiment}: children {[r.info.status for r in runs]}")
    epochs = [[m.value for m in client.get_metric_history(r.info.run_id, "speed/epoch_s")]
              for r in runs]
    return (sum(map(sum, epochs)),
            sum(statistics.median(e) * len(e) for e in epochs if e))


def jobs_of(sweep: str) -> list[list[str]]:
    """The sweep's jobs as single-run override lists (the grid's product)."""
    fixed = [o for o in SWEEPS[sweep] if "," not in o.partition("=")[2]
             or o.partition("=")[2].startswith("[")]
    swept = [o for o in SWEEPS[sweep] if o not in fixed]
    combos = [[]]
    for o in swept:
        key, _, values = o.partition("=")
        combos = [[*c, f"{key}={v}"] for c in combos for v in values.split(",")]
    return [fixed + c for c in combos]


def run_separate(args: argparse.Namespace, sweep: str, experiment: str, cwd: Path) -> float:
    """The sweep's jobs as separate `mlp-train` processes, one BLAS thread each, as many
    at a time as there are cores: the wall time of the batch."""
    cores = os.cpu_count() or 1
    env = env_for(args, threads=1)
    pending = [[*MLP_TRAIN, *job, *common(args, experiment)] for job in jobs_of(sweep)]
    running: list[subprocess.Popen] = []
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < cores:
            running.append(subprocess.Popen(pending.pop(0), cwd=cwd, env=env,
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        time.sleep(0.05)
        for p in [p for p in running if p.poll() is not None]:
            if p.returncode != 0:
                sys.exit(f"a separate job exited {p.returncode}: {p.args}")
            running.remove(p)
    return time.perf_counter() - start


def prepare(args: argparse.Namespace, cwd: Path) -> None:
    """The store's tables and the data cache, made before anything is timed."""
    env = env_for(args)
    subprocess.run([*MLP_TRAIN, "debug=fast",
                    "tracking.plots=false", "tracking.log_model=false",
                    *common(args, "bench-warmup")], cwd=cwd, env=env, check=True,
                   capture_output=True, timeout=args.timeout)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def table(sweep: str, results: list[dict], separate: list[float]) -> str:
    """Medians over the repetitions: the share, then the fixed cost per job by row."""
    med = statistics.median
    jobs = results[0]["jobs"]
    wall, training = med(r["wall"] for r in results), med(r["training"] for r in results)
    lines = [f"## {sweep}: `mlp-train -m {' '.join(SWEEPS[sweep])}` ({jobs} jobs, "
             f"median of {len(results)})", "",
             f"wall {wall:.1f} s, training steps {training:.1f} s: **training share "
             f"{med(r['share'] for r in results):.2f}**",
             f"at each job's steady pace (its median epoch x its epochs) the training is "
             f"{med(r['steady'] for r in results):.1f} s: share "
             f"{med(r['steady_share'] for r in results):.2f}"]
    if separate:
        sep = med(separate)
        lines.append(f"separate processes (1 BLAS thread, {os.cpu_count()} at a time): "
                     f"{sep:.1f} s wall; the sweep is {sep / wall:.2f}x faster")
    lines += ["", "| where the time goes | seconds, whole sweep | per job |",
              "| --- | ---: | ---: |"]
    names = sorted({k for r in results for k in r["rows"]},
                   key=lambda k: -med(r["rows"].get(k, 0.0) for r in results))
    for name in names:
        v = med(r["rows"].get(name, 0.0) for r in results)
        if abs(v) >= 0.005:
            lines.append(f"| {name} | {v:.2f} | {v / jobs:.2f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[4:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", required=True, help="cifar-10-python.tar.gz")
    p.add_argument("--sweeps", nargs="+", choices=list(SWEEPS), default=list(SWEEPS))
    p.add_argument("--reps", type=int, default=1, help="sweeps of each kind (median)")
    p.add_argument("--separate", action="store_true", help="also as separate processes")
    p.add_argument("--src", help="a checkout to run instead of the installed mlp (PYTHONPATH)")
    p.add_argument("--work", help="directory for the store and cache (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("extra", nargs="*", help="more overrides for every job (key=value)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-sweep-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.data, args.uri = work / "data", f"sqlite:///{work / 'mlflow.db'}"
    print(f"load average before: {load()} ({os.cpu_count()} cores); work dir {work}")
    prepare(args, work)
    stamp = time.strftime("%H%M%S")
    out = {}
    for sweep in args.sweeps:
        results, separate = [], []
        for rep in range(args.reps):
            results.append(run_sweep(args, sweep, f"bench-{sweep}-{stamp}-{rep}", work))
            if args.separate:
                separate.append(run_separate(args, sweep, f"bench-sep-{sweep}-{stamp}-{rep}",
                                             work))
        print(table(sweep, results, separate) + "\n", flush=True)
        out[sweep] = {"sweeps": results, "separate": separate}
    print(f"load average after: {load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
