"""One running Tables stand-in's state, shared by its routes and admin endpoints: :class:`ServiceContext`
(the record engine, the trigger dispatcher and trigger URLs by table name, the trigger inboxes, counters,
rate limiter, faults, and the OAuth tokens it issued) and what follows a change (:meth:`after_change`:
count it, publish it to the inboxes, queue the trigger deliveries)."""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from infra.local.tables_service.counters import RateLimiter, RequestLog, ServiceStats, same_version_updates
from infra.local.tables_service.faults import FaultInjector
from infra.local.tables_service.store import RecordEngine
from infra.local.tables_service.triggers import Delivery, TriggerDispatcher, trigger_payload
from infra.local.tables_service.values import Data
from infra.local.trigger_inbox_service import InboxService

TOKEN_TTL_S = 3600


@dataclass
class ServiceContext:
    engine: RecordEngine
    dispatcher: TriggerDispatcher
    client_id: str
    client_secret: str
    static_token: str | None
    stats: ServiceStats
    limiter: RateLimiter
    token_ttl_s: int = TOKEN_TTL_S
    faults: FaultInjector = field(default_factory=FaultInjector)
    triggers: dict[str, str | None] = field(default_factory=dict)  # by table name
    tokens: dict[str, float] = field(default_factory=dict)  # issued token -> expiry (time.time())
    stopped: bool = False
    inboxes: InboxService | None = None  # trigger inboxes (infra/local/trigger_inbox_service.py)
    requests: RequestLog = field(default_factory=RequestLog)  # GET /_admin/requests

    def after_change(self, table_id: str, changes: Sequence[Data]) -> None:
        """Count the writes and queue one trigger delivery per changed record."""
        records = [c["new"] for c in changes if c["old"] is None or c["changed_field_ids"]]
        self.stats.count_writes(table_id, len(records))
        for record in records if self.inboxes else ():
            self.inboxes.publish(table_id, record)  # type: ignore[union-attr]
        schema = self.engine.schema(table_id)
        self.stats.count_same_version(table_id, same_version_updates(changes, schema.key_of("updated_at"),
                                                                  schema.key_of("id")))
        url = self.triggers.get(schema.table["name"])
        names = {f"f{fid}": f["name"] for fid, f in schema.fields.items()}
        for record in records if url else ():
            self.dispatcher.enqueue(Delivery(url, table_id, record["id"], trigger_payload(record, names)))

    def after_delete(self, table_id: str, rids: list[str]) -> None:
        """Count the deletes and publish each trashed record to the inboxes subscribed to the deletes-capable
        trigger (Zaps' webhook triggers never see a delete: Zapier has no such Zap trigger step here)."""
        self.stats.count_writes(table_id, len(rids))
        for rid in rids if self.inboxes else ():
            self.inboxes.publish_delete(table_id, self.engine.get(table_id, rid))  # type: ignore[union-attr]

    def issue_token(self) -> str:
        token = "zlt-" + secrets.token_urlsafe(32)
        now = time.time()
        self.tokens = {t: exp for t, exp in self.tokens.items() if exp > now} | {token: now + self.token_ttl_s}
        return token

    def token_ok(self, given: str) -> bool:
        if self.static_token and hmac.compare_digest(given.encode(), self.static_token.encode()):
            return True
        expiry = self.tokens.get(given)
        return expiry is not None and expiry > time.time()
