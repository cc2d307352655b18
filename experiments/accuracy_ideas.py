"""Accuracy ideas for the best MLP, one change at a time, each a whole `mlp-train` run.

Every variant is `experiment=best_mlp` with `trainer.epochs=EPOCHS` (shorter than the
preset, so that the ideas can be compared in an afternoon) plus the overrides of its row,
run one after the other on the whole machine, recorded in the MLflow experiment
`accuracy-ideas` of `--workdir`'s store. The table (test accuracy at the best validation
epoch, validation accuracy, wall time of the whole command) is printed and written as
Markdown to `--out` (its rows as JSON beside it); a variant already there is not run
again.

    python experiments/accuracy_ideas.py --archive ../shared/data/cifar-10-python.tar.gz
    python experiments/accuracy_ideas.py --archive ... --only ema label_smoothing
    python experiments/accuracy_ideas.py --archive ... --epochs 140 \
        --out experiments/results/accuracy_ideas_full.md --only baseline 150_epochs  # round 2

Each run's output is kept in `--workdir` as <name>.log; with GNU time installed its peak
resident memory is measured too (`/usr/bin/time -v`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

EPOCHS = 30
VARIANTS = {  # name -> overrides on top of experiment=best_mlp trainer.epochs=EPOCHS
    "baseline": [],
    "label_smoothing": ["model.label_smoothing=0.1"],
    "ema": ["trainer.ema=0.999"],
    "onecycle": ["optim.schedule.name=onecycle", "optim.schedule.warmup_epochs=6"],
    "pca_whitening": ["data.whiten.name=pca", "data.whiten.components=512"],
    "zca_whitening": ["data.whiten.name=zca"],
    "wider_2048": ["model.hidden_sizes=[2048,2048]"],
    # round 2, at full length (--epochs 140 --out experiments/results/accuracy_ideas_full.md)
    # on the preset with PCA to 256 components, label smoothing and test-time views
    "pca_512_flip_only": ["data.whiten.components=512", "data.augment.test_shift=0",
                          "model.label_smoothing=0", "trainer.epochs=150"],
    "pca_256_flip_only": ["data.augment.test_shift=0", "model.label_smoothing=0",
                          "trainer.epochs=150"],
    "reg_1e-3_flip_only": ["data.augment.test_shift=0", "model.label_smoothing=0",
                           "model.reg=1e-3", "trainer.epochs=150"],
    "no_label_smoothing": ["model.label_smoothing=0", "trainer.epochs=150"],
    "150_epochs": ["trainer.epochs=150"],
}
DONE = re.compile(r"done: accuracy train ([\d.]+) / val ([\d.]+) / test ([\d.]+)")
PEAK = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
TIME = Path("/usr/bin/time")


def run(name: str, overrides: list[str], archive: Path, workdir: Path, epochs: int) -> dict:
    """One variant: its accuracies (at the best validation epoch) and wall time."""
    tool = Path(sys.executable).with_name("mlp-train")
    command = [str(tool), "experiment=best_mlp", f"trainer.epochs={epochs}",
               f"data.archive={archive.resolve()}", "trainer.progress=false",
               "tracking.experiment=accuracy-ideas", f"tracking.run_name={name}", *overrides]
    if TIME.exists():  # GNU time's peak resident memory of the run
        command = [str(TIME), "-v", *command]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (workdir / f"{name}.log").write_text(done.stdout + done.stderr)
    found = DONE.search(done.stdout + done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    train, val, test = map(float, found.groups())
    peak = PEAK.search(done.stderr)
    return {"name": name, "overrides": overrides, "epochs": epochs, "train_acc": train,
            "val_acc": val, "test_acc": test, "wall_s": round(wall, 1),
            "peak_mib": round(int(peak.group(1)) / 1024) if peak else None}


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["name"] == "baseline"), None)
    lines = ["| change | overrides | epochs | test acc | vs baseline | val acc | wall | peak |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        delta = f"{100 * (r['test_acc'] - base['test_acc']):+.1f}" if base else ""
        lines.append(f"| {r['name']} | `{' '.join(r['overrides']) or '-'}` | {r['epochs']} | "
                     f"{100 * r['test_acc']:.1f}% | {delta} | {100 * r['val_acc']:.1f}% | "
                     f"{int(r['wall_s'] // 60)}:{int(r['wall_s'] % 60):02d} | "
                     f"{'' if r.get('peak_mib') is None else str(r['peak_mib']) + ' MiB'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True, help="cifar-10-python.tar.gz")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/accuracy-ideas"))
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "accuracy_ideas.md")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--only", nargs="*", help=f"some of {list(VARIANTS)}")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = args.out.with_suffix(".json")  # the rows so far: a rerun goes on from them
    rows = json.loads(results.read_text()) if results.exists() else []
    for name in args.only or VARIANTS:
        if any(r["name"] == name for r in rows):
            continue
        rows.append(run(name, VARIANTS[name], args.archive, args.workdir, args.epochs))
        results.write_text(json.dumps(rows, indent=2))
        print(table(rows), flush=True)
    args.out.write_text(table(rows))


if __name__ == "__main__":
    main()
