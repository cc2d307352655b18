"""mlp/tracking/secrets.py and masking.py: passwords and tokens in URIs, text and the
environment are masked wherever the process writes them, and removed from stored URIs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from mlp.tracking import masking
from mlp.tracking.secrets import (
    MASK,
    env_secrets,
    mask_text,
    mask_uri,
    uri_secrets,
    without_credentials,
)


@pytest.mark.parametrize(("uri", "masked"), [
    ("postgresql://mlflow:s3cret@127.0.0.1:5432/mlflow",
     "postgresql://mlflow:***@127.0.0.1:5432/mlflow"),
    ("postgresql+psycopg://u:p%40ss@db/x", "postgresql+psycopg://u:***@db/x"),
    ("https://alice:has@at@mlflow.example/path", "https://alice:***@mlflow.example/path"),
    ("http://127.0.0.1:5000?token=abc&x=1", "http://127.0.0.1:5000?token=***&x=1"),
    ("mysql://h/db?user=me&Password=pw;charset=utf8", "mysql://h/db?user=me&Password=***;charset=utf8"),
    ("https://h/api?access_token=t0k#frag", "https://h/api?access_token=***#frag"),
    # nothing secret: unchanged
    ("postgresql://mlflow@127.0.0.1/mlflow", "postgresql://mlflow@127.0.0.1/mlflow"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/a:b@c/mlflow.db", "sqlite:////tmp/a:b@c/mlflow.db"),
    ("postgresql://u:@db/x", "postgresql://u:@db/x"),
])
def test_mask_uri(uri: str, masked: str):
    assert mask_uri(uri) == masked


def test_mask_uri_masks_every_uri_in_a_log_line():
    line = "store postgresql://a:pw1@h/x, server https://b:pw2@s:443 up"
    assert mask_uri(line) == "store postgresql://a:***@h/x, server https://b:***@s:443 up"


def test_uri_secrets_are_given_as_written_and_decoded():
    assert set(uri_secrets("postgresql://u:p%40ss@db/x?token=t")) == {"p%40ss", "p@ss", "t",
                                                                         "p%2540ss"}
    assert uri_secrets("http://127.0.0.1:5000") == []


def test_env_secrets_reads_the_known_variables_and_the_tracking_uri():
    env = {"MLFLOW_TRACKING_PASSWORD": "mlflow-pw", "PGPASSWORD": "pg-pw",
           "MLFLOW_TRACKING_URI": "postgresql://u:uri%2Fpw@db/x", "POSTGRES_PASSWORD": "",
           "HOME": "/root"}
    secrets = env_secrets(env)
    assert {"mlflow-pw", "pg-pw", "uri%2Fpw", "uri/pw"} <= set(secrets)
    assert "/root" not in secrets and "" not in secrets
    assert len(secrets) == len(set(secrets))
    assert [len(s) for s in secrets] == sorted((len(s) for s in secrets), reverse=True)
    assert env_secrets({}) == []


def test_mask_text_replaces_plain_and_encoded_secrets_and_uri_passwords():
    text = ("PGPASSWORD=pa ss/1 in env; url postgresql://u:pa%20ss%2F1@h/x; "
            "other https://v:unlisted@h2/ ; token 'tok-123'")
    masked = mask_text(text, ["pa ss/1", "tok-123"])
    for secret in ("pa ss/1", "pa%20ss%2F1", "unlisted", "tok-123"):
        assert secret not in masked
    assert masked == (f"PGPASSWORD={MASK} in env; url postgresql://u:{MASK}@h/x; "
                      f"other https://v:{MASK}@h2/ ; token '{MASK}'")


def test_a_longer_secret_is_masked_before_a_shorter_one_it_contains():
    assert mask_text("abcdef abc", ["abc", "abcdef"]) == f"{MASK} {MASK}"
    assert mask_text("nothing here", []) == "nothing here"


@pytest.mark.parametrize(("uri", "bare"), [
    ("http://user:pw@host:5000", "http://user@host:5000"),
    ("postgresql://u:p%40ss@h/db", "postgresql://u@h/db"),
    ("https://alice:has@at@mlflow.example/path", "https://alice@mlflow.example/path"),
    ("http://:pw@h/x", "http://h/x"),
    ("http://h:5000?token=abc&x=1", "http://h:5000?x=1"),
    ("https://h/api?x=1&access_token=t0k#frag", "https://h/api?x=1#frag"),
    ("mysql://h/db?user=me&Password=pw;charset=utf8", "mysql://h/db?user=me&charset=utf8"),
    ("http://h?token=abc", "http://h"),
    # nothing secret: unchanged
    ("sqlite:////tmp/a:b@c/mlflow.db", "sqlite:////tmp/a:b@c/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_without_credentials_keeps_the_store_and_drops_its_secrets(uri: str, bare: str):
    assert without_credentials(uri) == bare
    assert not uri_secrets(bare)


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hooks masking.install() replaces are put back after the test (pytest puts back
    the streams itself: a test installs during its call, when capsys's streams are in)."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.setattr(logging, "_logRecordFactory", logging.getLogRecordFactory())


def test_install_masks_warnings_tracebacks_and_what_is_printed(
        restored: None, capsys: pytest.CaptureFixture):
    masking.install()
    masking.install()  # idempotent: nothing is wrapped twice
    uri = "http://alice:pw-1@h:5000/?access_token=t-2"
    text = warnings.formatwarning(f"the store {uri} does not answer", UserWarning, "x.py", 1)
    assert "pw-1" not in text and "t-2" not in text and "alice:***@h:5000" in text
    try:
        raise RuntimeError(f"API request to {uri}/api/2.0/mlflow/runs/log-batch failed")
    except RuntimeError as e:
        sys.excepthook(type(e), e, e.__traceback__)
    sys.stdout.write(f"🏃 View run r at: {uri}#/experiments/1/runs/abc\n")
    out, err = capsys.readouterr()
    assert "Traceback" in err and "RuntimeError: API request to http://alice:***@h" in err
    assert out == "🏃 View run r at: http://alice:***@h:5000/?access_token=***#/experiments/1/runs/abc\n"
    assert isinstance(sys.stdout, masking.MaskedStream)
    assert not isinstance(sys.stdout.stream, masking.MaskedStream)


SCRIPT = """
import logging, sys, warnings
from hydra._internal.utils import run_and_report
from mlp.tracking import masking
masking.install()
uri = "http://alice:uri-pw@h:5000/?token=uri-tok"
def fail():
    raise RuntimeError(f"API request to {uri} failed; MLFLOW_TRACKING_PASSWORD=env-pw-789")
print("password env-pw-789, token env-tok-012")
warnings.warn(f"the store {uri} does not answer")
logging.getLogger("mlp").warning("store %s down", uri)
sys.stdout.write(f"View run r at: {uri}#/experiments/1\\n")
run_and_report(fail) if sys.argv[1] == "hydra" else fail()
"""


@pytest.mark.parametrize("how", ["hydra", "uncaught"])
def test_a_process_with_masking_installed_prints_no_secret(how: str):
    """Hydra prints a job's exception itself; an uncaught one goes to sys.excepthook."""
    env = dict(os.environ, MLFLOW_TRACKING_PASSWORD="env-pw-789",
               MLFLOW_TRACKING_TOKEN="env-tok-012", PYTHONWARNINGS="always")
    done = subprocess.run([sys.executable, "-c", SCRIPT, how], env=env, capture_output=True,
                          text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "RuntimeError: API request to http://alice:***@h" in output
    assert "View run r at: http://alice:***@h:5000/?token=***" in output
    for secret in ("uri-pw", "uri-tok", "env-pw-789", "env-tok-012"):
        assert secret not in output, output
    assert output.count(MASK) >= 9  # print 2, warning 2, log 2, View run 2, traceback
