"""The whole local stack in one process tree, started by ``make up`` (``zsync up``) and by the tests:

* embedded Postgres (pgserver) prepared like a Supabase project and migrated;
* the local Zapier Tables service (records API + "Zap trigger" deliveries to the *_to_supabase URLs);
* the seven functions, each its own functions-framework process (as deployed: one function per URL),
  logging to ``.local/logs/<function>.log``;
* Supabase Database Webhook triggers pointing at the *_to_tables URLs, delivered by the pg_net
  stand-in, plus the outbox sweeper (pg_cron's job in production);
* the Tables trash check every few seconds (``trash_interval_s``; a per-minute schedule in production);
* a moto server for the AWS parts (the SQS dead-letter queue).
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests

from infra.deploy.webhook_sql import render_webhook_sql
from infra.local.pgnet_sender import PgNetSender
from infra.local.pgnet_sql import wait_idle as pgnet_wait_idle
from infra.local.postgres import (
    create_database,
    function_role_url,
    prepare_local_database,
    start_again,
    start_postgres,
    stop_postgres,
)
from infra.local.tables_service import TableConfig, TablesService, start_tables_service
from shared.adapters.zapier_tables import TablesClient
from shared.core.spec import FUNCTIONS, TABLES, Direction
from shared.platform.settings import DEFAULT_SECRET_HEADER

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "functions" / "main.py"
DLQ_NAME = "zsync-local-dlq"
LOCAL_STAGE = "local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortsBusy(RuntimeError):
    """A port the stack needs is held by another program; the message names it and how to choose others."""


MOTO_OFFSET = 9  # moto (AWS) listens on port_base + 9; the Tables API on port_base, the functions between


def busy_ports(ports: list[int]) -> list[int]:
    """The ports of ``ports`` that something already listens on at 127.0.0.1 (or on every address).
    SO_REUSEADDR as the servers set it: a port left in TIME_WAIT by a stopped stack counts as free."""
    busy = []
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def wait_listening(port: int, timeout_s: float = 30.0) -> None:
    """Until something accepts TCP connections on 127.0.0.1:port (no request, so nothing is logged)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s") from None
            time.sleep(0.05)


@dataclass
class FunctionProcess:
    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "functions_framework", "--source", str(MAIN), "--target", self.name,
             "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            start_new_session=True,  # its own process group: kill() takes gunicorn's worker down with it
        )
        log.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        wait_listening(self.port, timeout_s)

    def kill(self) -> None:
        """Hard stop (SIGKILL): what a crashed or scaled-in function looks like."""
        if self.process and self.process.poll() is None:
            # The whole group: SIGKILL on gunicorn's master alone leaves its worker holding the port for a
            # moment, so a restarted function would look ready while the orphan still answers (and resets).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass
class StackConfig:
    state_dir: Path = REPO / ".local"
    port_base: int = 0  # 0: free ports; else tables=base, functions=base+1.., moto=base+9
    sweep_interval_s: float = 5.0
    sweep_min_age_s: float = 30.0
    pgnet_poll_interval_s: float = 0.25
    tables_autoreplay: tuple[float, ...] = ()
    retry_budget_s: float = 8.0
    with_moto: bool = True
    trash_interval_s: float = 5.0  # the Tables trash check (every minute in production); 0: off
    monitor_interval_s: float = 300.0  # the scheduled alert check (the `monitor` Lambda's schedule); 0: off
    function_env: dict[str, str] = field(default_factory=dict)  # extra ZSYNC_* settings for the functions
    tables_rate_limit: int | None = 100  # the Tables service's requests per 5 s per table (Zapier's); None: off
    # "inbox": Zapier trigger inboxes wired by `zsync wire zapier` (the default, as in production);
    # "zaps": the Tables service POSTs each change to the function like a Zap (the seed's path).
    zapier_path: str = "inbox"
    safety_drain_interval_s: float = 60.0  # the scheduled drain (serverless.yml: every minute); 0: off


