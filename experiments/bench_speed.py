"""Speed benchmark: mlp-lab's training step against the hardware's floor and PyTorch.

For each net, in one process, with the same shapes, dtype, batch and thread count:

* **mlp-lab**: the step `mlp-train` runs (`mlp.core.step.step`: the weights' gradients
  accumulated by the GEMMs into the momentum velocity, then one pass that adds the L2 term
  and moves the weights; SGD momentum, L2 reg, ReLU, softmax), on a normalized batch;
* **floor**: only the matrix multiplies of that step (forward, and the backward of every
  layer, without the data's gradient), into preallocated arrays: no framework can beat it;
* **floor + memory**: the floor plus the memory traffic no update can avoid, reading and
  writing every weight and its velocity once (4 x parameters x 4 bytes per step) at the
  bandwidth measured in the same run (the faster of a 64 MiB `np.copyto` and a 64 MiB
  `y += x` through NumPy's threaded BLAS: bytes read + written per second);
* **PyTorch** (when `torch` is importable; never a dependency of mlp-lab): the same net,
  loss, momentum and weight decay, `zero_grad / backward / step`.

Repetitions alternate between the implementations, so a machine that slows down mid-run
slows all of them; each is reported as the median over repetitions, scaled to seconds per
50,000-image epoch, and the ratios are the numbers to read (absolute times move with the
machine's load; ratios measured in one run do not). Three tables: every net at batch 256
for each thread count of `--threads` (NumPy's BLAS and PyTorch switched in the process),
then every net at each batch of `--batches` with all threads. `--plot` draws seconds per
epoch against parameter count (batch 256, all threads) for mlp-lab, PyTorch and the floors.

The data pipeline (gathering a shuffled batch from the uint8 images, crop+flip, per-batch
normalization into float32) is timed apart, per epoch, as the trainer runs it. Peak memory
is measured in a child process that trains the first net on a full-size (50,000 x 3072)
uint8 data set with `mlp.training.trainer.Trainer`: its peak resident set, as `ps` would show.

    python experiments/bench_speed.py --plot docs/speed.png --json results.json
    python experiments/bench_speed.py --threads 1 --batches 256 --reps 9
    python experiments/bench_speed.py --quick              # tiny shapes (the test suite)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

EPOCH_IMAGES = 50_000
NETS = {  # name -> (input_dim, hidden sizes, classes)
    "3072-1024-1024-10": (3072, (1024, 1024), 10),
    "3072-100-10": (3072, (100,), 10),
    "3072-512x4-10": (3072, (512, 512, 512, 512), 10),
}
QUICK_NETS = {"48-32-32-10": (48, (32, 32), 10), "48-16-10": (48, (16,), 10)}
REG, LR, MOMENTUM = 5e-4, 1e-2, 0.9
SETTLE = 0.3  # seconds between timed blocks (see time_steps)


def _set_threads(threads: int) -> None:
    """BLAS (and OpenMP) threads, before NumPy is imported."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


# -- the three implementations: each is a `step()` closure over its own arrays -------------


def mlp_lab_step(dims: tuple, batch: int, seed: int = 0) -> Callable[[], None]:
    """The training step as `mlp.training.trainer.Trainer.fit` runs it (`mlp.core.step.step`)."""
    import numpy as np

    from mlp.core.model import MLP
    from mlp.core.optim import Momentum
    from mlp.training import trainer as train

    input_dim, hidden, classes = dims
    model = MLP(input_dim, hidden, classes, reg=REG, dtype="float32", seed=seed)
    optimizer = Momentum(model.params, MOMENTUM)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, input_dim), dtype=np.float32)
    y = rng.integers(0, classes, batch)

    return functools.partial(train.step, model, optimizer, X, y, LR)


def floor_step(dims: tuple, batch: int, seed: int = 0) -> Callable[[], None]:
    """Only the matrix multiplies of the same step, into preallocated arrays."""
    import numpy as np

    input_dim, hidden, classes = dims
    sizes = [input_dim, *hidden, classes]
    rng = np.random.default_rng(seed)
    Ws = [0.01 * rng.standard_normal(shape, dtype=np.float32)
          for shape in itertools.pairwise(sizes)]
    dWs = [np.empty_like(W) for W in Ws]
    acts = [rng.standard_normal((batch, input_dim), dtype=np.float32)]
    acts += [np.empty((batch, s), dtype=np.float32) for s in sizes[1:]]
    douts = [np.empty((batch, s), dtype=np.float32) for s in sizes[1:]]
    douts[-1][...] = rng.standard_normal((batch, classes), dtype=np.float32)

    def step() -> None:
        for i, W in enumerate(Ws):
            np.matmul(acts[i], W, out=acts[i + 1])
        for i in reversed(range(len(Ws))):
            np.matmul(acts[i].T, douts[i], out=dWs[i])
            if i:  # the data's gradient is needed by nobody
                np.matmul(douts[i], Ws[i].T, out=douts[i - 1])

    return step


