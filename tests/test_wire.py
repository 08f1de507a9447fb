"""The deployment commands through the real root CLI: wire supabase (dry run and applied to a real
Postgres), wire zapier, gcloud, deploy's stack-output reading (moto CloudFormation), doctor against the
local stack's seven function processes, and --help for every command."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
import typer
from typer.testing import CliRunner

from infra.deploy import load_urls, write_urls
from infra.deploy.aws import stack_name, url_output_key
from infra.deploy.cli import register
from infra.deploy.webhook_sql import trigger_name
from shared.core.spec import FUNCTIONS, TABLES, WEBHOOK_TABLES, Direction, Kind
from shared.platform.settings import reset_settings

SECRET = "wire-" + secrets.token_urlsafe(16)
HEADER = "X-Zsync-Secret"


def root_app() -> typer.Typer:
    app = typer.Typer(no_args_is_help=True)

    @app.callback()
    def _root() -> None:
        """zsync (test root)."""

    register(app)
    return app


def run(*args: str) -> Any:
    return CliRunner().invoke(root_app(), list(args), catch_exceptions=False)


@pytest.fixture
def env(zsync_env) -> pytest.MonkeyPatch:
    return zsync_env(webhook_secret=SECRET, secret_header=HEADER)


def fake_urls(tag: str = "v1") -> dict[str, str]:
    return {name: f"https://{name.replace('_', '-')}-{tag}.lambda-url.us-east-1.on.aws/" for name in FUNCTIONS}


@pytest.fixture
def urls_file(tmp_path: Path) -> Path:
    return write_urls(tmp_path / "urls.test.json", fake_urls())


# --- help -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["deploy"], ["wire"], ["wire", "supabase"], ["wire", "zapier"], ["doctor"],
                                     ["gcloud"]])
def test_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_registered_on_the_real_root_app() -> None:
    from infra.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("deploy", "wire", "doctor", "gcloud"):
        assert name in result.output


# --- urls file --------------------------------------------------------------------------------------


def test_urls_file_must_name_the_seven_functions(tmp_path: Path, env: Any) -> None:
    partial = write_urls(tmp_path / "partial.json", {"agent_jobs_to_tables": "https://x/"})
    result = run("wire", "zapier", "--urls", str(partial))
    assert result.exit_code == 2
    assert "no URL for" in result.output
    result = run("wire", "zapier", "--urls", str(tmp_path / "missing.json"))
    assert result.exit_code == 2 and "zsync deploy" in result.output


# --- wire supabase ----------------------------------------------------------------------------------


def test_wire_supabase_dry_run_holds_no_secret(urls_file: Path, env: Any) -> None:
    result = run("wire", "supabase", "--urls", str(urls_file), "--dry-run")
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output and HEADER not in result.output  # the webhooks are secret-free wake-ups
    assert "zsync_webhook_secret" in result.output  # ... and the Vault secret older versions kept is deleted
    urls = fake_urls()
    for table in WEBHOOK_TABLES:
        assert trigger_name(table) in result.output
        assert urls[TABLES[table].function_name(Direction.TO_TABLES)] in result.output
    for name, url in urls.items():
        if FUNCTIONS[name].direction is Direction.TO_SUPABASE:
            assert url not in result.output


def test_wire_supabase_needs_no_secret(urls_file: Path, env: pytest.MonkeyPatch) -> None:
    env.delenv("ZSYNC_WEBHOOK_SECRET")
    result = run("wire", "supabase", "--urls", str(urls_file), "--dry-run")
    assert result.exit_code == 0, result.output


def _triggers(database_url: str) -> dict[str, str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return dict(conn.execute(
            "SELECT table_name, url FROM zsync.webhook_endpoints e WHERE EXISTS (SELECT 1 FROM pg_trigger t "
            "WHERE t.tgname = 'zsync_' || e.table_name || '_webhook')").fetchall())


def test_wire_supabase_applies_idempotently(tmp_path: Path, env: Any, database_url: str) -> None:
    first = write_urls(tmp_path / "v1.json", fake_urls("v1"))
    result = run("wire", "supabase", "--urls", str(first), "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    assert result.output.count("created") == len(WEBHOOK_TABLES)
    expected = {t: fake_urls("v1")[f"{t}_to_tables"] for t in WEBHOOK_TABLES}
    assert _triggers(database_url) == expected

    again = run("wire", "supabase", "--urls", str(first), "--database-url", database_url)
    assert again.exit_code == 0 and again.output.count("unchanged") == len(WEBHOOK_TABLES)

    second = write_urls(tmp_path / "v2.json", fake_urls("v2"))
    moved = run("wire", "supabase", "--urls", str(second), "--database-url", database_url)
    assert moved.exit_code == 0 and moved.output.count("replaced") == len(WEBHOOK_TABLES)
    assert _triggers(database_url) == {t: fake_urls("v2")[f"{t}_to_tables"] for t in WEBHOOK_TABLES}

    # A new secret (rotation) changes nothing in the database: it holds none.
    env.setenv("ZSYNC_WEBHOOK_SECRET", "rotated-" + SECRET)
    from shared.platform.settings import reset_settings

    reset_settings()
    rotated = run("wire", "supabase", "--urls", str(second), "--database-url", database_url)
    assert rotated.exit_code == 0 and rotated.output.count("unchanged") == len(WEBHOOK_TABLES), rotated.output
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM vault.secrets WHERE name = 'zsync_webhook_secret'").fetchone() == (0,)
        args = conn.execute("SELECT string_agg(encode(tgargs, 'escape') || pg_get_triggerdef(oid), ' ') "
                            "FROM pg_trigger WHERE tgname LIKE 'zsync_%%_webhook'").fetchone()[0]
    assert SECRET not in args and args.count("zsync.webhook_request()") == len(WEBHOOK_TABLES)


def test_wire_supabase_refuses_a_database_without_webhooks(tmp_path: Path, env: Any, pg_server: Any) -> None:
    from infra.local.postgres import create_database

    bare = create_database(pg_server.get_uri())
    result = run("wire", "supabase", "--urls", str(write_urls(tmp_path / "u.json", fake_urls())),
                 "--database-url", bare)
    assert result.exit_code == 1
    assert "enable Database Webhooks" in result.output


# --- wire zapier ------------------------------------------------------------------------------------


def test_wire_zapier_json_covers_every_to_supabase_function_and_field(urls_file: Path, env: Any) -> None:
    env.setenv("ZSYNC_TABLE_IDS", json.dumps({"agent_jobs": "tbl_jobs"}))
    result = run("wire", "zapier", "--zaps", "--urls", str(urls_file), "--format", "json")
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    plan = json.loads(result.output)
    urls = fake_urls()
    to_supabase = {n for n, f in FUNCTIONS.items() if f.direction is Direction.TO_SUPABASE}
    assert {z["function"] for z in plan["zaps"]} == to_supabase and len(to_supabase) == 4
    for zap in plan["zaps"]:
        fn = FUNCTIONS[zap["function"]]
        assert zap["zap"] == fn.seed_zap
        assert zap["trigger"]["app"] == "Zapier Tables"
        assert zap["trigger"]["event"] == ("New Record" if fn.table.append_only else "New or Updated Record")
        assert zap["trigger"]["table"]["name"] == fn.table.name
        (post,) = zap["actions"]
        assert post["app"] == "Webhooks by Zapier" and post["event"] == "POST"
        assert post["url"] == urls[fn.name]
        assert post["payload_type"] == "json"
        assert post["headers"][HEADER] == "<value of ZSYNC_WEBHOOK_SECRET>"
        assert [row["key"] for row in post["data"]] == list(fn.table.field_names)
        by_key = {row["key"]: row for row in post["data"]}
        for name in fn.table.fields_of(Kind.JSON):
            assert by_key[name]["zapier_type"] == "json" and "JSON field" in by_key[name]["how"]
            assert "text as stored" not in by_key[name]["how"]
        for name in fn.table.fields_of(Kind.TEXT_ARRAY):
            assert by_key[name]["zapier_type"].startswith("multiple_") and "list" in by_key[name]["how"]
            assert "comma-separated" not in by_key[name]["how"]
        expected_id = "{{1. Record ID}}" if fn.table.append_only else "{{1. id}}"
        assert by_key["id"]["value"] == expected_id
    jobs = next(z for z in plan["zaps"] if z["table"] == "agent_jobs")
    assert jobs["trigger"]["table"]["table_id"] == "tbl_jobs"
    assert {z["function"] for z in plan["catch_hook_zaps"]} == {
        n for n, f in FUNCTIONS.items() if f.direction is Direction.TO_TABLES}
    for zap in plan["catch_hook_zaps"]:
        assert zap["required"] is False
        assert zap["trigger"]["event"] == "Catch Hook"
        assert zap["actions"][0]["event"] == "Find or Create Record"
        assert zap["actions"][0]["search_field"] == "id"
        assert [f["field"] for f in zap["actions"][0]["fields"]] == list(TABLES[zap["table"]].field_names)

    shown = run("wire", "zapier", "--zaps", "--urls", str(urls_file), "--format", "json", "--show-secret")
    assert all(z["actions"][0]["headers"][HEADER] == SECRET for z in json.loads(shown.output)["zaps"])


def test_wire_zapier_markdown_checklist(urls_file: Path, env: Any) -> None:
    result = run("wire", "zapier", "--zaps", "--urls", str(urls_file))
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    for fn in FUNCTIONS.values():
        assert f"zsync {fn.seed_zap}: {fn.table.name}" in result.output
        if fn.direction is Direction.TO_SUPABASE:
            for field in fn.table.field_names:
                assert f"- [ ] `{field}` ←" in result.output


# --- gcloud -----------------------------------------------------------------------------------------


def test_gcloud_script_deploys_the_seven_targets(tmp_path: Path, env: Any) -> None:
    out = tmp_path / "deploy-gcloud.sh"
    env.setenv("ZSYNC_TABLE_IDS", json.dumps({"agent_jobs": "tbl,with,commas"}))  # three tables without an id
    refused = run("gcloud", "--project", "my-proj", "--region", "europe-west1", "--out", str(out))
    assert refused.exit_code == 1 and "no table id for agent_decisions, audit_log, rate_limits" in refused.output
    assert not out.exists()
    env.setenv("ZSYNC_TABLE_IDS", json.dumps({"agent_jobs": "tbl,with,commas", "agent_decisions": "t2",
                                              "audit_log": "t3", "rate_limits": "t4"}))
    result = run("gcloud", "--project", "my-proj", "--region", "europe-west1", "--out", str(out))
    assert result.exit_code == 0, result.output
    script = out.read_text()
    assert SECRET not in script
    deploys = [line for line in script.splitlines() if line.startswith("gcloud functions deploy ")]
    assert sorted(line.split()[3] for line in deploys) == sorted(FUNCTIONS)
    for name in FUNCTIONS:
        assert f"--entry-point {name} --source ." in script
    assert script.count("--gen2 --runtime python312 --trigger-http --allow-unauthenticated") == 7
    assert script.count('--set-secrets "$SECRETS"') == 7
    assert "ZSYNC_DATABASE_URL=zsync-database-url:latest" in script
    assert "tbl,with,commas" in script  # JSON survives gcloud's comma-separated list syntax (custom delimiter)
    assert subprocess.run(["bash", "-n", str(out)], check=False).returncode == 0
    assert os.access(out, os.X_OK)


# --- deploy -----------------------------------------------------------------------------------------


def test_function_urls_are_read_from_the_stack_outputs(env: pytest.MonkeyPatch) -> None:
    import boto3
    from moto import mock_aws

    from infra.deploy.aws import function_urls_from_stack

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "eu-west-1"}.items():
        env.setenv(key, value)
    urls = fake_urls()
    template = {
        "Resources": {"DeadLetterQueue": {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": "zsync-t-dlq"}}},
        "Outputs": {url_output_key(name): {"Value": url} for name, url in urls.items()},
    }
    with mock_aws():
        boto3.client("cloudformation", region_name="eu-west-1").create_stack(
            StackName=stack_name("t"), TemplateBody=json.dumps(template))
        assert function_urls_from_stack("t", "eu-west-1") == urls
        with pytest.raises(Exception, match="zsync-nope"):
            function_urls_from_stack("nope", "eu-west-1")


def test_deploy_explains_missing_tooling_and_credentials(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("PATH", str(tmp_path))  # no npx
    result = run("deploy", "--stage", "t")
    assert result.exit_code == 1 and "npx is not on PATH" in result.output

    from infra.deploy import DeployError
    from infra.deploy.aws import check_credentials

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        env.delenv(key)
    env.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    env.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(DeployError, match="no AWS credentials"):
        check_credentials("us-east-1")


def test_write_and_load_urls_round_trip(tmp_path: Path) -> None:
    path = write_urls(tmp_path / "deep" / "urls.x.json", fake_urls(), stage="x")
    assert load_urls(path) == fake_urls()
    assert json.loads(path.read_text())["stage"] == "x"


# --- doctor -----------------------------------------------------------------------------------------


def _stack_env(env: pytest.MonkeyPatch, info: dict[str, Any]) -> None:
    env.setenv("ZSYNC_WEBHOOK_SECRET", info["secret"])
    env.setenv("ZSYNC_SECRET_HEADER", info["secret_header"])
    env.setenv("ZSYNC_DATABASE_URL", info["database_url"])
    env.setenv("ZSYNC_ZAPIER_BASE_URL", info["zapier_base_url"])
    env.setenv("ZSYNC_ZAPIER_TOKEN_URL", info["zapier_token_url"])
    env.setenv("ZSYNC_ZAPIER_CLIENT_ID", info["zapier_client_id"])
    env.setenv("ZSYNC_ZAPIER_CLIENT_SECRET", info["zapier_client_secret"])
    env.setenv("ZSYNC_TABLE_IDS", json.dumps(info["table_ids"]))
    env.setenv("ZSYNC_RETRY_BUDGET_S", "2")
    env.setenv("ZSYNC_STAGE", info["stage"])  # whose trigger inboxes doctor checks
    reset_settings()


def test_doctor_passes_on_the_local_stack_and_names_each_problem(stack: Any, env: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    info = stack.info()
    urls = write_urls(tmp_path / "urls.local.json", info["functions"])
    _stack_env(env, info)
    stack.sweep_outbox(60)  # what pg_cron does every 30 s in production (doctor checks it ran recently)
    stack.check_trash()  # what the per-minute schedule does (doctor checks it ran recently)
    ok = run("doctor", "--urls", str(urls), "--timeout", "10")
    assert ok.exit_code == 0, ok.output
    assert "All checks passed" in ok.output
    assert info["secret"] not in ok.output
    assert ok.output.count("pending") >= 4  # each trigger inbox's backlog

    # wrong secret, wrong token, a table without id, and webhook triggers pointing elsewhere
    env.setenv("ZSYNC_WEBHOOK_SECRET", "not-the-deployed-secret")
    env.setenv("ZSYNC_TABLES_TOKEN", "wrong-token")
    env.setenv("ZSYNC_TABLE_IDS", json.dumps({k: v for k, v in info["table_ids"].items() if k != "rate_limits"}))
    moved = dict(info["functions"], agent_jobs_to_tables="http://127.0.0.1:9/")
    bad_urls = write_urls(tmp_path / "urls.moved.json", moved)
    reset_settings()
    bad = run("doctor", "--urls", str(bad_urls), "--timeout", "5")
    assert bad.exit_code == 1
    out = " ".join(bad.output.split("problem(s):", 1)[1].split())  # the list after the table
    assert out.count("signed ping refused with 401") == 6
    assert "agent_jobs_to_tables: unreachable" in out
    assert "TablesAuthError" in out
    assert 'add "rate_limits" to ZSYNC_TABLE_IDS' in out
    assert "zsync_agent_jobs_webhook" in out and "run `zsync wire supabase`" in out
    assert "wrong-token" not in bad.output and "not-the-deployed-secret" not in bad.output


def test_doctor_checks_the_secret_free_wakeup_of_each_to_tables_function(stack: Any) -> None:
    from infra.deploy import doctor
    from shared.platform.settings import Settings

    settings = Settings(webhook_secret=stack.secret)
    for name, fp in stack.functions.items():
        wake = [c for c in doctor.check_function(name, fp.url, settings, 10) if c.area == "wake"]
        if FUNCTIONS[name].direction is Direction.TO_TABLES:
            assert [(c.ok, c.detail) for c in wake] == [(True, "unsigned wake-up drained the outbox")], name
        else:
            assert wake == [], name
    unreachable = doctor._check_wake("agent_jobs_to_tables", "http://127.0.0.1:9/", 5)
    assert not unreachable.ok and unreachable.area == "wake"


def test_deploy_preflight_finds_missing_secrets(env: pytest.MonkeyPatch) -> None:
    import boto3
    from moto import mock_aws

    from infra.deploy.aws import missing_secrets

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        env.setenv(key, value)
    with mock_aws():
        assert missing_secrets("pre") == ["database_url", "webhook_secret", "zapier_client_id", "zapier_client_secret"]
        boto3.client("ssm").put_parameter(Name="/zsync/pre/webhook_secret", Value="x", Type="SecureString")
        boto3.client("ssm").put_parameter(Name="/zsync/other/database_url", Value="x", Type="SecureString")
        boto3.client("secretsmanager").create_secret(Name="zsync/pre/zapier_client_secret", SecretString="x")
        boto3.client("ssm").put_parameter(Name="/zsync/pre/zapier_client_id", Value="x", Type="SecureString")
        assert missing_secrets("pre") == ["database_url"]


# --- zsync wire zapier: which Tables trigger --------------------------------------------------------------


class _Actions:
    """The two app-metadata answers choose_trigger reads (the action lists Zapier's app listing would give)."""

    def __init__(self, actions: list[dict[str, Any]]) -> None:
        self.actions = actions

    def tables_implementation(self) -> str:
        return "TableCLIAPI@9.9.9"

    def read_actions(self, app_key: str) -> list[dict[str, Any]]:
        return self.actions


_NEW = {"key": "k1", "name": "New Record", "description": "Triggers when a new record is added to a table."}
_UPDATED = {"key": "k2", "name": "Updated Record", "description": "Triggers when a record is updated on a table."}
_NEW_OR_UPDATED = {"key": "k3", "name": "New or Updated Record",
                   "description": "Triggers when a record is added or updated on a table."}
_WITH_DELETES = {"key": "k4", "name": "New, Updated, or Deleted Record",
                 "description": "Triggers when a record is added, updated, or deleted in a table."}


def test_wire_zapier_prefers_the_deletes_capable_trigger_and_says_why() -> None:
    from infra.deploy import wire

    choice = wire.choose_trigger(_Actions([_NEW, _UPDATED, _NEW_OR_UPDATED, _WITH_DELETES]), None)  # type: ignore[arg-type]
    assert choice.action_key == "k4" and choice.deletes
    assert "also delivers deletes" in choice.why and "trash check stays on" in choice.why

    without = wire.choose_trigger(_Actions([_NEW, _UPDATED, _NEW_OR_UPDATED]), None)  # type: ignore[arg-type]
    assert without.action_key == "k3" and not without.deletes
    assert "no trigger of it delivers deletes" in without.why and "trash check" in without.why

    hidden = wire.choose_trigger(_Actions([_NEW_OR_UPDATED, _WITH_DELETES | {"is_hidden": True}]), None)  # type: ignore[arg-type]
    assert hidden.action_key == "k3"
    given = wire.choose_trigger(_Actions([_NEW_OR_UPDATED, _WITH_DELETES]), "k3")  # type: ignore[arg-type]
    assert given.action_key == "k3" and not given.deletes and "--trigger-key" in given.why
