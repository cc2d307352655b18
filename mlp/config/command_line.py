"""A command line checked against the schema before Hydra creates anything.

`check_command_line` composes the config the command line asks for, with Hydra's compose
API (the same config files, `--config-dir`, `--config-name`, `hydra.searchpath`, presets
and `~`/`+`/`++` overrides as the run), expands its sweep (the command line's sweep
overrides and the sweeper's `params`, the Optuna sweeper's included: every value of
`a,b`, `choice()`, `range()`, `glob()`, both ends of `interval()`) and checks every
combination: keys the schema does not have, deleted keys, booleans that are not
true/false, values of the wrong type, then `schema.validate` (ranges, choices, the rules
between keys, files that must exist). Hydra's own keys that users set are checked too:
`hydra.launcher.*` and `hydra.sweeper.*` against the chosen plugin's registered config,
and the sweeper's settings by the sweeper itself. The first problem raises OverrideError
naming the key, the value and what is allowed (the closest valid key for a typo); then
`mlp-train` exits 2 before a directory, a store or a job exists.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra._internal.utils import get_args_parser  # Hydra's own flags: no public API
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    Glob,
    IntervalSweep,
    Override,
    RangeSweep,
)
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import nodes as onodes
from omegaconf.errors import OmegaConfBaseException

from mlp.config import schema as configlib
from mlp.errors import ConfigError

log = logging.getLogger("mlp")

CONF_PACKAGE = "mlp.conf"
SWEEP_GROUP = "hparams_search"
PARAMS = "hydra.sweeper.params"
# The sweepers that walk a grid (they cannot sample an interval): Hydra's own and mlp-lab's
# default, the same grid composed once per job (hydra_plugins/mlp_grid_sweeper).
GRID_SWEEPERS = ("basic", "mlp_grid")
_PLUGIN_KEYS = ("hydra.launcher.", "hydra.sweeper.", "+hydra.launcher.", "+hydra.sweeper.")
# Every combination of a sweep is checked whole up to this many (a typical grid has fewer
# than 100, and each costs ~1 ms; a group swept costs a composition, ~0.2 s); beyond, each
# value is checked with the others at their first value, and a warning says so.
MAX_COMBINATIONS = 1000
_MODIFIER = re.compile(r"\s+(log|step=\S+)\s*$")


class OverrideError(ValueError):
    """An override, or a composed config, that the schema refuses."""


def split_modifiers(entry: str) -> tuple[str, bool, float | None]:
    """(`key=expression`, log, step) of a search-space entry of the Optuna sweeper, whose
    shorthands `log` / `step=S` may follow a function call: `interval(1e-4, 1e-1) log`."""
    log_, step = False, None
    while (m := _MODIFIER.search(entry)) and entry[:m.start()].rstrip().endswith(")"):
        word = m.group(1)
        if word == "log":
            log_ = True
        else:
            step = float(word.removeprefix("step="))
        entry = entry[:m.start()].rstrip()
    return entry, log_, step


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


def _node(cfg: DictConfig, key: str) -> Any:
    parent, _, leaf = key.rpartition(".")
    return (OmegaConf.select(cfg, parent) if parent else cfg)._get_node(leaf)


def _leaves(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a typed config."""
    keys = []
    for key in cfg:
        child = cfg._get_node(key)
        if isinstance(child, DictConfig):
            keys += _leaves(child, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


class _Schema:
    """The typed schema and its leaf keys (with those of the extension nodes)."""

    def __init__(self) -> None:
        self.typed = OmegaConf.structured(configlib.Config)  # also a scratch pad: _converted
        self._memo: dict[tuple, Any] = {}
        self.keys = _leaves(self.typed)
        self.extension_keys = [f"{name}.{f}" for name, node in configlib.EXTENSIONS.items()
                               for f in node.__dataclass_fields__]

    def check_key(self, key: str, where: str = "") -> None:
        """Refuse a key the schema does not have, naming the closest one."""
        head = key.split(".", 1)[0]
        if head in configlib.EXTENSIONS:
            if key not in self.extension_keys:
                fields = list(configlib.EXTENSIONS[head].__dataclass_fields__)
                raise OverrideError(f"{key} is not a key of the {head} extension: expected "
                                    f"{head}.<{'|'.join(fields)}>")
            return
        nodes = {k.rsplit(".", i)[0] for k in self.keys for i in range(k.count(".") + 1)}
        if key not in nodes:
            raise OverrideError(f"{where}{key} is not a configuration key"
                                f"{_suggest(key, sorted(nodes))} (the keys and their "
                                "defaults: mlp-train --cfg job)")

    def check(self, values: dict[str, Any]) -> None:
        """Check a composed config (plain, resolved, Hydra's node removed) whatever set its
        values: keys, deletions, booleans, types, then the schema's rules."""
        flat = configlib.flatten({k: v for k, v in values.items()
                                  if k not in configlib.EXTENSIONS})
        for key in flat:
            if key not in self.keys:
                self.check_key(key)
        typed: dict[str, Any] = {}
        for key in self.keys:
            if key not in flat:
                raise OverrideError(f"~{key} is not allowed: expected a value for {key} "
                                    "(a key of the schema cannot be deleted; set it instead)")
            typed[key] = self._converted(key, flat[key])
        for name, node in configlib.EXTENSIONS.items():
            if name in values:
                try:
                    OmegaConf.merge(OmegaConf.structured(node), values[name])
                except OmegaConfBaseException as e:
                    raise OverrideError(f"{name}: {e.msg}") from None
        configlib.validate(typed)

    def _converted(self, key: str, value: Any) -> Any:
        """The value as the typed schema holds it (1 -> 1.0 for a number), or ConfigError
        naming the type; remembered per (key, value), as a sweep repeats them."""
        memo = (key, type(value), repr(value))
        if memo not in self._memo:
            node = _node(self.typed, key)
            # OmegaConf reads 2, "yes" or "on" as true: a typo would train with the option on.
            if isinstance(node, onodes.BooleanNode) and not isinstance(value, bool):
                raise ConfigError(key, value, "true or false")
            parent, _, leaf = key.rpartition(".")
            holder = OmegaConf.select(self.typed, parent) if parent else self.typed
            try:
                holder[leaf] = value
            except OmegaConfBaseException:
                raise ConfigError(key, value, _expected(node)) from None
            converted = holder[leaf]
            if isinstance(converted, ListConfig):
                converted = OmegaConf.to_container(converted)
            self._memo[memo] = converted
        return self._memo[memo]


@contextmanager
def _raw_composition() -> Iterator[None]:
    """Compose with the schema's defaults untyped, so that a value reaches the check as
    written (OmegaConf would turn 2 into true and refuse a deleted key with its own
    text); the typed schema is registered again after."""
    raw = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(configlib.Config)))
    ConfigStore.instance().store(name=configlib.SCHEMA_NAME, node=raw)
    try:
        yield
    finally:
        configlib.register()


