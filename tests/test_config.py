"""Every config file composes, and every invalid value is named in a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from mlp import config as configlib

CONF = Path(__file__).resolve().parents[1] / "conf"
configlib.register()


def _compose(overrides: list[str]):
    with initialize_config_module(config_module="mlp.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _group_options() -> list[str]:
    return sorted(f"{p.parent.name}={p.stem}" for p in CONF.glob("*/*.yaml"))


def test_conf_has_every_group():
    groups = {p.parent.name for p in CONF.glob("*/*.yaml")}
    assert groups == {"model", "optim", "data", "experiment"}


@pytest.mark.parametrize("option", _group_options())
def test_every_config_file_composes_and_validates(option: str):
    cfg = _compose([option])
    configlib.validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)


def test_defaults_follow_the_configuration_contract():
    cfg = _compose([])
    assert cfg.model.hidden_sizes == [100]
    assert cfg.trainer.dtype == "float32"
    assert cfg.data.val_size == 5000
    assert cfg.data.archive is None
    assert cfg.tracking.uri is None
    for key in ("model.activation", "model.reg", "model.loss", "optim.name", "optim.lr",
                "trainer.epochs", "trainer.batch_size", "data.limit", "seed",
                "tracking.experiment"):
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None or key == "data.limit"


def test_archive_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLP_LAB_ARCHIVE", "/some/cifar.tar.gz")
    assert _compose([]).data.archive == "/some/cifar.tar.gz"


def test_presets_set_what_they_promise():
    cs = _compose(["experiment=cs231n_two_layer"])
    assert list(cs.model.hidden_sizes) == [100] and cs.model.activation == "relu"
    small = _compose(["experiment=overfit_small"])
    assert small.model.reg == 0 and small.data.limit <= 200


def test_wrong_type_is_rejected_by_the_schema():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"optim\.lr"):
        _compose(["optim.lr=fast"])


BAD = [
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-3", "optim.lr"),
    ("model.reg=-0.1", "model.reg"),
    ("model.hidden_sizes=[100,0]", "model.hidden_sizes"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("model.activation=swish", "model.activation"),
    ("optim.name=lbfgs", "optim.name"),
    ("model.loss=hinge2", "model.loss"),
    ("data.limit=100", "data.val_size"),
    ("data.normalize=zca", "data.normalize"),
    ("optim.schedule.name=warm", "optim.schedule.name"),
    ("trainer.dtype=float16", "trainer.dtype"),
    ("optim.momentum=1.5", "optim.momentum"),
    ("data.md5=xyz", "data.md5"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.norm=group", "model.norm"),
]


@pytest.mark.parametrize(("override", "key"), BAD)
def test_invalid_values_name_the_key(override: str, key: str):
    cfg = _compose([override])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        configlib.validate(cfg)
    assert "expected" in str(err.value) or "allowed" in str(err.value)
