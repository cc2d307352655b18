"""Which test-time views to average over: a trained model's validation and test accuracy
for each set of views (`mlp.training.inference.Scoring`), from one logged model.

The views are chosen on validation (the test column is printed beside it, not used to
choose): `best_mlp`'s `data.augment.test_shift=3` came from this table, on the models of
two runs of the preset (PCA to 512 and to 256 components, test_flip on, no shift).

    python experiments/test_views.py --model models:/<model id> \\
        --uri sqlite:///$PWD/mlflow.db --archive ../shared/data/cifar-10-python.tar.gz

`--model` is a logged model's URI or a served model's data folder (`.../data/mlp`); the
splits are `best_mlp`'s (its seed and validation size, from `conf/`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mlp.tracking import serving
from mlp.training.inference import Scoring

ROOT = Path(__file__).resolve().parents[1]
SHIFTS = (1, 2, 3, 4)


def load_model(model: str, uri: str | None) -> serving.PixelClassifier:
    """The served classifier in `model` (a folder, or a models:/ URI of the store `uri`)."""
    if Path(model).is_dir():
        return serving._load_pyfunc(model)
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)
    return serving._load_pyfunc(mlflow.artifacts.download_artifacts(f"{model}/data/mlp"))


def splits(archive: Path):
    """best_mlp's validation and test splits."""
    from hydra import compose, initialize_config_dir

    from mlp.cli import build
    from mlp.config import schema

    schema.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["experiment=best_mlp", f"data.archive={archive}"])
    return build.load_data(cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="models:/<id> or a data/mlp folder")
    parser.add_argument("--uri", help="the tracking store of a models:/ URI")
    parser.add_argument("--archive", type=Path, required=True, help="cifar-10-python.tar.gz")
    args = parser.parse_args(argv)
    classifier, data = load_model(args.model, args.uri), splits(args.archive.resolve())
    sets = [Scoring(False), Scoring(True)] + [Scoring(True, s) for s in SHIFTS]
    print("| views | flip | shift | validation | test |\n| ---: | --- | ---: | ---: | ---: |")
    for scoring in sets:
        classifier.scoring = scoring
        acc = [np.mean(classifier.predict(X.astype(np.float64)).argmax(axis=1) == y)
               for X, y in ((data.X_val, data.y_val), (data.X_test, data.y_test))]
        print(f"| {scoring.views} | {scoring.flip} | {scoring.shift} | {acc[0]:.2%} | "
              f"{acc[1]:.2%} |", flush=True)


if __name__ == "__main__":
    main()
