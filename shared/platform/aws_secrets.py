"""Fill the secret settings from AWS SSM Parameter Store / Secrets Manager, once per process.

``serverless.yml`` gives every Lambda ``ZSYNC_SSM_PREFIX=/zsync/<stage>/`` instead of secret values.
On a cold start :func:`load_into_environment` reads each name of
:data:`shared.platform.settings.SECRET_FIELDS`:

1. from SSM: ``GetParametersByPath(/zsync/<stage>/, WithDecryption=True)``, e.g.
   ``/zsync/prod/database_url`` (a SecureString);
2. for names not found there, from the Secrets Manager secret ``zsync/<stage>/<name>`` if it exists;

and sets ``ZSYNC_<NAME>`` only where the environment does not already have it, then resets the
cached settings. Values are never logged; only names and where they came from.

``ZSYNC_AWS_ENDPOINT_URL`` points the clients at a moto server locally.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from shared.platform.logs import get_logger, log_event
from shared.platform.settings import SECRET_FIELDS, reset_settings

_lock = threading.Lock()
_loaded: dict[str, dict[str, str]] = {}  # prefix -> {name: source}


class SecretsUnavailable(RuntimeError):
    """SSM / Secrets Manager could not be read (permissions, network): the function cannot start."""


def _client(service: str) -> Any:
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client(
        service,
        region_name=region,
        endpoint_url=os.environ.get("ZSYNC_AWS_ENDPOINT_URL") or None,
        config=Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 3, "mode": "standard"}),
    )


def normalize_prefix(prefix: str) -> str:
    """``zsync/prod`` / ``/zsync/prod`` / ``/zsync/prod/`` -> ``/zsync/prod/``."""
    return "/" + prefix.strip("/") + "/"


def secrets_manager_id(prefix: str, name: str) -> str:
    """The Secrets Manager secret for ``name`` under an SSM prefix: /zsync/prod/ -> zsync/prod/<name>."""
    return f"{prefix.strip('/')}/{name}"


def _from_ssm(prefix: str) -> dict[str, str]:
    from botocore.exceptions import BotoCoreError, ClientError

    found: dict[str, str] = {}
    try:
        pages = _client("ssm").get_paginator("get_parameters_by_path").paginate(
            Path=prefix.rstrip("/"), Recursive=False, WithDecryption=True
        )
        for page in pages:
            for param in page.get("Parameters", []):
                name = param["Name"].rsplit("/", 1)[-1]
                if name in SECRET_FIELDS:
                    found[name] = param["Value"]
    except (BotoCoreError, ClientError) as exc:
        raise SecretsUnavailable(f"cannot read SSM parameters under {prefix}: {type(exc).__name__}") from None
    return found


def _from_secrets_manager(prefix: str, names: list[str]) -> dict[str, str]:
    from botocore.exceptions import BotoCoreError, ClientError

    if not names:
        return {}
    client = _client("secretsmanager")
    found: dict[str, str] = {}
    for name in names:
        secret_id = secrets_manager_id(prefix, name)
        try:
            value = client.get_secret_value(SecretId=secret_id).get("SecretString")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                continue
            raise SecretsUnavailable(f"cannot read secret {secret_id}: {exc.response['Error'].get('Code')}") from None
        except BotoCoreError as exc:
            raise SecretsUnavailable(f"cannot read secret {secret_id}: {type(exc).__name__}") from None
        if value:
            found[name] = value
    return found


def load_into_environment(settings_prefix: str | None = None) -> dict[str, str]:
    """Load the secrets under ``settings_prefix`` (default ``ZSYNC_SSM_PREFIX``) into ``ZSYNC_*`` env vars.

    Returns ``{name: source}`` for every secret field that is set afterwards (source is ``ssm``,
    ``secretsmanager`` or ``environment``). Without a prefix nothing is read (local runs, Google Cloud).
    Cached per prefix for the life of the process; raises :class:`SecretsUnavailable` (and caches
    nothing) when AWS cannot be read, so the next invocation tries again.
    """
    prefix = settings_prefix if settings_prefix is not None else os.environ.get("ZSYNC_SSM_PREFIX")
    if not prefix:
        return {}
    prefix = normalize_prefix(prefix)
    with _lock:
        if prefix in _loaded:
            return dict(_loaded[prefix])
        values = _from_ssm(prefix)
        sources = dict.fromkeys(values, "ssm")
        missing = [n for n in SECRET_FIELDS if n not in values and not os.environ.get(_env_name(n))]
        from_sm = _from_secrets_manager(prefix, missing)
        values.update(from_sm)
        sources.update(dict.fromkeys(from_sm, "secretsmanager"))
        for name, value in values.items():
            env = _env_name(name)
            if os.environ.get(env):
                sources[name] = "environment"
            else:
                os.environ[env] = value
        for name in SECRET_FIELDS:
            if name not in sources and os.environ.get(_env_name(name)):
                sources[name] = "environment"
        reset_settings()
        _loaded[prefix] = sources
        log_event(get_logger(os.environ.get("ZSYNC_FUNCTION", "zsync")), logging.INFO, "secrets_loaded",
                  prefix=prefix, sources=sources)  # names and where they came from, never values
        return dict(sources)


def _env_name(name: str) -> str:
    return f"ZSYNC_{name.upper()}"


def forget() -> None:
    """Drop the per-process cache (tests; a new cold start does this implicitly)."""
    with _lock:
        _loaded.clear()
