"""The baseline migration stands for the chain it replaced: a database migrated through the old chain
(infra/supabase/history/) and one migrated from the baseline have the same schema, grants, default
privileges and roles; ``zsync migrate`` on a database where the chain ran (all of it, or part of it)
finishes the chain from history and records the baseline without running it."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
import pytest

from infra.local.postgres import create_database, pg_tool, prepare_database
from infra.squash import dump_schema, parse_dump, render
from shared.adapters.migrations import (
    HISTORY_DIR,
    MIGRATIONS_DIR,
    MigrationError,
    apply_migrations,
    discover,
    pending_migrations,
)

BASELINES = [m for m in discover(MIGRATIONS_DIR) if m.replaces]


def _catalog(url: str, server: object) -> dict[str, object]:
    """What a migration leaves behind, normalised: the dump's objects (sorted, so order does not matter),
    default privileges, ACLs of schemas we do not own, and the roles our migrations create."""
    text = dump_schema(url, pg_tool("pg_dump"), server.system_user)  # type: ignore[attr-defined]
    with psycopg.connect(url) as conn:
        default_acl = conn.execute(
            "SELECT defaclnamespace::regnamespace::text, defaclobjtype, defaclacl::text FROM pg_default_acl "
            "WHERE defaclnamespace::regnamespace::text IN ('zsync', 'public') ORDER BY 1, 2").fetchall()
        schema_acl = conn.execute(
            "SELECT nspname, nspacl::text FROM pg_namespace WHERE nspname IN ('public', 'net') ORDER BY 1").fetchall()
        roles = conn.execute("SELECT rolname, rolcanlogin, rolbypassrls FROM pg_roles "
                             "WHERE rolname LIKE 'zsync%' ORDER BY 1").fetchall()
        # what migrations seed (a dump of the schema does not hold it)
        config = conn.execute("SELECT key, value FROM zsync.config ORDER BY key").fetchall()
    return {"objects": sorted((e.type, e.name, e.sql) for e in parse_dump(text)),
            "default_acl": default_acl, "schema_acl": schema_acl, "roles": roles, "config": config}


def _migrated(pg_server: object, directory: Path) -> str:
    url = create_database(pg_server.get_uri())  # type: ignore[attr-defined]
    prepare_database(url, migrations_dir=directory)
    return url


def _partial_chain(tmp_path: Path, count: int) -> Path:
    part = tmp_path / f"first_{count}"
    part.mkdir()
    for m in discover(HISTORY_DIR)[:count]:
        shutil.copy(m.path, part / m.path.name)
    return part


def test_one_baseline_and_every_function_defined_once() -> None:
    assert len(BASELINES) == 1, "infra/supabase/migrations starts with one baseline (zsync squash)"
    baseline = BASELINES[0]
    assert discover(MIGRATIONS_DIR)[0] == baseline
    assert set(baseline.replaces) == {m.version for m in discover(HISTORY_DIR)}
    for m in discover(MIGRATIONS_DIR):
        sql = m.sql.lower()
        names = [line.split("(")[0] for line in sql.splitlines()
                 if line.startswith(("create function zsync.", "create or replace function zsync."))]
        assert len(names) == len(set(names)), f"{m.path.name} defines a function twice"


def test_the_chain_and_the_baseline_build_the_same_database(pg_server: object, tmp_path: Path) -> None:
    baseline_only = tmp_path / "baseline"
    baseline_only.mkdir()
    shutil.copy(BASELINES[0].path, baseline_only / BASELINES[0].path.name)
    chain = _migrated(pg_server, HISTORY_DIR)
    assert _catalog(chain, pg_server) == _catalog(_migrated(pg_server, baseline_only), pg_server)

    # where the chain ran, migrate records the baseline and runs only what came after it
    later = [m.name for m in discover(MIGRATIONS_DIR)[1:]]
    assert apply_migrations(chain) == [f"{BASELINES[0].name} (recorded: its chain ran here)", *later]
    assert pending_migrations(chain) == []
    assert apply_migrations(chain) == []  # idempotent
    assert _catalog(chain, pg_server) == _catalog(_migrated(pg_server, MIGRATIONS_DIR), pg_server)


def test_a_database_part_way_through_the_chain_gets_the_rest_of_it(pg_server: object, tmp_path: Path) -> None:
    part = _partial_chain(tmp_path, len(discover(HISTORY_DIR)) // 2)
    url = _migrated(pg_server, part)
    applied = apply_migrations(url)
    rest = [m.name for m in discover(HISTORY_DIR)][len(discover(part)):]
    assert applied[: len(rest)] == rest
    assert applied[len(rest)] == f"{BASELINES[0].name} (recorded: its chain ran here)"
    fresh = _migrated(pg_server, MIGRATIONS_DIR)
    assert _catalog(url, pg_server) == _catalog(fresh, pg_server)


def test_a_baseline_whose_chain_is_missing_from_history_is_refused(pg_server: object, tmp_path: Path) -> None:
    part = _partial_chain(tmp_path, 2)
    url = _migrated(pg_server, part)
    empty_history = tmp_path / "history"
    empty_history.mkdir()
    with pytest.raises(MigrationError, match=r"replaces .* which .* lacks"):
        apply_migrations(url, MIGRATIONS_DIR, empty_history)


def test_squash_renders_a_baseline_that_rebuilds_the_chain(pg_server: object, tmp_path: Path) -> None:
    """The tool itself: render the dump of a chain-built database and apply it to a new one."""
    chain = _migrated(pg_server, HISTORY_DIR)
    text = render(parse_dump(dump_schema(chain, pg_tool("pg_dump"), pg_server.system_user)),  # type: ignore[attr-defined]
                  discover(HISTORY_DIR))
    squashed = tmp_path / "squashed"
    squashed.mkdir()
    (squashed / "29991231000000_zsync_baseline.sql").write_text(text, encoding="utf-8")
    rebuilt = _migrated(pg_server, squashed)
    assert _catalog(rebuilt, pg_server) == _catalog(chain, pg_server)


def test_zsync_squash_folds_a_chain_and_moves_it_to_history(tmp_path: Path) -> None:
    """The command on a copy of the old chain: one baseline left, the chain in the history folder, and a
    chain without migrations refused in one line."""
    from typer.testing import CliRunner

    from infra.cli import app

    chain, history = tmp_path / "migrations", tmp_path / "history"
    shutil.copytree(HISTORY_DIR, chain)
    done = CliRunner().invoke(app, ["squash", "--migrations-dir", str(chain), "--history-dir", str(history)])
    assert done.exit_code == 0, done.output
    [baseline] = discover(chain)
    old = {m.version for m in discover(HISTORY_DIR)}
    assert set(baseline.replaces) == {m.version for m in discover(history)} == old
    empty = tmp_path / "none"
    again = CliRunner().invoke(app, ["squash", "--migrations-dir", str(empty), "--history-dir", str(history)])
    assert again.exit_code == 1 and "no migrations" in again.output


def test_three_migrators_at_once_on_a_database_part_way_through_the_chain(pg_server: object, tmp_path: Path) -> None:
    """Each missing chain file runs once and the baseline is recorded once, whoever gets there first."""
    from concurrent.futures import ThreadPoolExecutor

    part = _partial_chain(tmp_path, len(discover(HISTORY_DIR)) - 3)
    url = _migrated(pg_server, part)
    with ThreadPoolExecutor(3) as pool:
        results = [name for applied in pool.map(lambda _: apply_migrations(url), range(3)) for name in applied]
    rest = [m.name for m in discover(HISTORY_DIR)][-3:]
    recorded = f"{BASELINES[0].name} (recorded: its chain ran here)"
    later = [m.name for m in discover(MIGRATIONS_DIR)[1:]]
    assert sorted(results) == sorted([*rest, recorded, *later])
    with psycopg.connect(url) as conn:
        count = conn.execute("SELECT count(*) FROM zsync.schema_migrations").fetchone()[0]  # type: ignore[index]
    assert count == len(discover(HISTORY_DIR)) + len(discover(MIGRATIONS_DIR))


def test_the_local_stacks_database_built_before_a_migration_was_edited_says_how_to_start_afresh(
        database_url: str, tmp_path: Path) -> None:
    """`make up` keeps its database between runs (.local/pg): one built by a checkout from before an unreleased
    migration was edited is refused by the migration tool (as any database is), and the local stack's refusal
    names the directory to remove."""
    from infra.local.postgres import prepare_local_database

    prepare_local_database(database_url, tmp_path / "pg")  # current: nothing to do, no error
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE zsync.schema_migrations SET checksum = 'from-an-older-checkout' "
                     "WHERE version = (SELECT max(version) FROM zsync.schema_migrations)")
    with pytest.raises(MigrationError) as refused:
        prepare_local_database(database_url, tmp_path / "pg")
    assert "changed since they ran" in str(refused.value) and f"remove {tmp_path / 'pg'}" in str(refused.value)
