"""Secrets kept out of what a run records: passwords in URIs and in the environment, masked.

A team's tracking URI may carry a password (`postgresql://mlflow:pw@db/mlflow`,
`https://user:pw@mlflow.example`, `...?token=...`), and MLflow's client reads others from the
environment (MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN; PostgreSQL's PGPASSWORD;
compose's POSTGRES_PASSWORD). Whatever mlp-lab writes (params, tags, artifacts, stdout, logs,
mlflow_parent.json) goes through `mask_uri` or `mask_text` first, so that those values appear
only as `***`. Pure string functions: no MLflow, no files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote

MASK = "***"

# Environment variables whose whole value is a secret.
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD",
              "POSTGRES_PASSWORD")
# Environment variables holding a URI that may carry a password or a token.
URI_ENV = ("MLFLOW_TRACKING_URI",)
# Query parameters whose value is a secret (compared in lower case).
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "access_token", "secret",
                     "api_key", "apikey")

# scheme://user:password@ : the password runs to the last @ before the path, so that an
# unencoded @ inside it is masked too.
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^/\s]*)@")
_QUERY = re.compile(rf"(?P<head>[?&;](?:{'|'.join(SECRET_QUERY_KEYS)})=)(?P<secret>[^&;#\s]*)",
                    re.IGNORECASE)


def mask_uri(uri: str) -> str:
    """`uri` with the password of its user info (`user:password@` -> `user:***@`) and the
    values of secret query parameters (`?password=...`, `&token=...`) replaced by `***`;
    everything else unchanged. Also masks every URI inside a longer text (a log line)."""
    masked = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@" if m["secret"] else m[0], uri)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}" if m["secret"] else m[0], masked)


def without_credentials(uri: str) -> str:
    """`uri` with no secret left in it: the password of its user info removed (`user:pw@`
    -> `user@`, so that a database still knows whom to log in as and takes the password
    from its own place: PGPASSWORD, ~/.pgpass) and the secret query parameters removed
    whole; everything else unchanged. What is kept on disk names a store this way."""
    bare = _USERINFO.sub(_user_only, uri)
    base, sep, rest = bare.partition("?")
    if not sep:
        return bare
    query, hash_, fragment = rest.partition("#")
    kept = [p for p in re.split("[&;]", query)
            if p and p.split("=", 1)[0].lower() not in SECRET_QUERY_KEYS]
    return base + ("?" + "&".join(kept) if kept else "") + hash_ + fragment


def _user_only(match: re.Match) -> str:
    """A `_USERINFO` match without its password: `scheme://user@`, or `scheme://` when
    there was no user name."""
    head = match["head"][:-1]
    return head if head.endswith("//") else head + "@"


def uri_secrets(uri: str) -> list[str]:
    """The secret values inside `uri` (its user-info password, the values of secret query
    parameters), each as written and percent-decoded; [] when it carries none."""
    found = [m["secret"] for m in _USERINFO.finditer(uri)]
    found += [m["secret"] for m in _QUERY.finditer(uri)]
    return _with_encodings(s for s in found if s)


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The secret values of the environment (`os.environ` by default): the non-empty values
    of SECRET_ENV and the passwords and tokens inside the URIs of URI_ENV, each also in its
    percent-encoded and -decoded forms; longest first, without repeats."""
    environ = os.environ if environ is None else environ
    found = [environ[name] for name in SECRET_ENV if environ.get(name)]
    for name in URI_ENV:
        found += uri_secrets(environ.get(name, ""))
    return _with_encodings(found)


def mask_text(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret (and of its percent-encoded form)
    replaced by `***`, then with `mask_uri` applied, so that a URI's password is masked even
    when it is in no list. Longer secrets are replaced first (one may contain another)."""
    for secret in _with_encodings(secrets):
        text = text.replace(secret, MASK)
    return mask_uri(text)


def _with_encodings(values: Iterable[str]) -> list[str]:
    """The non-empty values plus their percent-encoded and -decoded forms (a password is
    encoded inside a URL and plain in the environment), longest first, without repeats."""
    forms = {form for value in values if value
             for form in (value, unquote(value), quote(value, safe=""))}
    return sorted(forms, key=lambda s: (-len(s), s))
