"""The Lambda entry point against the real functions: secrets from (moto) SSM / Secrets Manager, a real
function-URL event (payload format 2.0) for each of the seven functions, answers compared with the same
request sent through functions-framework's own test client."""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.core.spec import FUNCTIONS

MAIN = Path(__file__).resolve().parent.parent / "functions" / "main.py"
STAGE = "adaptertest"
PREFIX = f"/zsync/{STAGE}/"
HEADER = "X-Zsync-Secret"

pytestmark = pytest.mark.skipif(not MAIN.exists(), reason="functions/main.py does not exist yet")


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """In-process moto; the ZSYNC_* environment and the per-process caches restored afterwards."""
    from moto import mock_aws

    from functions import lambda_adapter
    from shared.platform import aws_secrets
    from shared.platform.settings import reset_settings

    saved = {k: v for k, v in os.environ.items() if k.startswith("ZSYNC_")}
    for key in saved:
        monkeypatch.delenv(key)
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    aws_secrets.forget()
    lambda_adapter._handlers.clear()
    reset_settings()
    try:
        with mock_aws():
            yield
    finally:
        for key in [k for k in os.environ if k.startswith("ZSYNC_")]:
            del os.environ[key]
        os.environ.update(saved)
        aws_secrets.forget()
        lambda_adapter._handlers.clear()
        reset_settings()


def _put_ssm(name: str, value: str) -> None:
    import boto3

    boto3.client("ssm").put_parameter(Name=PREFIX + name, Value=value, Type="SecureString")


def _put_secrets_manager(name: str, value: str) -> None:
    import boto3

    boto3.client("secretsmanager").create_secret(Name=f"zsync/{STAGE}/{name}", SecretString=value)


def function_url_event(body: bytes, headers: dict[str, str], *, base64_body: bool = False,
                       method: str = "POST") -> dict[str, Any]:
    """What a Lambda function URL hands the function (payload format version 2.0)."""
    domain = "abcdefghijklmnopqrstuvwxyz012345.lambda-url.us-east-1.on.aws"
    now = time.time()
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/",
        "rawQueryString": "",
        "headers": {"host": domain, "user-agent": "Zapier", "x-forwarded-proto": "https",
                    "x-forwarded-for": "203.0.113.7", "x-forwarded-port": "443",
                    "content-length": str(len(body)), **{k.lower(): v for k, v in headers.items()}},
        "requestContext": {
            "accountId": "anonymous",
            "apiId": domain.split(".")[0],
            "domainName": domain,
            "domainPrefix": domain.split(".")[0],
            "http": {"method": method, "path": "/", "protocol": "HTTP/1.1", "sourceIp": "203.0.113.7",
                     "userAgent": "Zapier"},
            "requestId": secrets.token_hex(8),
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "body": base64.b64encode(body).decode() if base64_body else body.decode(),
        "isBase64Encoded": base64_body,
    }


def invoke(body: bytes, headers: dict[str, str], **kw: Any) -> tuple[int, Any]:
    from functions import lambda_adapter

    response = lambda_adapter.handler(function_url_event(body, headers, **kw), None)
    text = base64.b64decode(response["body"]) if response.get("isBase64Encoded") else response["body"].encode()
    return response["statusCode"], json.loads(text)


