"""The checks of ``zsync doctor --live`` (:data:`CHECKS`), each on the scratch table of
:mod:`infra.deploy.doctor_live`, each making its own records (named ``zsync-doctor-<suffix>-<what>-<n>``)
so one failing does not spoil the next. What each assumes: :data:`infra.deploy.doctor_live_base.ASSUMPTIONS`
and ``docs/zapier-assumptions.md``."""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from infra.deploy.doctor_live_base import (
    Check,
    Finding,
    Scratch,
    brief,
    found,
    id_bits,
    id_form,
    unchecked,
    uuid_form,
)
from infra.deploy.doctor_live_inbox import check_prefixes, check_rate_limit, check_triggers
from shared.adapters.zapier_errors import TablesError, TablesRejected
from shared.adapters.zapier_oauth import TOKEN_REFRESH_MARGIN_S
from shared.core.mapping import InvalidRecord, parse_tables_record, to_tables_fields

SAMPLE: dict[str, Any] = {
    "status": "doctor ✓ naïve, \"quoted\"", "retry_count": 3, "score": 0.125,
    "parameters": {"nested": {"list": [1, 2.5, "x", None, True]}, "empty": {}},
    "tags": ["alpha", "beta"], "updated_at": datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
}
VALUE_KEYS = {"status": "value_text", "retry_count": "value_number", "score": "value_decimal",
              "parameters": "value_json", "updated_at": "value_datetime", "tags": "value_multiple_string"}
EDIT_GAP_S = 1.1  # between a write and the next, so a clock counting whole seconds still moves


# --- token -------------------------------------------------------------------------------------------------


def _jwt_claims(token: str) -> dict[str, Any] | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    return claims if isinstance(claims, dict) else None


def check_token(s: Scratch) -> list[Finding]:
    st = s.settings
    if not (st.zapier_client_id and st.zapier_client_secret):
        return [unchecked("token_lifetime", "a token made by the user (ZSYNC_TABLES_TOKEN): no token response "
                                            "to read; it lives as long as its maker said")]
    form = {"grant_type": "client_credentials", "client_id": st.zapier_client_id,
            "client_secret": st.zapier_client_secret.get_secret_value(), "scope": "external",
            "audience": "zapier.com"}
    response = s.raw.session.post(st.zapier_token_url, data=form, timeout=s.raw.timeout_s, allow_redirects=False)
    if response.status_code != 200:
        return [unchecked("token_lifetime", f"the token endpoint answered {brief(response)}")]
    body = response.json()
    expires_in = body.get("expires_in")
    claims = _jwt_claims(str(body.get("access_token") or ""))
    parts = [f"expires_in {expires_in!r}" if expires_in is not None else "no expires_in (3600 s assumed)"]
    life = float(expires_in) if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) else None
    if claims is not None and isinstance(claims.get("exp"), int | float):
        jwt_life = float(claims["exp"]) - float(claims.get("iat") or time.time())
        parts.append(f"a JWT living {jwt_life:.0f} s (exp - iat)")
        if life is not None and abs(jwt_life - life) > 60:
            parts.append("which disagrees with expires_in")
            life = min(life, jwt_life)
        life = jwt_life if life is None else life
    else:
        parts.append("not a JWT (opaque)")
    ok = life is not None and life > TOKEN_REFRESH_MARGIN_S and "disagrees" not in " ".join(parts)
    if life is not None and life <= TOKEN_REFRESH_MARGIN_S:
        parts.append(f"not above the {TOKEN_REFRESH_MARGIN_S:.0f} s refresh margin: every call fetches a new token")
    return [found("token_lifetime", ok, "; ".join(parts))]


# --- records ---------------------------------------------------------------------------------------------


