"""The served model takes pixels on the 0-255 scale (uint8 or floats) and refuses a batch on
another scale; a model gets a name MLflow accepts whatever its run is called, and a store
that refuses it says so."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from mlp import data
from mlp.core.model import MLP
from mlp.data import Normalizer
from mlp.tracking import names, recorder, serving
from mlp.training import inference


@pytest.fixture(scope="module")
def classifier() -> serving.PixelClassifier:
    X = np.random.default_rng(0).integers(0, 256, (50, 3072)).astype(np.uint8)
    return serving.PixelClassifier(MLP(3072, [8], 10), Normalizer().fit(X),
                                   [str(i) for i in range(10)])


def test_uint8_and_floats_on_the_0_255_scale_give_the_same_probabilities(classifier):
    pixels = np.random.default_rng(1).integers(0, 256, (4, 3072)).astype(np.uint8)
    probs = classifier.predict(pixels)
    assert probs.shape == (4, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_array_equal(classifier.predict(pixels.astype(np.float64)), probs)
    np.testing.assert_array_equal(classifier.predict(pixels.tolist()), probs)


@pytest.mark.parametrize(("pixels", "words"), [
    (np.full((2, 3072), 0.5), r"all within \[0, 1\]: expected the 0-255 scale"),
    (np.full((2, 3072), 300.0), r"range over \[300.0, 300.0\]: expected uint8 or floats on "
                                r"the 0-255 scale"),
    (np.full((2, 3072), -1.0), "expected uint8 or floats on the 0-255 scale"),
    (np.full((2, 3072), np.nan), "expected uint8 or floats on the 0-255 scale"),
    (np.zeros((2, 32, 32, 3)), r"shape \(2, 32, 32, 3\): expected \(N, 3072\) pixel values"),
    (np.full((2, 3072), "a"), "dtype <U1: expected pixel values"),
])
def test_a_batch_on_another_scale_is_refused_naming_the_expected_one(classifier, pixels, words):
    with pytest.raises(ValueError, match=words):
        classifier.predict(pixels)


def test_it_scores_each_image_over_the_views_of_its_scoring(classifier, tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (6, 3072)).astype(np.uint8)
    model, norm = classifier.model, classifier.normalizer
    views = inference.Scoring(flip=True, shift=3)
    served = serving._load_pyfunc(str(serving.save(tmp_path / "views", model, norm,
                                                   tuple(classifier.classes), views)))
    assert served.scoring == views
    moved = [data.shift(pixels, dy, dx) for dy, dx in [(0, 0), (-3, 0), (3, 0), (0, -3), (0, 3)]]
    mean = np.mean([model.scores(norm(v, np.float64)) for m in moved
                    for v in (m, data.mirror(m))], axis=0)
    np.testing.assert_allclose(served.predict(pixels), serving.softmax(mean), rtol=1e-12)
    # an image and its mirror image are one input to a model that scores both
    flips = serving.PixelClassifier(model, norm, classifier.classes, inference.Scoring(True))
    np.testing.assert_allclose(flips.predict(data.mirror(pixels)), flips.predict(pixels),
                               rtol=1e-12)
    assert not np.allclose(classifier.predict(data.mirror(pixels)), classifier.predict(pixels))


def test_a_model_saved_before_its_scoring_was_scores_images_as_they_are(classifier, tmp_path):
    path = serving.save(tmp_path / "old", classifier.model, classifier.normalizer,
                        tuple(classifier.classes), inference.Scoring(flip=True, shift=2))
    (path / serving.SCORING_FILE).unlink()  # what a model logged before the file existed has
    assert serving._load_pyfunc(str(path)).scoring == inference.PLAIN
    pixels = np.random.default_rng(3).integers(0, 256, (3, 3072)).astype(np.uint8)
    np.testing.assert_array_equal(serving._load_pyfunc(str(path)).predict(pixels),
                                  classifier.predict(pixels))


def test_a_dark_uint8_batch_is_on_the_0_255_scale_whatever_its_values(classifier):
    assert classifier.predict(np.ones((1, 3072), np.uint8)).shape == (1, 10)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[MlflowClient, str]:
    tmp = tmp_path_factory.mktemp("store")
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return client, client.create_experiment("x", artifact_location=str(tmp / "artifacts"))


@pytest.mark.parametrize(("run", "model"), [
    ("relu-h100-lr1e-3-reg1e-4", "relu-h100-lr1e-3-reg1e-4"),
    ("reg=0.00507361 lr=0.0119698", "reg_0_00507361_lr_0_0119698"),  # an Optuna trial
    ("relu-h100-lr1e-3-reg1e-4-drop0.5", "relu-h100-lr1e-3-reg1e-4-drop0_5"),
    ("activation=tanh hidden_sizes=[100, 50]", "activation_tanh_hidden_sizes_100_50"),
    ("a/b:c%'\"", "a_b_c"),
    ("...", "model"),
])
def test_a_model_is_named_as_mlflow_accepts_whatever_the_run_name(store, run, model):
    assert names.model_name(run) == model
    client, experiment = store
    assert client.create_logged_model(experiment, name=model).name == model


def test_mlflow_refuses_a_dotted_run_name_as_a_model_name(store):
    client, experiment = store
    with pytest.raises(MlflowException, match="Invalid model name") as refusal:
        client.create_logged_model(experiment, name="reg=0.00507361 lr=0.0119698")
    assert recorder.refused(refusal.value)


def test_a_refusal_is_not_an_outage():
    assert recorder.refused(MlflowException("bad name", INVALID_PARAMETER_VALUE))
    assert not recorder.refused(MlflowException("database is down", INTERNAL_ERROR))
