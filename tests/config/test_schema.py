"""The schema defines each key once: its rules are read from its field, and every rule
refuses what it should, once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlp.config import schema as configlib
from mlp.config.command_line import OverrideError, check_command_line, split_modifiers
from mlp.errors import ConfigError


def test_rules_are_read_from_the_fields_each_key_spelled_once():
    source = Path(configlib.__file__).read_text()
    # No table keyed by dotted keys restates the fields: RULES, APPLIES_WHEN and
    # BOOKKEEPING are read from them.
    assert not re.search(r'^\s*"[a-z_]+\.[a-z_.]+": ', source, re.MULTILINE)
    for key in [*configlib.RULES, *configlib.APPLIES_WHEN]:
        assert f"    {key.rsplit('.', 1)[-1]}:" in source, key
    assert configlib.RULES["optim.lr"].text == "a finite number > 0"
    assert configlib.APPLIES_WHEN["optim.beta1"][0] == "optim.name"
    assert "trainer.resume" in configlib.BOOKKEEPING and "trial" in configlib.BOOKKEEPING


@pytest.mark.parametrize("key", sorted(configlib.RULES))
def test_each_rule_accepts_its_default(key: str):
    defaults = configlib.schema_keys()
    assert configlib.RULES[key](defaults[key]), key


def test_a_rule_refuses_a_value_of_another_type_instead_of_crashing():
    assert not configlib.RULES["optim.lr"]("fast")
    assert not configlib.RULES["model.hidden_sizes"](None)


def test_the_train_subset_is_null_or_a_positive_count():
    rule = configlib.RULES["trainer.train_eval_size"]
    assert rule(None) and rule(1) and rule(5000)
    assert not rule(0) and not rule(-3) and not rule("all")
    with pytest.raises(ConfigError, match=r"trainer\.train_eval_size=0 is not allowed: "
                                          r"expected null \(as many as data\.val_size\)"):
        check_command_line(["trainer.train_eval_size=0"])


def test_files_that_must_exist_are_checked_with_the_config(tmp_path: Path):
    cfg = configlib.schema_keys()
    for key in ("data.archive", "trainer.resume"):
        assert not configlib.RULES[key](str(tmp_path / "missing"))
        (tmp_path / "there").write_text("x")
        assert configlib.RULES[key](str(tmp_path / "there")) and configlib.RULES[key](None)
    with pytest.raises(ConfigError, match=r"data\.archive='/no/such\.tar\.gz'.*existing file"):
        configlib.validate(configlib.flatten({}) | _tree(cfg | {"data.archive": "/no/such.tar.gz"}))


def _tree(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def test_the_optuna_shorthands_are_split_off_after_a_call_only():
    assert split_modifiers("optim.lr=interval(1e-4, 1e-1) log") == (
        "optim.lr=interval(1e-4, 1e-1)", True, None)
    assert split_modifiers("model.pad=int(interval(0, 8)) step=2") == (
        "model.pad=int(interval(0, 8))", False, 2.0)
    assert split_modifiers("tracking.experiment=log") == ("tracking.experiment=log", False, None)


SIDE_DOORS = [  # (command line, what the message must say): each refused before Hydra
    (["data.augment.flip=2"], "data.augment.flip=2 is not allowed: expected true or false"),
    (["experiment=best_mlp", "data.augment.flip=yes"], "data.augment.flip='yes'"),
    (["data.augment.test_shift=17"],
     "data.augment.test_shift=17 is not allowed: expected an integer in [0, 16]"),
    (["data.augment.test_flip=maybe"], "data.augment.test_flip='maybe' is not allowed"),
    (["~model.reg"], "~model.reg is not allowed: expected a value for model.reg"),
    (["+hydra.launcher.n_job=2"], "hydra.launcher.n_job is not a setting of hydra/launcher=basic"),
    (["-m", "hydra/launcher=joblib", "hydra.launcher.n_job=2"], "did you mean n_jobs?"),
    (["-m", "optim.lr=interval(-1,1)"], "optim.lr=interval(-1,1) is not allowed: expected values"),
    (["-m", "hydra/sweeper=mlp_optuna", "optim.lr=interval(-1,1)"],
     "optim.lr=-1.0 is not allowed: expected a finite number > 0"),
    (["-m", "hydra/sweeper=mlp_optuna", "hydra.sweeper.n_trials=0"],
     "hydra.sweeper.n_trials=0 is not allowed: expected an integer > 0"),
    (["-m", "hydra.sweeper.params.model.activaton=relu,tanh"], "did you mean model.activation?"),
    (["-m", "optim.momentum=0.9,5"], "optim.momentum=5.0 is not allowed"),
    (["-m", "data.limit=3000", "model.activation=relu,tanh"],
     "data.val_size=5000 is not allowed: expected fewer images than data.limit=3000"),
    (["-m", "hparams_search=lr_reg", "optim.lr=1,-1"], "optim.lr=-1.0 is not allowed"),
    (["-m", "optim=sgd,adm"], "optim=adm is not an option of the config group optim"),
    (["optim.lr=1,2"], "optim.lr=1,2 is a sweep: add -m"),
    (["trainer.resume=/nonexistent.npz"], "trainer.resume='/nonexistent.npz' is not allowed"),
    (["hydra.job.chdir=maybe"],  # Hydra's own key: its message and the reason its cause gives
     "Error merging override hydra.job.chdir=maybe: Value 'maybe' is not a valid bool"),
]


@pytest.mark.parametrize(("argv", "says"), SIDE_DOORS)
def test_every_door_leads_to_the_schema(argv: list[str], says: str):
    with pytest.raises(ValueError) as refused:
        check_command_line(argv)
    assert says in str(refused.value)


def test_a_preset_in_a_config_dir_is_checked(tmp_path: Path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nmodel:\n  activaton: tanh\n")
    with pytest.raises(OverrideError, match=r"model\.activaton.*did you mean model\.activation"):
        check_command_line(["--config-dir", str(tmp_path), "experiment=mine"])
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ntrainer:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=r"trainer\.epochs=0"):
        check_command_line(["--config-dir", str(tmp_path), "experiment=mine"])


def test_a_sweep_beyond_the_cap_checks_each_value(caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch):
    from mlp.config import command_line

    monkeypatch.setattr(command_line, "MAX_COMBINATIONS", 3)
    check_command_line(["-m", "optim.lr=1e-3,1e-2", "model.reg=0,1e-3"])
    assert "each value is checked" in caplog.text
    with pytest.raises(ValueError, match=r"model\.reg=-1"):
        check_command_line(["-m", "optim.lr=1e-3,1e-2", "model.reg=0,-1"])