@contextmanager
def _hydra(config_path: str | None) -> Iterator[None]:
    """Hydra initialized as `mlp-train` initializes it: `pkg://mlp.conf`, or the primary
    config directory of `--config-path`."""
    GlobalHydra.instance().clear()
    if config_path:
        init = initialize_config_dir(config_dir=str(Path(config_path).resolve()),
                                     version_base="1.3")
    else:
        init = initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3")
    with init:
        yield


def groups(extra: Iterable[str] = (), primary: str | None = None) -> dict[str, list[str]]:
    """The config groups of the primary config directory (`conf/`, or `primary`) and of
    the `extra` search path entries (`file://dir`, `pkg://module`, a directory), as Hydra
    adds them for `hydra.searchpath=[...]` or `--config-dir`, with their options:
    {"optim": ["adam", ...], ...}."""
    roots = [Path(primary) if primary else resources.files(CONF_PACKAGE)]
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


def _check_group(group: str, value: Any, options: list[str]) -> None:
    if value is not None and str(value) not in options:
        raise OverrideError(f"{group}={value} is not an option of the config group {group}: "
                            f"expected one of {options}{_suggest(str(value), options)}")


def _check_plugin(hydra_cfg: DictConfig, kind: str) -> None:
    """Refuse a key of `hydra.<kind>` (launcher, sweeper) that the chosen plugin's
    registered config does not have (`+hydra.launcher.n_job=2` would be ignored)."""
    choice = hydra_cfg.runtime.choices.get(f"hydra/{kind}")
    store = ConfigStore.instance()
    try:
        reference = store.load(f"hydra/{kind}/{choice}.yaml").node
    except (OSError, HydraException):
        return  # a plugin config from a YAML file of the user's: Hydra types it
    _same_keys(hydra_cfg[kind], reference, f"hydra.{kind}", f"hydra/{kind}={choice}")


