"""mlp/secrets.py: passwords and tokens in URIs, text and the environment are masked."""

from __future__ import annotations

import pytest

from mlp.tracking.secrets import MASK, env_secrets, mask_text, mask_uri, uri_secrets


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
