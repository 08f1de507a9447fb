"""The trigger and rate-limit checks of ``zsync doctor --live``: which triggers the Tables app lists, the
payload of a change (and of a delete) in a scratch trigger inbox, the lease bounds, the public Trigger
Inbox prefixes, and a bounded burst to find the rate limit. See :mod:`infra.deploy.doctor_live`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from infra.deploy.doctor_live_base import (
    INBOX_PREFIXES,
    V2_PREFIX,
    Finding,
    Scratch,
    brief,
    found,
    id_bits,
    id_form,
    unchecked,
)

LEASE_SECONDS = 300  # the consumer's (shared.adapters.trigger_inbox.DEFAULT_LEASE_SECONDS)
QUIET_WAIT_S = 5.0  # how long to watch for a message that should not come (a delete on the change inbox)
POLL_S = 1.0
ASSUMED_LIMIT = 100  # requests per table ...
ASSUMED_WINDOW_S = 5.0  # ... per this many seconds (zapier-tables-api.md, "Limits")
BURST_MAX_S = 15.0


def _words(action: dict[str, Any]) -> str:
    return f"{action.get('key', '')} {action.get('name', '')} {action.get('description', '')}".lower().replace("_", " ")


def _make_inbox(s: Scratch, app: str, action_key: str, what: str) -> Any:
    from shared.adapters.trigger_inbox import Subscription

    with s.making():
        inbox = s.inbox().create(f"{s.name}-{what}", Subscription(app, action_key, {"table_id": s.table}), None)
        s.inbox_ids.append(inbox.id)
    deadline = time.monotonic() + s.options.trigger_wait_s
    while inbox.status == "initializing" and time.monotonic() < deadline:
        time.sleep(POLL_S)
        inbox = s.inbox().get(inbox.id)
    return inbox


def _drain(s: Scratch, inbox_id: str, wanted: Callable[[list[Any]], bool], wait_s: float) -> list[Any]:
    """Lease (and ack) what arrives until ``wanted(messages so far)`` or ``wait_s`` passed."""
    from shared.services.inbox_consumer import LEASE_LIMIT

    got: list[Any] = []
    deadline = time.monotonic() + wait_s
    while True:
        lease = s.inbox().lease(inbox_id, LEASE_LIMIT, LEASE_SECONDS)
        if lease.lease_id and lease.messages:
            s.inbox().ack(inbox_id, lease.lease_id)
        got += lease.messages
        if wanted(got) or time.monotonic() >= deadline:
            return got
        time.sleep(POLL_S)


def _ours(s: Scratch, message: Any, rid: str, key: str) -> bool:
    payload = message.payload
    record = payload.get("record") if isinstance(payload.get("record"), dict) else payload
    ids = {record.get("id"), record.get("record_id")}
    data = record.get("data") if isinstance(record.get("data"), dict) else record
    return any(id_bits(i) == id_bits(rid) for i in ids if i) or key in (data.get(s.keys["id"]), data.get("id"))


def _read(s: Scratch, message: Any, rid: str, key: str) -> tuple[bool, str]:
    from shared.adapters.trigger_inbox import UnreadablePayload, read_payload

    names = {k: name for name, k in s.keys.items()}
    keys = sorted(message.payload)
    try:
        record = read_payload(message.payload, names)
    except UnreadablePayload as exc:
        return False, f"payload keys {keys}: unreadable ({exc.problems[0]['problem'][:80]})"
    by = "field id" if any(k.startswith("f") and k[1:].isdigit() for k in (message.payload.get("data") or {})) \
        else "name"
    ok_id = record.record_id is not None and id_bits(record.record_id) == id_bits(rid)
    ok = ok_id and record.fields.get("id") == key and record.edited_at is not None
    return ok, (f"payload keys {keys}, fields by {by}, record id "
                f"{id_form(record.record_id) if record.record_id else 'MISSING'}"
                f"{'' if ok_id or record.record_id is None else ' (another record)'}, "
                f"edited_at {'present' if record.edited_at else 'MISSING'}")


def _deletes_capable(action: dict[str, Any]) -> bool:
    """"Triggers when a record is added, updated, or deleted in a table." (its key is not published)."""
    return all(w in _words(action) for w in ("record", "delet", "updat"))


def _new_or_updated(action: dict[str, Any]) -> bool:
    words = _words(action)
    return ("updat" in words and any(w in words for w in ("new", "add", "creat"))
            and not _deletes_capable(action))


def check_triggers(s: Scratch) -> list[Finding]:
    """The triggers the app lists, the one ``zsync wire zapier`` subscribes the inboxes to, and a scratch
    inbox on that one (a change's payload, the lease bounds, a delete's payload)."""
    from infra.deploy import DeployError
    from infra.deploy.wire import choose_trigger

    inbox = s.inbox()
    app = inbox.tables_implementation()
    actions = [a for a in inbox.read_actions(app) if not a.get("is_hidden")]
    listed = ", ".join(f"{a['key']}" for a in actions) or "none"
    deletes = [a["key"] for a in actions if _deletes_capable(a)]
    changes = [a["key"] for a in actions if _new_or_updated(a)]
    try:
        picked: str | None = choose_trigger(inbox, None).action_key
        pick = found("trigger_pick", True, f"picks {picked!r}" + (" (it delivers deletes too)"
                                                                   if picked in deletes else ""))
    except DeployError as exc:
        picked = None
        hint = f": pass --trigger-key {(changes or deletes)[0]}" if changes or deletes else ""
        pick = found("trigger_pick", False, str(exc)[:160] + hint)
    subscribe = picked or next(iter(changes), None)
    out = [found("trigger_new_or_updated", subscribe is not None,
                 f"{app} triggers: {listed}" + (f"; the inboxes get {subscribe!r}" if subscribe else "")),
           pick,
           found("trigger_deleted", True, f"listed: {deletes[0]!r}" if deletes else
                 "not listed: deletes made in Tables reach Supabase through the trash check only")]
    if subscribe is None:
        return out + [unchecked(k, "no trigger for added or updated records to subscribe to")
                      for k in ("payload_change", "lease_bounds", "lease_count", "lease_order", "payload_delete")]
    side = next((k for k in deletes if k != subscribe), None) if subscribe not in deletes else None
    return out + _payloads(s, app, subscribe, subscribe in deletes, side)


def _payloads(s: Scratch, app: str, change_key: str, with_deletes: bool, delete_key: str | None) -> list[Finding]:
    """``change_key``: the trigger the inboxes subscribe to (``with_deletes``: it delivers deletes too);
    ``delete_key``: another, deletes-capable trigger to show the delete payload of."""
    from shared.adapters.trigger_inbox import InboxError

    main = _make_inbox(s, app, change_key, "change")
    side, side_note = None, "no added/updated/deleted trigger to subscribe to"
    if delete_key:
        try:
            side = _make_inbox(s, app, delete_key, "delete")
        except InboxError as exc:  # the change's checks go on without it
            side_note = f"an inbox on {delete_key!r} was refused: {str(exc)[:120]}"
    if main.status != "active":
        return [unchecked(k, f"the scratch inbox is {main.status!r} ({main.paused_reason})")
                for k in ("payload_change", "lease_bounds", "lease_count", "lease_order", "payload_delete")]
    key = s.new_id("trigger")
    made = s.client.create(s.table, {"id": key, "status": "created"})
    s.client.update(s.table, made.id, {"status": "changed"})
    start = time.monotonic()
    try:
        got = _drain(s, main.id, lambda ms: any(_ours(s, m, made.id, key) for m in ms), s.options.trigger_wait_s)
    except InboxError as exc:
        return [unchecked("payload_change", f"lease failed: {exc}"),
                found("lease_bounds", False, f"a lease of 100 for {LEASE_SECONDS} s: {exc}"),
                *(unchecked(k, "leasing failed") for k in ("lease_count", "lease_order", "payload_delete"))]
    took = time.monotonic() - start
    ours = [m for m in got if _ours(s, m, made.id, key)]
    if not ours:
        change = unchecked("payload_change", f"no message about the change within {s.options.trigger_wait_s:g} s "
                                             f"({len(got)} other); raise --trigger-wait")
    else:
        readings = [_read(s, m, made.id, key) for m in ours]
        ok = any(r[0] for r in readings)
        change = found("payload_change", ok, f"{len(ours)} message(s) in {took:.1f} s; "
                                             + next((r[1] for r in readings if r[0]), readings[0][1]))
    over = s.raw.call("POST", f"{s.raw.api_url}{INBOX_PREFIXES[0]}/{main.id}/messages/lease",
                      body={"lease_limit": 101, "lease_seconds": LEASE_SECONDS})  # raw: a client refuses it first
    bounds = found("lease_bounds", over.status_code == 400,
                   f"a lease of 100 for 300 s worked; 101 on {INBOX_PREFIXES[0]}: {brief(over)}")
    leases = _lease_count(s, main.id)
    order = _lease_order(s, main.id)
    after = _after_delete(s, main.id, with_deletes, side.id if side else None, made.id, key, side_note)
    return [change, bounds, leases, order, after]


def _lease_count(s: Scratch, inbox_id: str) -> Finding:
    """One message leased (1 s) and released again and again: is it still leasable the 6th time?"""
    from shared.services.inbox_consumer import POISON_LEASE_COUNT

    key = s.new_id("leases")
    made = s.client.create(s.table, {"id": key, "status": "leased"})
    inbox, times, count = s.inbox(), 0, None
    deadline = time.monotonic() + s.options.trigger_wait_s
    while times <= POISON_LEASE_COUNT and time.monotonic() < deadline:
        lease = inbox.lease(inbox_id, 1, 1)
        if not lease.messages or not lease.lease_id:
            time.sleep(POLL_S)
            continue
        message = lease.messages[0]
        if not _ours(s, message, made.id, key):
            inbox.ack(inbox_id, lease.lease_id)
            continue
        times, count = times + 1, message.lease_count
        if times > POISON_LEASE_COUNT:
            inbox.ack(inbox_id, lease.lease_id)
        else:
            inbox.release(inbox_id, lease.lease_id)
    if times == 0:
        return unchecked("lease_count", f"no message within {s.options.trigger_wait_s:g} s")
    return found("lease_count", times > POISON_LEASE_COUNT,
                 f"leased {times} time(s) (lease_count {count} the last time)"
                 + ("" if times > POISON_LEASE_COUNT else ": then no longer leased (quarantined?)"))


def _lease_order(s: Scratch, inbox_id: str) -> Finding:
    """A record changed three times, its messages leased one at a time: do they come oldest first?"""
    from shared.adapters.trigger_inbox import UnreadablePayload, read_payload

    key = s.new_id("order")
    made = s.client.create(s.table, {"id": key, "status": "order-0"})
    for n in (1, 2, 3):
        s.client.update(s.table, made.id, {"status": f"order-{n}"})
    names = {k: name for name, k in s.keys.items()}
    inbox, seen = s.inbox(), []
    deadline = time.monotonic() + s.options.trigger_wait_s
    while len(seen) < 4 and time.monotonic() < deadline:
        lease = inbox.lease(inbox_id, 1, 30)
        if not lease.messages or not lease.lease_id:
            time.sleep(POLL_S)
            continue
        inbox.ack(inbox_id, lease.lease_id)
        message = lease.messages[0]
        if _ours(s, message, made.id, key):
            try:
                seen.append(str(read_payload(message.payload, names).fields.get("status")))
            except UnreadablePayload:
                seen.append("unreadable")
    if not seen:
        return unchecked("lease_order", f"no message within {s.options.trigger_wait_s:g} s")
    return found("lease_order", seen == sorted(seen), f"leased one at a time: {', '.join(seen)}")


def _says_delete(message: Any) -> bool:
    payload = message.payload
    record = payload.get("record") if isinstance(payload.get("record"), dict) else payload
    return bool(record.get("deleted_at") or payload.get("deleted_at")) or "delet" in str(
        payload.get("event") or payload.get("type") or "").lower()


def _delete_payload(messages: list[Any]) -> str:
    if not messages:
        return "0 messages"
    last = messages[-1]
    return (f"{len(messages)} message(s), payload keys {sorted(last.payload)}, "
            f"{'marked as a delete' if _says_delete(last) else 'NOT marked as a delete (no deleted_at / event)'}")


def _after_delete(s: Scratch, main_id: str, with_deletes: bool, side_id: str | None, rid: str, key: str,
                  side_note: str) -> Finding:
    """Delete the record: the inbox's trigger delivers it when it is deletes-capable (a message naming the
    record, marked as a delete), else nothing; another deletes-capable trigger's payload is shown."""
    if side_id:
        _drain(s, side_id, lambda ms: False, 0)  # the create and update, if it queued them
    s.client.delete(s.table, rid)
    if with_deletes:
        got = [m for m in _drain(s, main_id, lambda ms: any(_ours(s, m, rid, key) and _says_delete(m) for m in ms),
                                 s.options.trigger_wait_s) if _ours(s, m, rid, key)]
        ok = any(_says_delete(m) for m in got)
        return found("payload_delete", ok, f"the inboxes' trigger on a delete: {_delete_payload(got)}"
                     + ("" if got else f" within {s.options.trigger_wait_s:g} s (the trash check still applies it)"))
    quiet = [m for m in _drain(s, main_id, lambda ms: False, QUIET_WAIT_S) if _ours(s, m, rid, key)]
    seen = [f"{len(quiet)} message(s) on the new-or-updated inbox within {QUIET_WAIT_S:g} s"]
    if side_id:
        deleted = [m for m in _drain(s, side_id, lambda ms: any(_ours(s, m, rid, key) for m in ms),
                                     s.options.trigger_wait_s) if _ours(s, m, rid, key)]
        seen.append(f"the deleted trigger: {_delete_payload(deleted)}")
    else:
        seen.append(side_note)
    return found("payload_delete", not quiet, "; ".join(seen))


