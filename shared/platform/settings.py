"""Configuration for every function and tool, read from the environment (prefix ``ZSYNC_``).

On AWS Lambda, secrets are not put in plain environment variables: ``serverless.yml`` gives each
function ``ZSYNC_SSM_PREFIX`` and :mod:`shared.platform.aws_secrets` fills the secret fields from SSM Parameter
Store / Secrets Manager once per cold start (see ``SECRET_FIELDS``).
"""

from __future__ import annotations

import json
from enum import StrEnum
from functools import lru_cache

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRET_HEADER = "X-Zsync-Secret"


INBOX_PREFIXES = ("/trigger-inbox/api/v1", "/trigger-inbox/v1")  # zapier-public-api.md 2.0
LEASE_BOUNDS = {"inbox_lease_limit": (1, 100), "inbox_lease_seconds": (1, 3600)}  # ... 2.8


class TablesWriter(StrEnum):
    API = "api"  # Zapier Tables records API (find by id, create, update)
    CATCH_HOOK = "catch_hook"  # the seed's 3B path: POST to a Zap whose step is "Find or Create Record"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZSYNC_", extra="ignore")

    # --- Supabase (Postgres) ---------------------------------------------------------------------
    database_url: SecretStr | None = Field(
        default=None,
        description="Postgres URL. In production the Supabase pooler URL (transaction mode, port 6543).",
    )
    db_pool_max: int = Field(default=8, ge=1, le=50, description="At least the server's thread count.")
    db_connect_timeout_s: float = Field(default=5.0, gt=0)

    # --- Shared secret guarding every function URL -----------------------------------------------
    secret_header: str = DEFAULT_SECRET_HEADER
    webhook_secret: SecretStr | None = None
    webhook_secret_previous: SecretStr | None = Field(
        default=None, description="Second accepted secret while rotating; remove once all senders use the new one."
    )

    # --- Zapier Tables ---------------------------------------------------------------------------
    zapier_base_url: str = Field(default="https://sdkapi.zapier.com", description="What the SDK takes as base URL.")
    zapier_api_url: str | None = Field(
        default=None, description="Zapier's public API (Tables v2 records, Trigger Inbox). Unset: "
        "https://api.zapier.com for the SDK host, else ZSYNC_ZAPIER_BASE_URL itself (the local stand-in serves both).")
    zapier_token_url: str = "https://zapier.com/oauth/token/"
    zapier_client_id: str | None = Field(default=None, description="OAuth client id (create-client-credentials).")
    zapier_client_secret: SecretStr | None = None
    tables_token: SecretStr | None = Field(default=None, description="A token made by the user, instead of OAuth.")
    table_ids: dict[str, str] = Field(
        default_factory=dict, description='JSON object: {"agent_jobs": "<Zapier table id>", ...}'
    )
    tables_writer: TablesWriter = TablesWriter.API
    catch_hook_urls: dict[str, str] = Field(
        default_factory=dict, description='JSON object for tables_writer=catch_hook: {"agent_jobs": "https://hooks.zapier.com/..."}'
    )
    http_timeout_s: float = Field(default=10.0, gt=0)
    retry_budget_s: float = Field(default=20.0, ge=0, description="Total time outbound retries may take per call.")
    outbox_batches: bool = Field(
        default=True, description="*_to_tables, a signed webhook payload (a replay, a hand-sent delivery): deliver "
        "every pending outbox change of the table in batches (False: that payload's record only). The Database "
        "Webhook itself is a secret-free wake-up (?zsync_wake=outbox) that always drains the outbox.")
    outbox_claim_limit: int = Field(default=1000, ge=1, le=10000, description="Outbox entries claimed per batch.")
    outbox_drain_budget_s: float = Field(
        default=4.0, gt=0, description="Time one wake-up spends draining (incl. 429 waits); under pg_net's 5 s "
        "webhook timeout. What is left stays pending for the next wake-up or the sweeper.")
    outbox_wake_min_interval_s: float = Field(
        default=0.2, ge=0, le=10, description="*_to_tables: drain rounds started by the unauthenticated wake-up "
        "(?zsync_wake=outbox) start at least this far apart, per instance (a flood of wake-ups is rate-limited).")

    # --- Trigger inboxes (Zapier -> the *_to_supabase functions) ------------------------------------
    stage: str = Field(default="dev", description="Deployment stage: each function drains inbox zsync-<stage>-<fn>.")
    inbox_drain_budget_s: float = Field(default=10.0, gt=0, description="How long one wake-up may drain.")
    inbox_path_prefix: str = Field(
        default="/trigger-inbox/api/v1", description="The public Trigger Inbox API's path prefix: Zapier's docs "
        "show /trigger-inbox/api/v1 (guides, white-label pages) and /trigger-inbox/v1 (the OpenAPI files).")
    inbox_lease_limit: int = Field(default=100, description=(
        "Messages per lease (applied as one batch): the API takes 1-100 (its own default 10)."))
    inbox_lease_seconds: int = Field(default=60, description=(
        "Lease length in seconds: the API takes 1-3600 (its own default 300). A drain killed mid-lease leaves its "
        "messages invisible this long."))

    # --- Bad input ---------------------------------------------------------------------------------
    max_future_skew_s: float = Field(
        default=300.0, ge=0, description="A version (updated_at) more than this far ahead of the clock is "
        "refused (400 / sync_failed), never stored or compared. `zsync migrate` copies it into zsync.config, where "
        "the database's own check (zsync.max_future_skew(), trigger zsync_maintain_updated_at) reads it.")

    # --- Requests --------------------------------------------------------------------------------
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)

    # --- Delivery guarantees / alerts ------------------------------------------------------------
    dlq_url: str | None = Field(default=None, description="SQS queue URL for deliveries that still fail.")
    aws_endpoint_url: str | None = Field(default=None, description="moto server locally; unset on AWS.")
    slack_webhook_url: SecretStr | None = None

    # --- Lambda secret loading -------------------------------------------------------------------
    ssm_prefix: str | None = Field(default=None, description="e.g. /zsync/prod/ : read secrets from SSM on cold start.")

    @field_validator("table_ids", "catch_hook_urls", mode="before")
    @classmethod
    def _json_object(cls, v: object) -> object:
        if isinstance(v, str):
            v = json.loads(v) if v.strip() else {}
        return v

    @field_validator("inbox_path_prefix")
    @classmethod
    def _inbox_prefix(cls, v: str) -> str:
        if v.rstrip("/") not in INBOX_PREFIXES:
            raise ValueError(f"ZSYNC_INBOX_PATH_PREFIX={v!r}: expected one of Zapier's documented prefixes "
                             f"{', '.join(INBOX_PREFIXES)}")
        return v.rstrip("/")

    @field_validator("inbox_lease_limit", "inbox_lease_seconds", mode="before")
    @classmethod
    def _lease_bounds(cls, v: object, info: ValidationInfo) -> object:
        low, high = LEASE_BOUNDS[info.field_name or ""]
        number = v if isinstance(v, int) and not isinstance(v, bool) else None
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            number = int(v)
        if number is None or not low <= number <= high:
            env = f"ZSYNC_{(info.field_name or '').upper()}"
            raise ValueError(f"{env}={v!r}: expected an integer from {low} to {high} (Zapier's documented bounds)")
        return number

    def accepted_secrets(self) -> list[str]:
        return [s.get_secret_value() for s in (self.webhook_secret, self.webhook_secret_previous) if s is not None]


SECRET_FIELDS = ("database_url", "webhook_secret", "webhook_secret_previous", "tables_token", "zapier_client_id",
                 "zapier_client_secret", "slack_webhook_url")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests, and after secrets were loaded into the environment)."""
    get_settings.cache_clear()