def check_round_trip(s: Scratch) -> list[Finding]:
    t, client = s.table, s.client
    rid_field = s.new_id("rt")
    made = client.create(t, {"id": rid_field, "status": "new"})
    got = client.get(t, made.id)
    start = time.monotonic()
    by_id = client.find_by_field(t, "id", rid_field)
    find_ms = (time.monotonic() - start) * 1000
    client.update(t, made.id, {"status": "updated"})
    after = client.get(t, made.id)
    client.delete(t, made.id)
    gone = client.find_by_field(t, "id", rid_field)
    ok = (got.data.get("id") == rid_field and by_id is not None and by_id.id == made.id
          and after.data.get("status") == "updated" and gone is None)
    observed = (f"record {made.id} ({id_form(made.id)}): get {'ok' if got.data.get('id') == rid_field else 'differs'}, "
                f"find by id {'found it' if by_id is not None and by_id.id == made.id else 'did not find it'}, "
                f"update {'ok' if after.data.get('status') == 'updated' else 'not applied'}, "
                f"delete {'ok' if gone is None else 'still found'}")
    return [found("round_trip", ok, observed),
            unchecked("exact_indexed", f"a find by id took {find_ms:.0f} ms in a table of 1 record; the API does "
                                       "not show how a query is served")]


def check_values(s: Scratch) -> list[Finding]:
    t, spec = s.table, s.spec
    row = dict(SAMPLE, id=s.new_id("values"))
    written = to_tables_fields(spec, row)
    made = s.client.create(t, written)
    got = s.client.get(t, made.id).data
    try:
        parsed = parse_tables_record(spec, got)
        problems: dict[str, str] = {}
    except InvalidRecord as exc:
        parsed, problems = {}, {p["field"]: p["problem"] for p in exc.problems}
    out = []
    for name, key in VALUE_KEYS.items():
        back = got.get(name)
        shown = f"wrote {_short(written[name])}, read {_short(back)}"
        if name in problems:
            out.append(found(key, False, f"{shown}: the sync cannot read it ({problems[name][:80]})"))
        else:
            same = parsed.get(name) == row[name]
            out.append(found(key, same, shown + ("" if same else f": the sync reads {parsed.get(name)!r:.60}")))
    s.client.update(t, made.id, {"status": None, "tags": []})
    emptied = s.client.get(t, made.id).data
    left = {k: emptied[k] for k in ("status", "tags") if emptied.get(k) not in (None, "", [])}
    out.append(found("value_empty", not left, "status and tags read back " + (
        f"still holding {_short(left)}" if left else "empty" + (" (left out of data)" if "status" not in emptied
                                                                else ""))))
    return out


def check_batch(s: Scratch) -> list[Finding]:
    t = s.table
    rows = [{"id": s.new_id("batch"), "status": "batch"} for _ in range(100)]
    try:
        made = s.client.create_many(t, rows)  # one request: the client's batch is 100
        created = f"100 created in one request ({len(made)} answered)"
    except TablesError as exc:
        return [found("batch_100", False, f"a create of 100: {type(exc).__name__}: {str(exc)[:160]}"),
                *check_page(s)]
    removed = s.raw.v2("DELETE", t, body={"record_ids": [uuid_form(r.id) for r in made]})
    live = s.client.find_many(t, "id", [r["id"] for r in rows])
    ok = len(made) == 100 and removed.status_code < 300 and not live
    return [found("batch_100", ok, f"{created}; a v2 delete of 100: {brief(removed)}, {len(live)} left"),
            *check_page(s)]


def check_page(s: Scratch) -> list[Finding]:
    try:
        n = sum(1 for _ in s.client.iter_records(s.table, 1000, trash="include"))
    except TablesError as exc:
        return [found("page_1000", False, f"a query of 1000: {type(exc).__name__}: {str(exc)[:160]}")]
    return [found("page_1000", True, f"a query of 1000 answered ({n} records, trash included)")]


def _short(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)[:60]