def direct(target: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    """The same request through functions-framework's own Flask app (how Google Cloud runs it)."""
    import functions_framework

    client = functions_framework.create_app(target=target, source=str(MAIN)).test_client()
    response = client.post("/", data=body, headers=headers)
    return response.status_code, response.get_json()


@pytest.fixture
def deployed(aws: Any, database_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """What serverless.yml gives a function, with the secrets in SSM / Secrets Manager only."""
    secret = secrets.token_urlsafe(24)
    _put_ssm("webhook_secret", secret)
    _put_ssm("database_url", database_url)
    _put_ssm("unrelated", "ignored")  # only SECRET_FIELDS are loaded
    _put_secrets_manager("tables_token", "tok-" + secrets.token_hex(8))
    monkeypatch.setenv("ZSYNC_SSM_PREFIX", PREFIX)
    monkeypatch.setenv("ZSYNC_SECRET_HEADER", HEADER)
    monkeypatch.setenv("ZSYNC_ZAPIER_BASE_URL", "http://127.0.0.1:9")  # never called by these requests
    return {"secret": secret, "database_url": database_url}


PING = json.dumps({"zsync_ping": True}).encode()
JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_each_function_through_a_function_url_event(name: str, deployed: dict[str, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZSYNC_FUNCTION", name)
    secret = deployed["secret"]
    cases = {
        "no secret": {**JSON},
        "wrong secret": {**JSON, HEADER: secret + "x"},
        "signed ping": {**JSON, HEADER: secret},
    }
    results = {}
    for case, headers in cases.items():
        got = invoke(PING, headers)
        assert got == direct(name, PING, headers), case  # same status and JSON body as functions-framework
        results[case] = got
    assert results["no secret"][0] == 401
    assert results["wrong secret"][0] == 401
    assert HEADER in results["no secret"][1]["error"]
    assert secret not in json.dumps(results["wrong secret"][1])
    status, body = results["signed ping"]
    assert status == 200, body
    assert body["outcome"] == "ping"
    assert body["function"] == name
    if "migrations_current" in body:
        assert body["migrations_current"] is True

    # a base64-encoded body (how function URLs pass non-text content types) decodes the same
    assert invoke(PING, {**JSON, HEADER: secret}, base64_body=True) == (status, body)


def test_secrets_come_from_ssm_then_secrets_manager_and_never_overwrite_the_environment(
        deployed: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from shared.platform import aws_secrets
    from shared.platform.settings import get_settings

    monkeypatch.setenv("ZSYNC_SLACK_WEBHOOK_URL", "https://hooks.slack.test/already-set")
    _put_ssm("slack_webhook_url", "https://hooks.slack.test/from-ssm")
    sources = aws_secrets.load_into_environment()
    assert sources == {"webhook_secret": "ssm", "database_url": "ssm", "tables_token": "secretsmanager",
                       "slack_webhook_url": "environment"}
    settings = get_settings()
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == deployed["secret"]
    assert os.environ["ZSYNC_SLACK_WEBHOOK_URL"] == "https://hooks.slack.test/already-set"
    assert settings.tables_token is not None and settings.tables_token.get_secret_value().startswith("tok-")
    assert "ZSYNC_UNRELATED" not in os.environ

    # cached once per process: a changed parameter is not re-read until the next cold start
    _put_ssm_overwrite("webhook_secret", "rotated")
    aws_secrets.load_into_environment()
    assert os.environ["ZSYNC_WEBHOOK_SECRET"] == deployed["secret"]

    out = capsys.readouterr()
    assert deployed["secret"] not in out.out + out.err
    assert deployed["database_url"] not in out.out + out.err


def _put_ssm_overwrite(name: str, value: str) -> None:
    import boto3

    boto3.client("ssm").put_parameter(Name=PREFIX + name, Value=value, Type="SecureString", Overwrite=True)


def test_without_a_prefix_nothing_is_read(aws: Any) -> None:
    from shared.platform import aws_secrets

    assert aws_secrets.load_into_environment() == {}
    assert "ZSYNC_WEBHOOK_SECRET" not in os.environ


def test_unreadable_ssm_is_a_clear_error_and_is_retried(aws: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.platform import aws_secrets

    # an endpoint where nothing listens: the error names the prefix, and nothing is cached
    monkeypatch.setenv("ZSYNC_AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(aws_secrets.SecretsUnavailable, match=f"SSM parameters under {PREFIX}"):
        aws_secrets.load_into_environment(PREFIX)
    monkeypatch.delenv("ZSYNC_AWS_ENDPOINT_URL")
    _put_ssm("webhook_secret", "s3cret-value")
    assert aws_secrets.load_into_environment(PREFIX.rstrip("/")) == {"webhook_secret": "ssm"}
