"""The search space: Hydra override syntax -> Optuna distributions, and a trial -> overrides.

Every entry is read by Hydra's own override parser (`hydra.core.override_parser`), so the
syntax is Hydra's sweep syntax; a trailing `log` or `step=S` after a function call is this
sweeper's shorthand (`interval(1e-4, 1e-1) log` = `tag(log, interval(1e-4, 1e-1))`).
A sweep becomes an Optuna distribution, anything else is a fixed override that every
trial gets unchanged. A later entry for the same key replaces an earlier one, so the
command line wins over `hydra.sweeper.params`.

(Module name with a leading underscore: Hydra's plugin scan skips it, so Optuna is
imported only when a sweep starts.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from mlp.config.command_line import split_modifiers


class SearchSpaceError(ValueError):
    """An entry of the search space that cannot be turned into a distribution."""


@dataclass
class SearchSpace:
    """distributions: Optuna's, by override key (`optim.lr`, `model`, `+extra`);
    fixed: whole override strings by key, passed to every trial."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)


def parse_search_space(entries: Iterable[str]) -> SearchSpace:
    """`key=expression` strings (from hydra.sweeper.params, then the command line) -> the
    search space. Raise SearchSpaceError naming the entry that cannot be used."""
    parser = OverridesParser.create()
    space = SearchSpace()
    for entry in entries:
        try:
            expression, log, step = split_modifiers(entry)
            override = parser.parse_override(expression)
            key = override.get_key_element()
            space.distributions.pop(key, None)
            space.fixed.pop(key, None)
            if override.is_sweep_override():
                space.distributions[key] = _distribution(override, log, step)
            elif log or step is not None:
                raise SearchSpaceError("`log` and `step=` apply to interval(...) and range(...)")
            else:
                space.fixed[key] = expression
        except (ValueError, HydraException) as e:
            raise SearchSpaceError(f"search space entry {entry!r}: {e}") from e
    return space


def trial_overrides(space: SearchSpace, params: dict[str, Any]) -> list[str]:
    """The overrides of one trial: the fixed ones, then `key=value` for every sampled
    parameter (numbers as Python prints them, choices as written: `[512,256]`, `relu`)."""
    return [*space.fixed.values(), *(f"{key}={params[key]}" for key in space.distributions)]


def _distribution(override: Override, log: bool, step: float | None) -> BaseDistribution:
    value = override.value()
    log = log or "log" in getattr(value, "tags", ())
    if isinstance(value, ChoiceSweep):
        if log or step is not None:
            raise SearchSpaceError("`log` and `step=` do not apply to choice(...)")
        return CategoricalDistribution([_choice(x) for x in value.list])
    if isinstance(value, RangeSweep):
        if step is not None:
            raise SearchSpaceError("range(start, stop, step) takes its step as an argument")
        values = list(value.range())
        if not values:
            raise SearchSpaceError("the range is empty")
        low, high, step = min(values), max(values), abs(value.step)
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(low, high, log=log, step=step)
        return FloatDistribution(low, high, log=log, step=step)
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            if step is not None and not step.is_integer():
                raise SearchSpaceError(f"an int interval needs an integer step, not {step:g}")
            return IntDistribution(value.start, value.end, log=log,
                                   step=1 if step is None else int(step))
        return FloatDistribution(value.start, value.end, log=log, step=step)
    raise SearchSpaceError(f"{type(value).__name__} is not supported: list the choices")


def _choice(element: Any) -> Any:
    """A categorical choice: numbers stay numbers, everything else (lists, strings, bools,
    null) becomes its override string, which Optuna can store and Hydra parses back."""
    if isinstance(element, int | float) and not isinstance(element, bool):
        return element
    return Transformer.str(element)
