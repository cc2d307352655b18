"""mlp/budget.py: the memory estimate counts what the real objects allocate, and `check`
refuses configs that cannot fit or whose batch is larger than the training split."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from mlp.config.schema import Config, ConfigError, flatten
from mlp.core import optim
from mlp.core.model import MLP
from mlp.training import budget

SPLITS = {"n_train": 540, "n_val": 60, "n_test": 200}


def default_config(**changes) -> dict:
    """The flattened default config with `changes` ({"model.hidden_sizes": [...]})."""
    flat = flatten(OmegaConf.to_container(OmegaConf.structured(Config())))
    assert changes.keys() <= flat.keys()
    return flat | changes


@pytest.mark.parametrize(("hidden", "activation", "norm", "dtype"), [
    ([100], "relu", None, "float32"),
    ([64, 32], "maxout", None, "float64"),
    ([50, 40], "maxout", "batch", "float32"),
    ([30], "tanh", "layer", "float32"),
    ([], "relu", None, "float32"),
])
def test_parameters_are_counted_as_the_model_allocates_them(hidden, activation, norm, dtype):
    model = MLP(hidden_sizes=hidden, activation=activation, norm=norm, dtype=dtype)
    params = sum(a.nbytes for a in model.params.values())
    stats = sum(a.nbytes for a in model.buffers.values())
    found = budget.estimate(hidden, batch_size=10, activation=activation, norm=norm,
                            dtype=dtype, optimizer="sgd", health=False, **SPLITS)
    assert found.parts["parameters and gradients"] == 2 * params + stats
    assert found.parts["best parameters and health snapshot"] == params + stats


@pytest.mark.parametrize("name", list(optim.OPTIMIZERS))
def test_optimizer_state_matches_each_rule(name: str):
    model = MLP(hidden_sizes=[40, 20])
    state = optim.make_optimizer(name, model.params).state
    found = budget.estimate([40, 20], batch_size=10, optimizer=name, **SPLITS)
    # the live state and the copy a checkpoint takes of it
    assert found.parts["optimizer state"] == 2 * sum(a.nbytes for a in state.values())


def test_activations_grow_with_the_batch_and_data_with_the_images():
    small = budget.estimate([100], batch_size=100, **SPLITS)
    large = budget.estimate([100], batch_size=200, **SPLITS)
    assert large.parts["activations and gradients"] > small.parts["activations and gradients"]
    assert large.parts["input batches"] == 2 * small.parts["input batches"]
    # train, validation, test, and the train subset evaluated each epoch: as many as validation
    assert small.parts["data (uint8)"] == (540 + 60 + 200 + 60) * budget.INPUT_DIM


def test_a_huge_layer_is_refused_naming_model_hidden_sizes():
    c = default_config(**{"model.hidden_sizes": [10_000_000]})
    with pytest.raises(ConfigError, match=r"model.hidden_sizes=\[10000000\].*needs about") as e:
        budget.check(c, available=16 * 2**30)
    assert e.value.key == "model.hidden_sizes"
    assert "16 GiB of memory available" in str(e.value)


def test_a_huge_batch_is_refused_naming_trainer_batch_size():
    c = default_config(**{"trainer.batch_size": 40_000, "trainer.eval_batch_size": 40_000,
                          "model.hidden_sizes": [20_000]})
    with pytest.raises(ConfigError) as e:
        budget.check(c, available=8 * 2**30)
    assert e.value.key == "trainer.batch_size"


def test_a_batch_larger_than_the_training_split_is_refused():
    c = default_config(**{"data.name": "synthetic", "data.synthetic.n_train": 600,
                          "data.val_size": 100, "trainer.batch_size": 501})
    with pytest.raises(ConfigError, match="at most the 500 images of the training split"):
        budget.check(c, available=2**40)
    budget.check(c | {"trainer.batch_size": 500}, available=2**40)
    full = default_config(**{"data.name": "cifar10", "trainer.batch_size": 45_001})
    with pytest.raises(ConfigError, match=f"at most the {50_000 - full['data.val_size']} "):
        budget.check(full, available=2**40)


def test_the_default_config_fits_and_the_estimate_is_returned():
    found = budget.check(default_config(), available=2 * 2**30)
    assert 0 < found.total < 2 * 2**30
    assert found.describe().startswith(budget.gib(found.total))


def test_available_memory_is_read_from_the_machine():
    assert budget.available_bytes() > 0
    assert np.issubdtype(type(budget.available_bytes()), np.integer)