def _same_keys(cfg: DictConfig, reference: DictConfig, prefix: str, plugin: str) -> None:
    for key in cfg:
        if key not in reference:
            known = [str(k) for k in reference]
            raise OverrideError(f"{prefix}.{key} is not a setting of {plugin}: expected one "
                                f"of {known}{_suggest(str(key), known)}")
        child = reference._get_node(key)
        if isinstance(child, DictConfig) and is_dataclass(OmegaConf.get_type(child)) \
                and isinstance(cfg[key], DictConfig):
            _same_keys(cfg[key], child, f"{prefix}.{key}", plugin)


def _values(override: Override, options: list[str] | None, intervals: bool) -> list[Any]:
    """The values a sweep override gives its key or group: each value of a list, choice,
    range or glob; both ends of an interval (what a sampler may reach)."""
    value = override.value()
    key = override.key_or_group
    if isinstance(value, IntervalSweep):
        if not intervals:
            raise OverrideError(
                f"{key}={override.input_line.partition('=')[2]} is not allowed: expected "
                "values a grid can list (a,b, choice(), range()); interval() is sampled by "
                "hydra/sweeper=mlp_optuna")
        return [value.start, value.end]
    if isinstance(value, Glob):
        if options is None:
            raise OverrideError(f"{key}: glob() selects options of a config group")
        return value.filter(options)
    if isinstance(value, ChoiceSweep | RangeSweep):
        return list(override.sweep_iterator())
    return [value]


def _dimensions(sweeps: list[Override], groups_: dict[str, list[str]], schema: _Schema,
                intervals: bool) -> dict[str, list[Any]]:
    """{key or group: its values} of the sweep; a later entry for a key wins."""
    dims: dict[str, list[Any]] = {}
    for override in sweeps:
        key = override.key_or_group
        if key in groups_:
            values = _values(override, groups_[key], intervals)
            for value in values:
                _check_group(key, value, groups_[key])
        else:
            schema.check_key(key.lstrip("+~"))
            values = _values(override, None, intervals)
        dims[key] = values
    return dims