def torch_step(dims: tuple, batch: int, threads: int, seed: int = 0) -> Callable[[], None] | None:
    """The same net in PyTorch (None when torch is not installed)."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    input_dim, hidden, classes = dims
    sizes = [input_dim, *hidden]
    layers: list = []
    for a, b in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-1], classes))
    # weight_decay = 2 reg is mlp-lab's reg * sum W^2 (PyTorch also decays the biases)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=2 * REG)
    loss_fn = torch.nn.CrossEntropyLoss()
    X = torch.randn(batch, input_dim)
    y = torch.randint(0, classes, (batch,))

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(net(X), y).backward()
        optimizer.step()

    return step


# -- timing -----------------------------------------------------------------------------------


def time_steps(impls: dict[str, Callable[[], None]], steps: int, reps: int,
               warmup: int = 3) -> dict[str, float]:
    """Median seconds per step of each implementation; repetitions alternate between them."""
    for step in impls.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(reps):
        for name, step in impls.items():
            # The thread pools of the one timed before (OpenBLAS's, PyTorch's OpenMP) spin
            # for a while after their last call, on the cores this one needs: let them stop.
            time.sleep(SETTLE)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            samples[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


def bench_net(name: str, dims: tuple, batch: int, threads: int, steps: int, reps: int,
              bandwidth: float) -> dict:
    """Seconds per epoch of each implementation, the memory floor and the ratios, for one
    net; `bandwidth` in bytes read + written per second."""
    impls = {"mlp-lab": mlp_lab_step(dims, batch), "floor": floor_step(dims, batch)}
    if (torch := torch_step(dims, batch, threads)) is not None:
        impls["pytorch"] = torch
    per_step = time_steps(impls, steps, reps)
    params = n_params(dims)
    # Read and write every weight and its velocity once, float32.
    per_step["memory"] = 4 * params * 4 / bandwidth
    per_step["floor+memory"] = per_step["floor"] + per_step["memory"]
    steps_per_epoch = -(-EPOCH_IMAGES // batch)
    row = {"net": name, "params": params, "batch": batch, "threads": threads,
           **{f"{k}_s_per_epoch": v * steps_per_epoch for k, v in per_step.items()},
           "mlp_lab_over_floor": per_step["mlp-lab"] / per_step["floor"],
           "mlp_lab_over_floor_memory": per_step["mlp-lab"] / per_step["floor+memory"]}
    if "pytorch" in per_step:
        row["mlp_lab_over_pytorch"] = per_step["mlp-lab"] / per_step["pytorch"]
    return row


def n_params(dims: tuple) -> int:
    """Weights and biases of a net (input_dim, hidden sizes, classes)."""
    sizes = [dims[0], *dims[1], dims[2]]
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def copy_bandwidth(mib: int = 64, reps: int = 9) -> float:
    """Bytes read + written per second by the faster of two memory-bound passes over `mib`
    MiB float32 arrays (medians): `np.copyto` (one thread) and `y += x` as one call of
    NumPy's BLAS (`blas.axpy`, all its threads): the rate the update can hope for."""
    import numpy as np

    from mlp.core import blas

    src = np.ones(mib * 2**18, dtype=np.float32)
    dst = np.zeros_like(src)
    rates = []
    for moved, pass_ in ((2, lambda: np.copyto(dst, src)),
                         (3, lambda: blas.axpy(1e-9, src, dst))):
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            pass_()
            times.append(time.perf_counter() - t0)
        rates.append(moved * src.nbytes / statistics.median(times[1:]))
    return max(rates)