def check_prefixes(s: Scratch) -> list[Finding]:
    seen = {p: brief(s.raw.call("GET", s.raw.api_url + p, params={"limit": "1"})) for p in INBOX_PREFIXES}
    return [found("inbox_prefixes", all(v == "HTTP 200" for v in seen.values()),
                  ", ".join(f"{p}: {v}" for p, v in seen.items()))]


def check_rate_limit(s: Scratch) -> list[Finding]:
    """Sequential queries (limit 1) on the scratch table, after a quiet window, until the first 429, at most
    ``rate_burst`` requests and :data:`BURST_MAX_S` seconds."""
    url = f"{s.raw.api_url}{V2_PREFIX}/tables/{s.table}/records/query"
    time.sleep(ASSUMED_WINDOW_S)  # the checks before spent part of this table's window
    start = time.monotonic()
    sent, hit = 0, None
    while sent < s.options.rate_burst and time.monotonic() - start < BURST_MAX_S:
        response = s.raw.call("POST", url, body={"limit": 1}, wait_429=False)
        sent += 1
        if response.status_code == 429:
            hit = response
            break
        if response.status_code >= 300:
            return [unchecked("rate_limit", f"request {sent} answered {brief(response)}")]
    took = time.monotonic() - start
    if hit is None:
        fast = sent >= ASSUMED_LIMIT and took <= ASSUMED_WINDOW_S
        text = f"no 429 in {sent} requests over {took:.1f} s"
        return [found("rate_limit", True, text + ": the limit is above that") if fast
                else unchecked("rate_limit", text + f": too slow from here to reach {ASSUMED_LIMIT} in "
                                                    f"{ASSUMED_WINDOW_S:g} s")]
    retry_after = hit.headers.get("Retry-After")
    extra = {k: v for k, v in hit.headers.items() if k.lower().startswith("x-ratelimit")}
    text = (f"429 at request {sent} after {took:.1f} s, Retry-After {retry_after or 'MISSING'}"
            + (f", {extra}" if extra else ""))
    early = sent <= ASSUMED_LIMIT and took < ASSUMED_WINDOW_S
    return [found("rate_limit", retry_after is not None and not early,
                  text + (f": below the assumed {ASSUMED_LIMIT} / {ASSUMED_WINDOW_S:g} s" if early else ""))]
