"""Command-line overrides checked against the schema before Hydra composes anything.

Hydra accepts `+model.activaton=tanh` (a new key: the typo trains the default) and
reports a wrong type with OmegaConf's internal text and exit 1. `check_command_line`
reads the overrides as Hydra will and refuses, with a message that names the key, the value and
what is allowed (and the closest valid key or option for a typo): unknown keys with or
without `+` (except the declared extension nodes of `config.EXTENSIONS`), unknown options
of a config group, values of the wrong type or out of range (each value of a sweep), and
a sweep preset (`hparams_search=...`) run without `-m`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import nodes as onodes
from omegaconf.errors import OmegaConfBaseException

from mlp.config import schema as configlib

CONF_PACKAGE = "mlp.conf"
SWEEP_GROUP = "hparams_search"


class OverrideError(ValueError):
    """An override the configuration cannot take."""


def groups(extra: Iterable[str] = ()) -> dict[str, list[str]]:
    """The config groups under `conf/` and their options: {"optim": ["adam", ...], ...},
    with those of the `extra` search path entries (`file://dir`, `pkg://module`, a
    directory), as Hydra adds them for `hydra.searchpath=[...]` or `--config-dir`."""
    roots = [resources.files(CONF_PACKAGE)]
    for entry in extra:
        if entry.startswith("pkg://"):
            roots.append(resources.files(entry.removeprefix("pkg://").replace("/", ".")))
        elif Path(entry.removeprefix("file://")).is_dir():
            roots.append(Path(entry.removeprefix("file://")))
    found: dict[str, set[str]] = {}
    for root in roots:
        for d in root.iterdir():
            if d.is_dir() and not d.name.startswith(("_", ".")):
                found.setdefault(d.name, set()).update(
                    f.name.removesuffix(".yaml") for f in d.iterdir() if f.name.endswith(".yaml"))
    return {name: sorted(options) for name, options in found.items()}


def _nodes(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of cfg, inner nodes included."""
    keys = []
    for key in cfg:
        name = f"{prefix}{key}"
        keys.append(name)
        child = cfg._get_node(key)
        if isinstance(child, DictConfig):
            keys += _nodes(child, name + ".")
    return keys


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _expected(node: Any) -> str:
    """What a schema node takes, in words."""
    if isinstance(node, ListConfig):
        return "a list such as [100] or [512,256]"
    kinds = {onodes.IntegerNode: "an integer", onodes.FloatNode: "a number",
             onodes.BooleanNode: "true or false", onodes.StringNode: "a string"}
    text = next((t for k, t in kinds.items() if isinstance(node, k)), "a value")
    return text + (" or null" if node._is_optional() else "")


def _values(override: Override) -> list[Any]:
    """The values an override sets: one, or each value of a choice/range sweep (an
    interval sweep is checked by the sweeper)."""
    if not override.is_sweep_override():
        return [override.value()]
    try:
        return list(override.sweep_iterator())
    except HydraException:
        return []


def _check_group(override: Override, options: list[str]) -> None:
    group = override.key_or_group
    for value in _values(override):
        if value is not None and str(value) not in options:
            raise OverrideError(f"{group}={value} is not an option of the config group {group}: "
                                f"expected one of {options}{_suggest(str(value), options)}")


def _check_value(schema: DictConfig, key: str, value: Any) -> None:
    node = _node(schema, key)
    trial = schema.copy()
    try:
        OmegaConf.update(trial, key, value, merge=False)
        converted = OmegaConf.select(trial, key)
        if isinstance(converted, DictConfig | ListConfig):
            converted = OmegaConf.to_container(converted)
    except OmegaConfBaseException:
        raise OverrideError(f"{key}={value!r} is not allowed: expected {_expected(node)}") from None
    rule = configlib.RULES.get(key)
    if rule is not None:
        ok, allowed = rule
        try:
            fine = ok(converted)
        except TypeError:
            fine = False
        if not fine:
            raise OverrideError(f"{key}={value!r} is not allowed: expected {allowed}")


def _node(cfg: DictConfig, key: str) -> Any:
    parent, _, leaf = key.rpartition(".")
    return (OmegaConf.select(cfg, parent) if parent else cfg)._get_node(leaf)


def _check_key(schema: DictConfig, keys: list[str], override: Override) -> None:
    key = override.key_or_group
    if override.type == OverrideType.DEL:
        if key not in keys:
            raise OverrideError(f"~{key}: no such key{_suggest(key, keys)}")
        return
    head = key.split(".", 1)[0]
    if head in configlib.EXTENSIONS and override.type in (OverrideType.ADD,
                                                          OverrideType.FORCE_ADD):
        fields = list(configlib.EXTENSIONS[head].__dataclass_fields__)
        if key.partition(".")[2] not in fields:
            raise OverrideError(f"{key} is not a key of the {head} extension: expected "
                                f"{head}.<{'|'.join(fields)}>")
        return
    if key not in keys:
        raise OverrideError(f"{key} is not a configuration key{_suggest(key, keys)} "
                            "(the keys and their defaults: mlp-train --cfg job)")
    for value in _values(override):
        _check_value(schema, key, value)


def check_command_line(argv: list[str]) -> None:
    """Raise OverrideError for the first override in `argv` (a command line after the
    program name) that the configuration cannot take."""
    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException as e:
        raise OverrideError(f"cannot read the overrides: {e}") from None
    schema = OmegaConf.structured(configlib.Config)
    keys = _nodes(schema)
    search = [args.config_dir] if args.config_dir else []
    for override in overrides:
        if override.key_or_group == "hydra.searchpath" and not override.is_sweep_override():
            search += [str(entry) for entry in override.value() or []]
    known_groups = groups(search)
    for override in overrides:
        key = override.key_or_group
        if key.startswith(("hydra.", "hydra/")) or key == "hydra":
            continue  # Hydra's own settings: Hydra checks them
        if key in known_groups:
            _check_group(override, known_groups[key])
            if key == SWEEP_GROUP and not args.multirun and override.value() is not None:
                raise OverrideError(f"{key}={override.value()} is a sweep: add -m "
                                    f"(mlp-train -m {key}={override.value()} ...)")
            continue
        if "/" in key:
            continue  # a nested group such as optim/schedule: Hydra lists its options
        _check_key(schema, keys, override)