def check_refusal(s: Scratch) -> list[Finding]:
    t, client = s.table, s.client
    made = client.create(t, {"id": s.new_id("refuse"), "retry_count": 1})
    seen = []
    try:
        client.update(t, made.id, {"retry_count": "not a number"})
        seen.append("SDK path: accepted")
    except TablesRejected as exc:
        seen.append(f"SDK path: refused ({'in a 200' if exc.status == 200 else f'HTTP {exc.status}'})")
    kept = client.get(t, made.id).data.get("retry_count") == 1
    v2 = s.raw.v2("PATCH", t, body={"updated_records": [
        {"id": uuid_form(made.id), "data": {s.keys["retry_count"]: "not a number"}}]})
    refused_v2 = v2.status_code >= 400 or bool((_first_result(v2) or {}).get("errors"))
    seen.append(f"v2: {brief(v2)}" + (" with per-record errors" if v2.status_code < 400 and refused_v2 else ""))
    unknown = s.raw.v2("PATCH", t, body={"updated_records": [{"id": uuid_form(made.id), "data": {"f99999": "x"}}]})
    seen.append(f"unknown field id on v2: {brief(unknown)}")
    kept = kept and client.get(t, made.id).data.get("retry_count") == 1
    ok = kept and "accepted" not in seen[0] and refused_v2
    return [found("refusal", ok, "; ".join(seen) + ("; the cell kept its value" if kept else "; the cell CHANGED"))]


def _first_result(response: Any) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    results = body.get("results") if isinstance(body, dict) else None
    return results[0] if isinstance(results, list) and results and isinstance(results[0], dict) else None


def _later(a: str | None, b: str | None) -> bool:
    try:
        return datetime.fromisoformat(str(b).replace("Z", "+00:00")) > datetime.fromisoformat(
            str(a).replace("Z", "+00:00"))
    except ValueError:
        return False


def check_edited_at(s: Scratch) -> list[Finding]:
    t, client = s.table, s.client
    version = "2026-01-02T03:04:05.678Z"
    made = client.create(t, {"id": s.new_id("edit"), "status": "a", "updated_at": version})
    before = client.get(t, made.id)
    time.sleep(EDIT_GAP_S)
    client.update(t, made.id, {"status": "b"})
    after = client.get(t, made.id)
    moved = _later(before.edited_at, after.edited_at)
    kept = after.data.get("updated_at") == before.data.get("updated_at")
    first = found("edited_at_moves", moved and after.data.get("status") == "b",
                  f"edited_at {before.edited_at} -> {after.edited_at} (status a -> b, updated_at "
                  f"{'unchanged' if kept else 'CHANGED'})")
    time.sleep(EDIT_GAP_S)
    client.update(t, made.id, {"status": "b"})
    again = client.get(t, made.id)
    same = again.edited_at == after.edited_at
    second = found("edited_at_no_change", same, f"edited_at {after.edited_at} -> {again.edited_at} "
                                                "after writing the same value")
    return [first, second]


def check_trash(s: Scratch) -> list[Finding]:
    t, client = s.table, s.client
    key = s.new_id("trash")
    made = client.create(t, {"id": key, "status": "to delete"})
    client.delete(t, made.id)
    only = [r for r in client.iter_records(t, trash="only") if r.id == made.id]
    include = client.find_many(t, "id", [key], trash="include")
    live = client.find_by_field(t, "id", key)
    seen = [f"trash=only: {'found, deleted_at ' + str(only[0].deleted_at) if only else 'NOT found'}",
            f"trash=include: {'found' if include else 'NOT found'}", f"live query: {'FOUND' if live else 'gone'}"]
    try:
        sdk_get = client.get(t, made.id)
        seen.append(f"SDK get: deleted_at {sdk_get.deleted_at}")
    except TablesError as exc:
        seen.append(f"SDK get: {type(exc).__name__}")
    seen.append(f"v2 get: {brief(s.raw.v2('GET', t, '/' + uuid_form(made.id)))}")
    ok = bool(only and only[0].deleted_at and include and include[0].data.get("id") == key and live is None)
    return [found("trash", ok, "; ".join(seen)),
            unchecked("restore", "the API offers no restore (a person restores in Zapier's UI): restore a "
                                 "record by hand and watch its edited_at and the trigger")]


