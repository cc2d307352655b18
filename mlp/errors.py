"""The error a configuration value raises: it names the key, the value and what is allowed.
Its own module so that what checks a config (`config`, `budget`) can raise it without
importing each other."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value that is out of range or not one of the allowed choices."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={value!r} is not allowed: expected {allowed}")
        self.key = key