@dataclass
class LocalStack:
    config: StackConfig = field(default_factory=StackConfig)
    functions: dict[str, FunctionProcess] = field(default_factory=dict)
    database_url: str = ""  # the owner (migrations, pg_net sender, sweeper, tests)
    function_database_url: str = ""  # what the functions use: a LOGIN member of zsync_sync
    secret: str = ""
    token: str = ""
    client_id: str = "zsync-local"
    client_secret: str = ""
    _table_ids: dict[str, str] = field(default_factory=dict)
    dlq_url: str | None = None
    aws_endpoint_url: str | None = None
    tables: TablesService | None = None
    sender: PgNetSender | None = None
    _pg: Any = None
    _moto: subprocess.Popen | None = None
    _sweeper: threading.Thread | None = None
    _monitor: Any = None
    _trash: threading.Thread | None = None
    _trash_lock: threading.Lock = field(default_factory=threading.Lock)
    _drainer: threading.Thread | None = None
    inboxes: dict[str, str] = field(default_factory=dict)  # function -> inbox id
    _stop: threading.Event = field(default_factory=threading.Event)

    # --- lifecycle --------------------------------------------------------------------------------
    def _port(self, offset: int) -> int:
        return self.config.port_base + offset if self.config.port_base else free_port()

    def _credentials(self) -> None:
        path = self.config.state_dir / "credentials.json"
        if path.exists():
            saved = json.loads(path.read_text())
        else:
            saved = {"secret": secrets.token_urlsafe(24), "token": "local-" + secrets.token_urlsafe(18)}
            path.write_text(json.dumps(saved))
            path.chmod(0o600)
        if "client_secret" not in saved:
            saved["client_secret"] = secrets.token_urlsafe(24)
            path.write_text(json.dumps(saved))
        self.secret, self.token = saved["secret"], saved["token"]
        self.client_id, self.client_secret = "zsync-local", saved["client_secret"]

    def planned_ports(self) -> dict[str, int]:
        """part -> the fixed port it will listen on (empty with port_base 0: every part takes a free port)."""
        base = self.config.port_base
        if not base:
            return {}
        ports = {"Zapier Tables API": base}
        ports |= {name: base + i + 1 for i, name in enumerate(sorted(FUNCTIONS))}
        if self.config.with_moto:
            ports["moto (AWS)"] = base + MOTO_OFFSET
        return ports

    def check_ports(self) -> None:
        """Raise :class:`PortsBusy` at once, before anything starts, when a fixed port is taken."""
        planned = self.planned_ports()
        busy = set(busy_ports(list(planned.values())))
        if busy:
            names = ", ".join(f"{port} ({part})" for part, port in planned.items() if port in busy)
            what = f"port {names} is" if len(busy) == 1 else f"ports {names} are"
            base = self.config.port_base
            raise PortsBusy(
                f"{what} in use by another program on 127.0.0.1 (the stack needs {base}-{base + 9}). "
                f"Choose other ports: `make up PORT_BASE={base + 100}` (zsync up --port-base {base + 100}), "
                "or PORT_BASE=0 for free ports (the URLs are then in .local/stack.json).")

    def start(self) -> LocalStack:
        self.check_ports()
        state = self.config.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self._credentials()
        compile_function_code()
        self._pg = start_postgres(state / "pg")
        self.database_url = create_database(self._pg.get_uri(), "zsync")
        prepare_local_database(self.database_url, state / "pg")
        self.function_database_url = function_role_url(self.database_url)
        if self.config.with_moto:
            self._start_moto()
        ports = {name: self._port(i + 1) for i, name in enumerate(sorted(FUNCTIONS))}
        url = {name: f"http://127.0.0.1:{port}/" for name, port in ports.items()}
        self.tables = start_tables_service(
            state / "tables.sqlite3",
            [TableConfig(name=t.name,
                         trigger_url=(url[t.function_name(Direction.TO_SUPABASE)]
                                      if self.config.zapier_path == "zaps" else None))
             for t in TABLES.values()],
            token=self.token, secret_header=DEFAULT_SECRET_HEADER, secret=self.secret,
            client_id=self.client_id, client_secret=self.client_secret,
            port=self._port(0) if self.config.port_base else 0, autoreplay=self.config.tables_autoreplay,
            rate_limit=self.config.tables_rate_limit,
        )
        self._setup_tables()
        env = self.function_env()
        for name, port in ports.items():
            fp = FunctionProcess(name, port, env, state / "logs" / f"{name}.log")
            fp.start()
            self.functions[name] = fp
        for fp in self.functions.values():
            fp.wait_ready()
        self.wire_webhooks()
        if self.config.zapier_path == "inbox":
            self.inboxes = self.wire_inboxes()
            self._drainer = threading.Thread(target=self._drain_loop, name="safety-drain", daemon=True)
            self._drainer.start()
        self.sender = PgNetSender(self.database_url, poll_interval_s=self.config.pgnet_poll_interval_s)
        self.sender.start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="outbox-sweeper", daemon=True)
        self._sweeper.start()
        if self.config.monitor_interval_s > 0:
            self._start_monitor()
        if self.config.trash_interval_s > 0:
            self._trash = threading.Thread(target=self._trash_loop, name="trash-check", daemon=True)
            self._trash.start()
        return self

    def _start_monitor(self) -> None:
        """The alert check on a timer, as the functions' database role, posting to
        ZSYNC_SLACK_WEBHOOK_URL when it is set in the environment of `zsync up`."""
        from infra.monitor import MonitorTimer
        from shared.platform.settings import Settings

        settings = Settings(database_url=self.function_database_url, dlq_url=self.dlq_url,
                            aws_endpoint_url=self.aws_endpoint_url,
                            slack_webhook_url=os.environ.get("ZSYNC_SLACK_WEBHOOK_URL") or None)
        self._monitor = MonitorTimer(self.function_database_url, settings, self.config.monitor_interval_s)
        self._monitor.start()

    def _start_moto(self) -> None:
        """moto's server for the AWS parts, in a process of its own as AWS is: moto keeps its state per Python
        process, so an in-process server (ThreadedMotoServer) shared it with every ``mock_aws()`` the same
        process ran - and ``mock_aws()`` resets that state when it starts, deleting this stack's queue."""
        import boto3

        port = self._port(MOTO_OFFSET)
        logs = self.config.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / "moto.log").open("ab") as log:
            self._moto = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        wait_listening(port, 60)
        self.aws_endpoint_url = f"http://127.0.0.1:{port}"
        sqs = boto3.client("sqs", endpoint_url=self.aws_endpoint_url, region_name="us-east-1",
                           aws_access_key_id="local", aws_secret_access_key="local")
        # A queue of its own per stack (a name with a random part), as before.
        self.dlq_url = sqs.create_queue(QueueName=f"{DLQ_NAME}-{secrets.token_hex(4)}")["QueueUrl"]

    def _setup_tables(self) -> None:
        """Create the tables and fields through the API, as `zsync setup zapier` does in production."""
        from infra.deploy.tables_setup import ensure_tables, table_ids

        with self.tables_client() as client:
            self._table_ids = table_ids(ensure_tables(client))

    def tables_client(self, **kwargs: Any) -> TablesClient:
        """Our client for the local service, with the stack's OAuth client credentials."""
        assert self.tables is not None
        return TablesClient(self.tables.url, None, client_id=self.client_id, client_secret=self.client_secret,
                            token_url=self.tables.url + "/oauth/token/", **kwargs)

    @property
    def table_ids(self) -> dict[str, str]:
        return dict(self._table_ids)

    def function_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZSYNC_")}
        env.update({
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "ZSYNC_DATABASE_URL": self.function_database_url,
            "ZSYNC_WEBHOOK_SECRET": self.secret,
            "ZSYNC_ZAPIER_BASE_URL": self.tables.url if self.tables else "",
            "ZSYNC_ZAPIER_TOKEN_URL": (self.tables.url if self.tables else "") + "/oauth/token/",
            "ZSYNC_ZAPIER_CLIENT_ID": self.client_id,
            "ZSYNC_ZAPIER_CLIENT_SECRET": self.client_secret,
            "ZSYNC_TABLE_IDS": json.dumps(self.table_ids),
            "ZSYNC_STAGE": LOCAL_STAGE,
            "ZSYNC_RETRY_BUDGET_S": str(self.config.retry_budget_s),
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_DEFAULT_REGION": "us-east-1",
        })
        if self.dlq_url:
            env["ZSYNC_DLQ_URL"] = self.dlq_url
        if self.aws_endpoint_url:
            env["ZSYNC_AWS_ENDPOINT_URL"] = self.aws_endpoint_url
        env.update(self.config.function_env)
        return env

    def wire_webhooks(self) -> None:
        urls = {t: self.functions[TABLES[t].function_name(Direction.TO_TABLES)].url for t in TABLES
                if Direction.TO_TABLES in TABLES[t].directions}
        sql = render_webhook_sql(urls)
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(sql)

    def wire_inboxes(self) -> dict[str, str]:
        """`zsync wire zapier` against the local service: the same code as for a real account."""
        from infra.deploy import wire
        from shared.adapters.trigger_inbox import InboxClient
        from shared.platform.settings import Settings

        assert self.tables is not None
        settings = Settings(table_ids=self.table_ids)
        client = InboxClient.for_tables(self.tables_client())
        try:
            choice = wire.choose_trigger(client, None)
            urls = {name: fp.url for name, fp in self.functions.items()}
            changes = wire.apply_inboxes(client, wire.inbox_plan(urls, settings, LOCAL_STAGE), choice)
        finally:
            client.close()
        return {c.function: c.inbox_id or "" for c in changes}

    def safety_drain(self) -> dict[str, Any]:
        """What the every-minute schedule does in production: wake each *_to_supabase function (signed)."""
        import requests

        from shared.edge.handler import WAKE_PARAM

        out: dict[str, Any] = {}
        for name in self.inboxes:
            try:
                r = requests.post(self.functions[name].url, params={WAKE_PARAM: "schedule"}, json={},
                                  headers={DEFAULT_SECRET_HEADER: self.secret}, timeout=60)
                out[name] = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
            except requests.RequestException as exc:  # the function is down: its messages wait in the inbox
                out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        return out

    def _drain_loop(self) -> None:
        interval = self.config.safety_drain_interval_s
        while interval > 0 and not self._stop.wait(interval):
            self.safety_drain()

    def _sweep_loop(self) -> None:
        with contextlib.suppress(psycopg.Error):  # once at start too (`zsync doctor` checks it ran recently)
            self.sweep_outbox(self.config.sweep_min_age_s)
        while not self._stop.wait(self.config.sweep_interval_s):
            with contextlib.suppress(psycopg.Error):
                self.sweep_outbox(self.config.sweep_min_age_s)

    def sweep_outbox(self, min_age_s: float = 0.0) -> int:
        """What the pg_cron jobs do in production: re-send unacknowledged changes (and expire tombstones past
        their retention, hourly there)."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            sent = conn.execute("SELECT zsync.sweep_outbox(make_interval(secs => %s))", (min_age_s,)).fetchone()[0]
            conn.execute("SELECT zsync.expire_tombstones()")
            return sent

    def _trash_loop(self) -> None:
        while not self._stop.wait(self.config.trash_interval_s):
            with self._trash_lock, contextlib.suppress(requests.RequestException, ValueError):
                self.check_trash()

    @contextlib.contextmanager
    def trash_paused(self) -> Iterator[None]:
        """No scheduled trash check runs inside this block (tests that need the trash left alone)."""
        with self._trash_lock:
            yield

    def check_trash(self) -> dict[str, dict[str, Any]]:
        """What the production schedule does (every minute): ask each two-way table's *_to_supabase
        function to apply the deletes made in Zapier Tables (a signed POST of {"zsync": "check_trash"}).
        -> function name -> its answer."""
        from shared.services.tables_trash import deletes_checked

        out = {}
        for spec in TABLES.values():
            if deletes_checked(spec):
                fp = self.functions[spec.function_name(Direction.TO_SUPABASE)]
                r = requests.post(fp.url, json={"zsync": "check_trash"},
                                  headers={DEFAULT_SECRET_HEADER: self.secret}, timeout=60)
                out[fp.name] = r.json() | {"status": r.status_code}
        return out

    def stop(self) -> None:
        self._stop.set()
        if self._monitor:
            self._monitor.stop()
        for fp in self.functions.values():
            fp.stop()
        if self.sender:
            self.sender.stop()
        if self.tables:
            self.tables.stop()
        if self._moto and self._moto.poll() is None:
            self._moto.terminate()
            try:
                self._moto.wait(10)
            except subprocess.TimeoutExpired:
                self._moto.kill()
        if self._pg:
            self._pg.cleanup()

    # --- fault injection (tests) --------------------------------------------------------------
    def stop_postgres(self) -> None:
        stop_postgres(self._pg)

    def start_postgres(self) -> None:
        start_again(self._pg)

    def kill_function(self, name: str) -> None:
        """SIGKILL one function process (a crash); its URL refuses connections until restarted."""
        self.functions[name].kill()

    def restart_function(self, name: str, env: dict[str, str] | None = None) -> None:
        """Restart one function, optionally with extra settings (a redeploy with new configuration)."""
        fp = self.functions[name]
        if env is not None:
            fp.env = {**self.function_env(), **env}
        fp.stop()
        fp.start()
        fp.wait_ready()

    def drop_deliveries(self, share: float, seed: int | str | None = None) -> None:
        """Lose ``share`` (0..1) of the change notifications on both paths, in transit: on the Tables side a
        dropped Zap push counts as failed, so ``tables_autoreplay`` re-sends it (as Zapier's Autoreplay does),
        and a dropped inbox wake-up leaves its messages in the inbox for the next drain; a dropped pg_net
        request is never sent, and the outbox sweeper re-sends it."""
        assert self.tables is not None and self.sender is not None
        dispatcher = self.tables.ctx.dispatcher
        notifier = self.tables.ctx.inboxes.notifier if self.tables.ctx.inboxes is not None else None
        if seed is not None:
            dispatcher._drop_rng.seed(f"{seed}-tables")
            self.sender._drop_rng.seed(f"{seed}-pgnet")
            if notifier is not None:
                notifier._drop_rng.seed(f"{seed}-inbox")
        dispatcher.drop_share = share
        self.sender.drop_share = share
        if notifier is not None:
            notifier.drop_share = share

    def dropped_deliveries(self) -> dict[str, int]:
        """How many notifications ``drop_deliveries`` lost so far, per path."""
        assert self.tables is not None and self.sender is not None
        inboxes = self.tables.ctx.inboxes
        inbox = inboxes.notifier.counts["dropped"] if inboxes is not None else 0
        return {"tables": self.tables.ctx.dispatcher.stats()["dropped"] + inbox,
                "pgnet": self.sender.stats()["dropped"]}

    def tables_fault(self, status: int, for_s: float, *, hang_s: float = 0.0, retry_after: int | None = None) -> None:
        """Make the Tables API answer ``status`` to every request for ``for_s`` seconds (after hanging
        ``hang_s`` seconds first, when given: a hang past the client's timeout)."""
        assert self.tables is not None
        self.tables.ctx.faults.arm(status, 0, retry_after, for_s=for_s, hang_s=hang_s)

    def clear_tables_faults(self) -> None:
        assert self.tables is not None
        self.tables.ctx.faults.clear()

    def function_rss_kb(self) -> dict[str, int]:
        """Resident memory of each running function process (Linux /proc), in KiB."""
        out = {}
        for name, fp in self.functions.items():
            if fp.process and fp.process.poll() is None:
                with contextlib.suppress(OSError):
                    for line in Path(f"/proc/{fp.process.pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            out[name] = int(line.split()[1])
        return out

    # --- for tests and operators ----------------------------------------------------------------
    def wait_quiet(self, timeout_s: float = 30.0, settle_s: float = 0.3) -> None:
        """Until no webhook or Zap delivery is queued or in flight, stably for ``settle_s``."""
        deadline = time.monotonic() + timeout_s
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            pgnet_wait_idle(self.database_url, timeout_s=max(0.1, deadline - time.monotonic()))
            busy = self.tables.stats()["deliveries"]["pending"] if self.tables else 0
            if self.tables and self.tables.ctx.inboxes is not None:
                inbox = self.tables.ctx.inboxes.stats()
                busy += inbox["waiting"] + inbox["notifications"]["pending"]
            if busy == 0:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= settle_s:
                    return
            else:
                quiet_since = None
            time.sleep(0.05)
        raise TimeoutError("stack did not become quiet")

    def info(self) -> dict[str, Any]:
        return {
            "functions": {name: fp.url for name, fp in sorted(self.functions.items())},
            "tables_token": self.token,  # a static token the local service also accepts (OAuth is the default)
            "zapier_base_url": self.tables.url if self.tables else None,
            "zapier_token_url": (self.tables.url + "/oauth/token/") if self.tables else None,
            "zapier_client_id": self.client_id,
            "zapier_client_secret": self.client_secret,
            "table_ids": self.table_ids,
            "database_url": self.database_url,
            "function_database_url": self.function_database_url,
            "secret_header": DEFAULT_SECRET_HEADER,
            "secret": self.secret,
            "dlq_url": self.dlq_url,
            "aws_endpoint_url": self.aws_endpoint_url,
            "stage": LOCAL_STAGE,
            "zapier_path": self.config.zapier_path,
            "inboxes": self.inboxes,
            "logs": {name: str(fp.log_path) for name, fp in sorted(self.functions.items())},
        }

    def write_info(self) -> Path:
        path = self.config.state_dir / "stack.json"
        path.write_text(json.dumps(self.info(), indent=2) + "\n")
        path.chmod(0o600)
        return path


def compile_function_code() -> None:
    """Write the bytecode of the code the functions import, as a deployment would have it: a function
    process then loads it instead of compiling every module at each start (with PYTHONDONTWRITEBYTECODE
    set, as on some machines, it never writes it itself). Cheap when it is up to date."""
    for package in ("shared", "functions"):
        compileall.compile_dir(REPO / package, quiet=1, workers=1)


@contextlib.contextmanager
def running_stack(state_dir: Path, **config: Any) -> Iterator[LocalStack]:
    """A started stack on free ports (tests, benchmarks); stopped and its state removed afterwards."""
    stack = LocalStack(StackConfig(state_dir=state_dir, port_base=0, **config))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