def _combinations(dims: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the sweep, or, beyond MAX_COMBINATIONS, each value with the
    other keys at their first value."""
    total = 1
    for values in dims.values():
        total *= len(values)
    if total <= MAX_COMBINATIONS:
        return [dict(zip(dims, combo, strict=True)) for combo in itertools.product(*dims.values())]
    log.warning("the sweep has %d combinations: each value is checked with the other keys at "
                "their first value, not every combination (more than %d)", total,
                MAX_COMBINATIONS)
    first = {key: values[0] for key, values in dims.items()}
    return [first | {key: value} for key, values in dims.items() for value in values]


def _parse(lines: list[str]) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(lines)
    except HydraException as e:
        raise OverrideError(f"cannot read the overrides: {e}") from None


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        # Hydra's "Error merging override k=v" names no reason: its cause does (the type or
        # values the key allows)
        why = [str(c).splitlines()[0] for c in (e, e.__cause__) if c is not None and str(c)]
        raise OverrideError(": ".join(why)) from None


@dataclass(frozen=True)
class Checked:
    """What a checked command line asks for: its composed config (a sweep's: the `hydra`
    node holds the launcher the jobs will go through, for the launcher's own checks),
    whether it is a sweep (`-m`) or one run, and whether it runs it (not with --cfg, which
    prints the config)."""

    config: DictConfig
    sweep: bool
    runs: bool


def check_command_line(argv: list[str], config_name: str = "config") -> Checked | None:
    """Raise OverrideError for the first problem of the configuration(s) that `argv` (a
    command line after the program name) asks for; see the module docstring. Returns what
    it composed (`Checked`), or None for a command line that composes nothing (--help,
    --hydra-help, --info, shell completion)."""
    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return None
    overrides = _parse(args.overrides)
    config_name = args.config_name or config_name
    schema = _Schema()
    fixed, sweeps = [], []
    for override in overrides:
        key = override.key_or_group
        if key.startswith(PARAMS + "."):
            param = key.removeprefix(PARAMS + ".")
            schema.check_key(param, where=f"{PARAMS}.")
            raise OverrideError(f"{key}={override.input_line.partition('=')[2]} is not "
                                f"allowed: expected {param}=<values> on the command line "
                                f"(Hydra sweeps no hydra.* key), or {PARAMS} in a preset")
        if override.is_sweep_override():
            if not args.multirun:
                raise OverrideError(f"{override.input_line} is a sweep: add -m")
            sweeps.append(override)
        else:
            fixed.append(override)
    search = [str(p) for o in fixed if o.key_or_group == "hydra.searchpath"
              for p in (o.value() or [])]
    extra = [o.input_line for o in fixed]
    if args.config_dir:
        search.append(f"file://{Path(args.config_dir).resolve()}")
        extra = [o for o in extra if not o.startswith("hydra.searchpath=")]
        extra.append(f"hydra.searchpath=[{','.join(search)}]")
    groups_ = groups(search, args.config_path)
    for override in fixed:
        key = override.key_or_group
        if key in groups_:
            _check_group(key, override.value(), groups_[key])
            if key == SWEEP_GROUP and not args.multirun and override.value() is not None:
                raise OverrideError(f"{key}={override.value()} is a sweep: add -m "
                                    f"(mlp-train -m {key}={override.value()} ...)")
        elif not key.startswith("hydra") and "/" not in key:
            schema.check_key(key)
    with _hydra(args.config_path), _raw_composition():
        try:
            base = _compose(config_name, extra)
        except OverrideError:
            # Hydra's text for `hydra.launcher.n_job=2` does not say what the launcher takes:
            # composed with it forced in, the plugin's check names the key.
            forced = ["++" + line.lstrip("+") if line.startswith(_PLUGIN_KEYS) else line
                      for line in extra]
            loose = _compose(config_name, forced)
            for kind in ("launcher", "sweeper"):
                _check_plugin(loose.hydra, kind)
            raise
        for kind in ("launcher", "sweeper"):
            _check_plugin(base.hydra, kind)
        if not args.multirun:
            schema.check(_user_part(base))
            return Checked(base, sweep=False, runs=not args.cfg)
        _check_sweep(config_name, extra, base, sweeps, groups_, schema)
        return Checked(base, sweep=True, runs=not args.cfg)


def _check_sweep(config_name: str, extra: list[str], base: DictConfig, sweeps: list[Override],
                 groups_: dict[str, list[str]], schema: _Schema) -> None:
    """Every combination of a sweep (`-m`): the sweeper's settings (checked by the sweeper
    itself), then its params with the command line's sweep overrides (which win)."""
    sweeper = OmegaConf.to_container(base.hydra.sweeper, resolve=True)
    # A sweeper's constructor checks its settings; a grid sweeper's settings are typed by
    # its structured config, checked above (and Hydra's refuses to be built from a config).
    chosen_sweeper = base.hydra.runtime.choices.get("hydra/sweeper")
    if chosen_sweeper not in GRID_SWEEPERS:
        try:
            instantiate(OmegaConf.create(sweeper))
        except InstantiationException as e:
            raise OverrideError(str(e.__cause__ or e)) from None
    params = sweeper.get("params") or {}
    entries = []
    for key, expression in params.items():
        schema_key = str(key).lstrip("+~")
        if str(key) not in groups_:
            schema.check_key(schema_key, where=f"{PARAMS}.")
        line = f"{key}={expression}"
        entries.append(split_modifiers(line)[0] if chosen_sweeper == "mlp_optuna" else line)
    dims = _dimensions([*_parse(entries), *sweeps], groups_, schema,
                       intervals=chosen_sweeper not in GRID_SWEEPERS)
    composed: dict[tuple, dict[str, Any]] = {}
    for combo in _combinations(dims):
        chosen = tuple((k, str(v)) for k, v in combo.items() if k in groups_)
        if chosen not in composed:
            composed[chosen] = _user_part(_compose(config_name, [
                *extra, *(f"{k}={v}" for k, v in chosen)]) if chosen else base, resolve=False)
        cfg = copy.deepcopy(composed[chosen])
        for key, value in combo.items():
            if key not in groups_:
                _set(cfg, key.lstrip("+~"), value)
        try:
            schema.check(OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
        except ValueError as e:
            swept = " ".join(f"{k}={v}" for k, v in combo.items())
            raise OverrideError(f"{e} (in the sweep's combination {swept})") from None


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree[a][b] = value for key "a.b" (a dict value merged into a dict, as Hydra does)."""
    *parents, leaf = key.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
    if isinstance(value, dict) and isinstance(tree.get(leaf), dict):
        tree[leaf] = OmegaConf.to_container(OmegaConf.merge(tree[leaf], value))
    else:
        tree[leaf] = value


def _user_part(cfg: DictConfig, resolve: bool = True) -> dict[str, Any]:
    """The composed config without Hydra's node, as plain values."""
    user = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_container(user, resolve=resolve)
