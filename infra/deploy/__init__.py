"""Deploying zsync and wiring the deployed function URLs into Supabase and Zapier.

Modules: :mod:`.aws` (osls package/deploy, stack outputs), :mod:`.wire` (Supabase webhook triggers),
:mod:`.zapier_setup` (the Zaps to create), :mod:`.gcloud` (Google Cloud deploy script),
:mod:`.doctor` (checks a deployment end to end), :mod:`.cli` (the ``zsync`` commands).

The deployed URLs live in ``.zsync/urls.<stage>.json`` as ``{"functions": {name: url}}`` (the local
stack's ``.local/stack.json`` has the same ``functions`` key, so every command also works locally).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from shared.core.spec import FUNCTIONS
from shared.platform.settings import Settings

REPO = Path(__file__).resolve().parents[2]
URLS_DIR = REPO / ".zsync"


class DeployError(RuntimeError):
    """Something the operator must fix; the message says what and how."""


def urls_path(stage: str, directory: Path = URLS_DIR) -> Path:
    return directory / f"urls.{stage}.json"


def write_urls(path: Path, urls: Mapping[str, str], **extra: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"functions": dict(sorted(urls.items())), **extra}, indent=2) + "\n")
    return path


def load_urls(path: Path, *, require_all: bool = True) -> dict[str, str]:
    """``{function name: URL}`` from a urls file; every name must be one of the seven functions."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeployError(f"{path} does not exist: run `zsync deploy --stage STAGE` first") from None
    except json.JSONDecodeError as exc:
        raise DeployError(f"{path} is not valid JSON: {exc}") from None
    urls = data.get("functions") if isinstance(data, dict) else None
    if not isinstance(urls, dict) or not all(isinstance(v, str) for v in urls.values()):
        raise DeployError(f'{path} must hold {{"functions": {{"<function name>": "<url>", ...}}}}')
    unknown = sorted(set(urls) - set(FUNCTIONS))
    if unknown:
        raise DeployError(f"{path}: unknown function(s) {', '.join(unknown)}")
    missing = sorted(set(FUNCTIONS) - set(urls))
    if require_all and missing:
        raise DeployError(f"{path}: no URL for {', '.join(missing)}")
    return dict(urls)


_STACK_ZAPIER = ("zapier_base_url", "zapier_token_url", "zapier_client_id", "zapier_client_secret", "stage")


def with_local_stack(settings: Settings, path: Path | None) -> Settings:
    """``settings`` with what the environment leaves unset taken from the local stack's ``stack.json`` at
    ``path`` (written by ``make up``): database, secret and header, Zapier stand-in and credentials, table
    ids, stage, dead-letter queue. The environment always wins; a deploy's urls file (only ``functions``,
    ``stage``...) changes nothing. ``zsync status``, ``report``, ``monitor`` and ``doctor`` share this."""
    if path is None:
        return settings
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return settings
    if not isinstance(data, dict) or not data.get("database_url"):
        return settings  # not a stack.json
    overrides: dict[str, object] = {}
    if settings.database_url is None:
        overrides["database_url"] = data["database_url"]
    overrides |= {k: data[k] for k in ("dlq_url", "aws_endpoint_url") if data.get(k) and not getattr(settings, k)}
    if not (settings.zapier_client_id or settings.tables_token):  # the local Zapier stand-in and its stage
        overrides |= {k: data[k] for k in _STACK_ZAPIER if data.get(k)}
    if not settings.table_ids and isinstance(data.get("table_ids"), dict):
        overrides["table_ids"] = data["table_ids"]
    if data.get("secret") and not settings.accepted_secrets():
        overrides["webhook_secret"] = data["secret"]
        overrides["secret_header"] = data.get("secret_header") or settings.secret_header
    return Settings(**{**settings.model_dump(), **overrides}) if overrides else settings