def check_idempotency(s: Scratch) -> list[Finding]:
    t = s.table
    marker = s.new_id("idem")
    key = str(uuid.uuid4())
    body = {"new_records": [{"data": {s.keys["id"]: marker, s.keys["status"]: "once"}}]}
    first = s.raw.v2("POST", t, body=body, headers={"Idempotency-Key": key})
    if first.status_code >= 300:
        return [unchecked("idempotency_replay", f"a v2 create answered {brief(first)}"),
                unchecked("idempotency_reuse", "the v2 create did not work")]
    second = s.raw.v2("POST", t, body=body, headers={"Idempotency-Key": key})
    records = s.client.find_many(t, "id", [marker])
    a, b = _first_result(first) or {}, _first_result(second) or {}
    replayed = second.headers.get("Idempotent-Replayed")
    same = second.status_code == first.status_code and a.get("id") is not None and a.get("id") == b.get("id")
    observed = (f"first {brief(first)} id {a.get('id')}; again {brief(second)} id {b.get('id')}"
                + (f" (Idempotent-Replayed: {replayed})" if replayed else "") + f"; {len(records)} record(s) made")
    other = dict(body, new_records=[{"data": {s.keys["id"]: marker + "-other"}}])
    reuse = s.raw.v2("POST", t, body=other, headers={"Idempotency-Key": key})
    made_other = s.client.find_many(t, "id", [marker + "-other"])
    reuse_seen = f"same key, other payload: {brief(reuse)}, {len(made_other)} record(s) made"
    return [found("idempotency_replay", same and len(records) == 1, observed),
            found("idempotency_reuse", reuse.status_code >= 400 and not made_other, reuse_seen)]


def check_ids(s: Scratch) -> list[Finding]:
    t = s.table
    made = s.client.create(t, {"id": s.new_id("ids"), "status": "ids"})
    as_uuid = uuid_form(made.id)
    by_uuid = s.raw.v2("GET", t, "/" + as_uuid)
    body = by_uuid.json() if by_uuid.status_code == 200 else {}
    record = body.get("results", [body])[0] if isinstance(body.get("results"), list) else body
    v2_id = record.get("id") if isinstance(record, dict) else None
    ok = by_uuid.status_code == 200 and v2_id is not None and id_bits(v2_id) == id_bits(made.id)
    observed = (f"SDK id {made.id} ({id_form(made.id)}); v2 get by {as_uuid}: {brief(by_uuid)}"
                + (f", id {v2_id} ({id_form(v2_id)}, {'same bits' if ok else 'OTHER bits'})" if v2_id else ""))
    forms = {}
    for form, table_id in (("ULID", t), ("UUID", uuid_form(t))):
        forms[form] = brief(s.raw.v2("GET", table_id, "/" + as_uuid))
    forms_ok = all(v == "HTTP 200" for v in forms.values())
    return [found("ids", ok, observed),
            found("table_id_forms", forms_ok, ", ".join(f"table id as {k}: {v}" for k, v in forms.items()))]


CHECKS: list[Check] = [
    (("token_lifetime",), check_token),
    (("round_trip", "exact_indexed"), check_round_trip),
    ((*VALUE_KEYS.values(), "value_empty"), check_values),
    (("batch_100", "page_1000"), check_batch),
    (("refusal",), check_refusal),
    (("edited_at_moves", "edited_at_no_change"), check_edited_at),
    (("trash", "restore"), check_trash),
    (("idempotency_replay", "idempotency_reuse"), check_idempotency),
    (("ids", "table_id_forms"), check_ids),
    (("trigger_new_or_updated", "trigger_pick", "trigger_deleted", "payload_change", "lease_bounds", "lease_count",
      "lease_order", "payload_delete"), check_triggers),
    (("inbox_prefixes",), check_prefixes),
    (("rate_limit",), check_rate_limit),  # last: it spends the table's rate budget
]