def set_threads(threads: int) -> None:
    """Switch NumPy's BLAS (and PyTorch's pool, when imported) to `threads` threads."""
    from mlp.core import blas

    blas.set_threads(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def bench_data(n: int, dim: int, batch: int, reps: int) -> dict:
    """Seconds per epoch of the data pipeline as the trainer runs it, on uint8 images."""
    import numpy as np

    from mlp import data as datalib

    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (n, dim), dtype=np.uint8)
    normalizer = datalib.Normalizer("channel").fit(X[:5000])
    buffer = np.empty((batch, dim), dtype=np.float32)
    times = {"gather+normalize": [], "gather+crop+flip+normalize": []}
    for _ in range(reps):
        for label, augment in (("gather+normalize", False), ("gather+crop+flip+normalize", True)):
            order = rng.permutation(n)
            t0 = time.perf_counter()
            for start in range(0, n, batch):
                idx = order[start:start + batch]
                Xb = X[idx]
                if augment and dim == datalib.DIM:
                    Xb = datalib.augment(Xb, rng, 4, True)
                normalizer(Xb, np.float32, out=buffer[:len(idx)])
            times[label].append((time.perf_counter() - t0) * EPOCH_IMAGES / n)
    return {f"{k}_s_per_epoch": statistics.median(v) for k, v in times.items()}


def peak_memory(dims: tuple, n: int, batch: int) -> dict:
    """Peak resident memory (MiB) of a fresh process training `dims` on n uint8 images."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import bench_speed; bench_speed._memory_child({dims!r}, {n}, {batch})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_child(dims: tuple, n: int, batch: int) -> None:
    """One epoch of `mlp.training.trainer.Trainer` (crop+flip, health metrics, checkpoint)
    on n uint8 training images plus validation and test sets; print the peak RSS (MiB) as
    JSON."""
    import tempfile

    import numpy as np

    from mlp import data as datalib
    from mlp.core.model import MLP
    from mlp.core.optim import Momentum, Schedule
    from mlp.training.trainer import Trainer, TrainSettings

    input_dim, hidden, classes = dims
    base = _peak_rss_mib()
    rng = np.random.default_rng(0)
    n_eval = max(n // 10, 1)
    X = rng.integers(0, 256, (n + 2 * n_eval, input_dim), dtype=np.uint8)
    y = rng.integers(0, classes, len(X))
    test = slice(n + n_eval, None)
    splits = datalib.Splits(X[:n], y[:n], X[n:n + n_eval], y[n:n + n_eval], X[test], y[test],
                            classes=tuple(map(str, range(classes))), fingerprint={})
    model = MLP(input_dim, hidden, classes, reg=REG, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        settings = TrainSettings(epochs=1, batch_size=batch, progress=False,
                                 augment_pad=4 if input_dim == datalib.DIM else 0,
                                 augment_flip=input_dim == datalib.DIM, checkpoint_dir=Path(tmp))
        schedule = Schedule("constant", LR, steps_per_epoch=-(-n // batch), epochs=1)
        Trainer(model, Momentum(model.params, MOMENTUM), schedule, splits,
                datalib.Normalizer("channel").fit(splits.X_train), settings).fit()
    peak = _peak_rss_mib()
    print(json.dumps({"peak_rss_mib": round(peak, 1), "before_data_mib": round(base, 1),
                      "data_mib": round(X.nbytes / 2**20, 1)}))


def _peak_rss_mib() -> float:
    """This process's peak resident set: VmHWM, which (unlike ru_maxrss) starts afresh at
    exec instead of inheriting the parent's peak."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        import resource

        scale = 2**20 if sys.platform == "darwin" else 2**10
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
    return int(kib) / 1024


# -- report -------------------------------------------------------------------------------------


COLUMNS = (("floor", "floor_s_per_epoch", ".2f"), ("+memory", "floor+memory_s_per_epoch", ".2f"),
           ("mlp-lab", "mlp-lab_s_per_epoch", ".2f"), ("pytorch", "pytorch_s_per_epoch", ".2f"),
           ("lab/floor", "mlp_lab_over_floor", ".3f"),
           ("lab/+mem", "mlp_lab_over_floor_memory", ".3f"),
           ("lab/torch", "mlp_lab_over_pytorch", ".3f"))


def _print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'net':<20}{'batch':>6}{'thr':>4}" + "".join(f"{c:>10}" for c, _, _ in COLUMNS))
    for row in rows:
        print(f"{row['net']:<20}{row['batch']:>6}{row['threads']:>4}" + "".join(
            f"{row.get(key, float('nan')):>10{fmt}}" for _, key, fmt in COLUMNS))


