"""The one schema: every config file composes, the schema's defaults are what a run with no
overrides uses, and every mistake on the command line is refused with the key named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from mlp.cli import train as cli
from mlp.config import schema as configlib
from mlp.config.command_line import groups

CONF = ROOT / "conf"
configlib.register()


def _compose(overrides: list[str]):
    with initialize_config_module(config_module="mlp.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _group_options() -> list[str]:
    return sorted(f"{p.parent.name}={p.stem}" for p in CONF.glob("*/*.yaml"))


def test_conf_has_the_groups_users_know():
    assert set(groups()) == {"model", "optim", "data", "experiment", "hparams_search", "debug"}
    assert groups()["hparams_search"] == ["activation", "best_mlp", "hidden", "lr_reg"]


@pytest.mark.parametrize("option", _group_options())
def test_every_config_file_composes_and_validates(option: str):
    cfg = _compose([option])
    configlib.validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)


def test_the_schema_defaults_are_what_a_run_without_overrides_uses():
    """Walk every key: conf/ overrides nothing of the schema by default."""
    composed = configlib.flatten(OmegaConf.to_container(_compose([]), resolve=True))
    schema = configlib.schema_keys()
    assert composed.keys() == schema.keys()
    for key, default in schema.items():
        assert composed[key] == default, key


def test_schema_defaults_come_from_the_code_they_configure():
    from mlp.core import optim
    from mlp.core.model import MLP
    from mlp.data import Normalizer
    from mlp.training.trainer import TrainSettings

    m = configlib.ModelConfig()
    net = MLP(input_dim=12, num_classes=3)
    assert (m.activation, m.loss, m.reg, tuple(m.hidden_sizes)) == (
        net.arch.activation, net.arch.loss, net.arch.reg, net.arch.hidden_sizes)
    assert configlib.DataConfig().normalize == Normalizer().mode
    assert configlib.TrainerConfig().epochs == TrainSettings().epochs
    assert configlib.OptimConfig().momentum == optim.make_optimizer("momentum", {}).momentum


def test_optimizer_groups_change_only_the_optimizer():
    base = configlib.flatten(OmegaConf.to_container(_compose([])))
    for option in groups()["optim"]:
        cfg = configlib.flatten(OmegaConf.to_container(_compose([f"optim={option}"])))
        changed = {k for k in cfg if cfg[k] != base[k]}
        assert changed <= {"optim.name", "optim.lr"}, (option, changed)


def test_presets_set_what_they_promise():
    cs = _compose(["experiment=cs231n_two_layer"])
    assert list(cs.model.hidden_sizes) == [100] and cs.optim.schedule.name == "exponential"
    small = _compose(["debug=overfit"])
    assert small.model.reg == 0 and small.data.limit <= 200
    sweep = _compose(["hparams_search=best_mlp"])
    assert list(sweep.model.hidden_sizes) == [1024, 1024]  # the experiment it searches around


def test_params_that_apply_depend_on_the_run():
    flat = configlib.schema_keys()
    assert configlib.applies("optim.momentum", flat)
    assert not configlib.applies("optim.beta1", flat)
    assert not configlib.applies("data.synthetic.n_train", flat)
    assert configlib.applies("data.synthetic.n_train", flat | {"data.name": "synthetic"})
    assert not configlib.applies("optim.schedule.decay", flat)
    assert configlib.is_bookkeeping("tracking.uri") and configlib.is_bookkeeping("data.archive")
    assert not configlib.is_bookkeeping("trainer.epochs")
    warnings = configlib.inactive_overrides(flat | {"optim.name": "sgd"}, ["optim.momentum"])
    assert warnings and "optim.momentum" in warnings[0] and "sgd" in warnings[0]


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
    ("model.label_smoothing=1.5", "model.label_smoothing"),
    ("trainer.ema=1.0", "trainer.ema"),
    ("trainer.ema_every=0", "trainer.ema_every"),
    ("optim.schedule.div_factor=0.5", "optim.schedule.div_factor"),
]


@pytest.mark.parametrize(("override", "key"), BAD)
def test_invalid_values_name_the_key(override: str, key: str):
    cfg = _compose([override])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        configlib.validate(cfg)
    assert "expected" in str(err.value) or "allowed" in str(err.value)


def test_a_batch_larger_than_the_training_split_is_refused():
    cfg = _compose(["data=synthetic", "trainer.batch_size=600"])
    with pytest.raises(ValueError, match=r"trainer\.batch_size=600.*at most the 500 images"):
        configlib.validate(cfg)


MISTAKES = [  # (command line, what the message must say)
    (["+model.activaton=tanh"], ["model.activaton", "did you mean model.activation?"]),
    (["model.activaton=tanh"], ["model.activaton", "did you mean model.activation?"]),
    (["++trainer.epoch=3"], ["trainer.epoch", "did you mean trainer.epochs?"]),
    (["model.hidden_sizes=abc"], ["model.hidden_sizes='abc'", "expected a list"]),
    (["trainer.epochs=1.5"], ["trainer.epochs=1.5", "expected an integer"]),
    (["optim.lr=fast"], ["optim.lr='fast'", "expected a number"]),
    (["optim.lr=-0.1"], ["optim.lr=-0.1", "expected a finite number > 0"]),
    (["model.activation=swish"], ["model.activation='swish'", "one of ['relu'"]),
    (["optim=adm"], ["optim=adm", "did you mean adam?"]),
    (["-m", "optim.lr=1e-3,abc"], ["optim.lr='abc'", "expected a number"]),
    (["-m", "model.activation=relu,tanhh"], ["model.activation='tanhh'", "one of"]),
    (["hparams_search=lr_reg"], ["hparams_search=lr_reg is a sweep: add -m"]),
    (["+trial.idd=3"], ["trial.idd", "trial.<storage|study|id>"]),
    (["model.label_smoothing=1.5"], ["model.label_smoothing=1.5", "expected a number in [0, 1)"]),
    (["trainer.ema=-0.5"], ["trainer.ema=-0.5", "expected a decay in [0, 1)"]),
]


@pytest.mark.parametrize(("argv", "says"), MISTAKES)
def test_command_line_mistakes_exit_2_naming_the_key(argv, says, monkeypatch, capsys,
                                                    tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mlp-train", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.train_main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for text in says:
        assert text in err, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def test_valid_command_lines_pass_the_check():
    from mlp.config.command_line import check_command_line

    for argv in (["model.hidden_sizes=[512,256]", "optim=adam", "data=synthetic"],
                 ["-m", "optim.lr=1e-3,1e-2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                 ["-m", "hparams_search=lr_reg"], ["--help"], ["+trial.id=3"],
                 ["-m", "hydra/sweeper=mlp_optuna", "model.reg=tag(log, interval(1e-6, 1e-2))"]):
        check_command_line(argv)


def test_every_example_of_the_help_passes_the_check(tmp_path: Path):
    """What `mlp-train --help` shows as examples runs (its placeholder archive, made real)."""
    import shlex

    from mlp.config.command_line import check_command_line

    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"")
    footer = OmegaConf.load(CONF / "config.yaml").hydra.help.footer
    examples = [line.split("(")[0].replace("/path/to/cifar-10-python.tar.gz", str(archive))
                for line in footer.splitlines() if line.strip().startswith("mlp-train ")]
    assert len(examples) >= 5, footer
    for example in examples:
        check_command_line(shlex.split(example)[1:])


@pytest.mark.e2e
def test_the_installed_command_refuses_a_typo(tmp_path: Path, run_env):
    from conftest import tool

    out = subprocess.run([tool("mlp-train"), "+model.activaton=tanh"], cwd=tmp_path,
                         env=run_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "did you mean model.activation?" in out.stderr
    helped = subprocess.run([tool("mlp-gradcheck"), "--help"], cwd=tmp_path, env=run_env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith("mlp-gradcheck:")
