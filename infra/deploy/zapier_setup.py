"""``zsync wire zapier``: the exact Zaps to create for the deployed functions (Zapier has no API for it).

Derived from :mod:`shared.core.spec` only: one Zap per ``*_to_supabase`` function (Zapier Tables
"New or Updated Record", or "New Record" for the append-only audit_log -> Webhooks by Zapier POST to
the function URL with the shared secret header), plus, for ``ZSYNC_TABLES_WRITER=catch_hook`` only,
one Zap per ``*_to_tables`` function (Catch Hook -> Find or Create Record by ``id`` -> Update Record).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.core.spec import FUNCTIONS, Direction, Field, FunctionSpec, Kind
from shared.platform.settings import Settings

SECRET_PLACEHOLDER = "<value of ZSYNC_WEBHOOK_SECRET>"
RECORD_ID = "Record ID"  # the Zapier Tables trigger's own id of the record

# How each typed Zapier Tables field (``zsync setup zapier`` makes them, types from shared.core.spec) is mapped.
_HOW = {
    Kind.TEXT: "text field: map it as is",
    Kind.INT: "number field: map it as is (a whole number)",
    Kind.FLOAT: "number field: map it as is",
    Kind.JSON: "JSON field: map it as is, no Code step; the function takes the JSON value (or its text) and "
               "parses it",
    Kind.TIMESTAMP: "date/time field: map it as is (ISO-8601)",
    Kind.TEXT_ARRAY: "multiple-text (list) field: map the whole list as is; the function takes a list "
                     "(or Zapier's comma-joined text of it)",
}


def _source_field(fn: FunctionSpec, f: Field) -> str:
    # audit_log has no id column in Tables: one Supabase row per Tables record, keyed by its Record ID.
    if f.name == fn.table.key and fn.table.append_only:
        return RECORD_ID
    return f.name


def _data_mapping(fn: FunctionSpec) -> list[dict[str, str]]:
    rows = []
    for f in fn.table.fields:
        source = _source_field(fn, f)
        rows.append({
            "key": f.name,
            "value": f"{{{{1. {source}}}}}",
            "from": f"Step 1 (Zapier Tables record): {source}",
            "kind": f.kind.value,
            "zapier_type": f.zapier_type,
            "how": "the record's own Zapier Tables Record ID" if source == RECORD_ID else _HOW[f.kind],
        })
    return rows


def _table_ref(settings: Settings, table: str) -> dict[str, str | None]:
    return {"name": table, "table_id": settings.table_ids.get(table)}


def to_supabase_zap(fn: FunctionSpec, url: str, settings: Settings, secret: str) -> dict[str, Any]:
    spec = fn.table
    notes = [
        ("Map every row even when the field is often empty: empty numbers, JSON, timestamps and lists "
         "are read as no value."),
        "In the Zap settings enable Autoreplay (paid plans) so failed runs are retried.",
    ]
    if spec.append_only:
        notes.insert(0, "Append-only: the function inserts each Record ID once and never updates it, "
                        "so the trigger is New Record.")
    else:
        notes.insert(0, "The function ignores echoes of its own writes (same updated_at), so this trigger firing "
                        "on records the *_to_tables function wrote does not loop.")
    return {
        "zap": fn.seed_zap,
        "title": f"zsync {fn.seed_zap}: {spec.name} (Zapier Tables -> Supabase)",
        "function": fn.name,
        "table": spec.name,
        "required": True,
        "trigger": {
            "step": 1,
            "app": "Zapier Tables",
            "event": "New Record" if spec.append_only else "New or Updated Record",
            "table": _table_ref(settings, spec.name),
        },
        "actions": [{
            "step": 2,
            "app": "Webhooks by Zapier",
            "event": "POST",
            "url": url,
            "payload_type": "json",
            "wrap_request_in_array": "no",
            "unflatten": "no",
            "headers": {"Content-Type": "application/json", settings.secret_header: secret},
            "data": _data_mapping(fn),
        }],
        "replaces_seed_steps": "Code by Zapier parse step, Supabase REST upsert, success filter, audit_log step",
        "notes": notes,
    }


def catch_hook_zap(fn: FunctionSpec, settings: Settings) -> dict[str, Any]:
    spec = fn.table
    fields = [{"field": f.name, "value": f"{{{{1. {f.name}}}}}", "kind": f.kind.value, "zapier_type": f.zapier_type}
              for f in spec.fields]
    return {
        "zap": fn.seed_zap,
        "title": f"zsync {fn.seed_zap}: {spec.name} (catch hook -> Zapier Tables)",
        "function": fn.name,
        "table": spec.name,
        "required": False,
        "only_if": "ZSYNC_TABLES_WRITER=catch_hook (the default, api, writes to Tables directly: skip this Zap)",
        "trigger": {"step": 1, "app": "Webhooks by Zapier", "event": "Catch Hook"},
        "actions": [
            {
                "step": 2,
                "app": "Zapier Tables",
                "event": "Find or Create Record",
                "table": _table_ref(settings, spec.name),
                "search_field": spec.key,
                "search_value": f"{{{{1. {spec.key}}}}}",
                "create_if_not_found": True,
                "fields": fields,
            },
            {
                "step": 3,
                "app": "Zapier Tables",
                "event": "Update Record",
                "table": _table_ref(settings, spec.name),
                "record": "{{2. Record ID}}",
                "fields": fields,
            },
        ],
        "after": (f"copy the hook URL into ZSYNC_CATCH_HOOK_URLS as {{\"{spec.name}\": \"<hook URL>\"}} "
                  f"(one JSON object for all tables), then redeploy"),
        "notes": ["The function sends the fields flat with typed values (JSON fields as JSON values, lists as "
                  "arrays, numbers as numbers), named as the Tables fields `zsync setup zapier` made.",
                  "Catch hooks answer 200 before the Zap runs: failures show only in Zap history."],
    }


def plan(function_urls: Mapping[str, str], settings: Settings, *, show_secret: bool = False) -> dict[str, Any]:
    """Every Zap to create, as JSON-ready data."""
    secret = SECRET_PLACEHOLDER
    if show_secret and settings.webhook_secret is not None:
        secret = settings.webhook_secret.get_secret_value()
    zaps = [to_supabase_zap(fn, function_urls[name], settings, secret)
            for name, fn in FUNCTIONS.items() if fn.direction is Direction.TO_SUPABASE]
    optional = [catch_hook_zap(fn, settings) for fn in FUNCTIONS.values() if fn.direction is Direction.TO_TABLES]
    return {
        "secret_header": settings.secret_header,
        "tables_writer": settings.tables_writer.value,
        "zaps": zaps,
        "catch_hook_zaps": optional,
    }


def _md_table(table: dict[str, Any] | None) -> str:
    if not table:
        return ""
    return f" in table **{table['name']}**" + (f" (`{table['table_id']}`)" if table["table_id"] else "")


def _md_zap(zap: dict[str, Any]) -> list[str]:
    out = [f"## {zap['title']}", ""]
    if not zap["required"]:
        out += [f"_Only if {zap['only_if']}._", ""]
    trig = zap["trigger"]
    out.append(f"- [ ] Step 1 trigger: **{trig['app']}** — {trig['event']}{_md_table(trig.get('table'))}")
    for action in zap["actions"]:
        out.append(f"- [ ] Step {action['step']} action: **{action['app']}** — {action['event']}"
                   f"{_md_table(action.get('table'))}")
        if action["app"] == "Webhooks by Zapier":
            out += [
                f"  - URL: `{action['url']}`",
                f"  - Payload Type: `{action['payload_type']}`; Wrap Request In Array: no; Unflatten: no",
                "  - Headers:",
                *[f"    - `{k}`: `{v}`" for k, v in action["headers"].items()],
                "  - Data (one row per field):",
                *[f"    - [ ] `{row['key']}` ← `{row['value']}` ({row['how']})" for row in action["data"]],
            ]
        else:
            if "search_field" in action:
                out.append(f"  - Search field `{action['search_field']}` = `{action['search_value']}`; "
                           "create if not found: yes")
            if "record" in action:
                out.append(f"  - Record: `{action['record']}`")
            out.append("  - Fields: " + ", ".join(f"`{f['field']}` ← `{f['value']}`" for f in action["fields"]))
    if zap.get("after"):
        out.append(f"- [ ] Then {zap['after']}")
    out += [f"- Note: {n}" for n in zap["notes"]]
    out.append("- [ ] Test the Zap, then turn it on")
    return [*out, ""]


def to_markdown(p: dict[str, Any]) -> str:
    lines = [
        "# Zaps to create for zsync",
        "",
        f"Every request carries the shared secret in header `{p['secret_header']}`.",
        "`{{1. field}}` means: map that field of step 1 (the trigger) in the Zap editor.",
        "Turn off the seed's Zaps 3A-3G once these are on.",
        "",
    ]
    for zap in p["zaps"]:
        lines += _md_zap(zap)
    lines += ["# Optional: catch-hook Zaps", "",
              f"Needed only with `ZSYNC_TABLES_WRITER=catch_hook` (now: `{p['tables_writer']}`).", ""]
    for zap in p["catch_hook_zaps"]:
        lines += _md_zap(zap)
    return "\n".join(lines)