def plot(rows: list[dict], path: Path) -> Path:
    """Seconds per epoch against parameter count, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["params"])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = {"mlp-lab": ("mlp-lab", "o-", "C0"), "pytorch": ("PyTorch", "s-", "C3"),
              "floor+memory": ("floor: GEMMs + update memory traffic", "^--", "0.35"),
              "floor": ("floor: GEMMs only", "v:", "0.6")}
    for key, (label, style, color) in styles.items():
        points = [(r["params"], r[f"{key}_s_per_epoch"]) for r in rows
                  if f"{key}_s_per_epoch" in r]
        if points:
            ax.plot(*zip(*points, strict=True), style, color=color, label=label)
    for r in rows:
        ax.annotate(r["net"], (r["params"], r["mlp-lab_s_per_epoch"]),
                    textcoords="offset points", xytext=(6, -12), fontsize=8)
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g} M"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(  # 0.3 M and 3 M between the decades
        lambda v, _: f"{v / 1e6:g} M" if f"{v:.0e}".startswith("3") else ""))
    ax.margins(x=0.25)
    ax.set(xlabel="parameters",
           ylabel="seconds per 50,000-image epoch",
           title=f"float32 training step, batch {rows[0]['batch']}, {rows[0]['threads']} "
                 f"threads (median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few steps")
    parser.add_argument("--threads", type=int, nargs="+",
                        default=sorted({1, os.cpu_count() or 1}),
                        help="thread counts of the first tables (default: 1 and all)")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024],
                        help="batch sizes of the batch table (all threads)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="steps per repetition")
    parser.add_argument("--nets", nargs="*", help=f"subset of {list(NETS)}")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="draw seconds per epoch vs parameters here")
    args = parser.parse_args(argv)
    # Before NumPy's first import (the rest switch at run time): the most threads asked.
    _set_threads(max(args.threads))

    nets = QUICK_NETS if args.quick else {k: NETS[k] for k in args.nets or NETS}
    steps, reps = (2, 2) if args.quick else (args.steps, args.reps)
    batch, batches = (16, [8, 16]) if args.quick else (256, args.batches)
    most = max(args.threads)
    results: dict = {"nets": [], "machine": _machine(most) | {"bandwidth_gb_s": {}}}
    print(f"float32, median of {reps} x {steps} steps, seconds per {EPOCH_IMAGES:,}-image "
          f"epoch")
    bandwidth = {}
    for threads in args.threads:
        set_threads(threads)
        bandwidth[threads] = copy_bandwidth(8 if args.quick else 64)
        results["machine"]["bandwidth_gb_s"][str(threads)] = bandwidth[threads] / 1e9
        rows = [bench_net(name, dims, batch, threads, steps, reps, bandwidth[threads])
                for name, dims in nets.items()]
        results["nets"] += rows
        _print_table(f"batch {batch}, {threads} thread(s); memory bandwidth "
                     f"{bandwidth[threads] / 1e9:.1f} GB/s (read + write)", rows)
    set_threads(most)
    rows = [bench_net(name, dims, b, most, steps, reps, bandwidth[most])
            for b in batches if b != batch for name, dims in nets.items()]
    results["nets"] += rows
    by_batch = sorted((r for r in results["nets"] if r["threads"] == most),
                      key=lambda r: (list(nets).index(r["net"]), r["batch"]))
    _print_table(f"batch sizes, {most} thread(s)", by_batch)
    if "pytorch_s_per_epoch" not in results["nets"][0]:
        print("(PyTorch not installed: `pip install torch` to compare)")
    if args.plot:
        main_rows = [r for r in results["nets"] if r["batch"] == batch and r["threads"] == most]
        print(f"plot: {plot(main_rows, args.plot)}")

    n_data, dim = (512, 3072) if args.quick else (EPOCH_IMAGES, 3072)
    results["data"] = bench_data(n_data, dim, batch, 1 if args.quick else 3)
    print("data pipeline, s per epoch: " + ", ".join(
        f"{k.removesuffix('_s_per_epoch')} {v:.2f}" for k, v in results["data"].items()))
    if not args.no_memory:
        first = next(iter(nets.values()))
        results["memory"] = peak_memory(first, n_data, batch)
        print(f"peak memory training {next(iter(nets))} on {n_data:,} uint8 images: "
              f"{results['memory']['peak_rss_mib']:.0f} MiB resident "
              f"(data {results['memory']['data_mib']:.0f} MiB)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _machine(threads: int) -> dict:
    import numpy as np

    return {"cpus": os.cpu_count(), "threads": threads, "numpy": np.__version__,
            "load_avg_1m": os.getloadavg()[0]}


if __name__ == "__main__":
    main()
