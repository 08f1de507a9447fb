"""The Zapier clients' HTTP layer (``shared/platform/http_client.py``, urllib3 directly): proxies from the
environment (a real forward proxy on 127.0.0.1), ``NO_PROXY``, the CA bundle, and that a function loading
and handling a delivery never imports ``requests``."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from shared.adapters.zapier_retry import RetryPolicy
from shared.platform.http_client import Pool, TransportError, ca_bundle, environ_proxy
from tests.receiver import serving
from tests.tables_local import start_local_tables

ROOT = Path(__file__).resolve().parent.parent
SECRET = "http-client-secret"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def forward_proxy(seen: list[str]):
    """A plain HTTP forward proxy (no CONNECT) that only forwards to 127.0.0.1 and records each URL."""
    from http.server import BaseHTTPRequestHandler

    class Proxy(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            target = urlsplit(self.path)
            seen.append(self.path)
            if not self.path.startswith("http://") or target.hostname != "127.0.0.1":
                self.send_error(403, "this proxy only forwards to http://127.0.0.1")
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("proxy-connection", "connection", "keep-alive")}
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
            try:
                path = target.path + (f"?{target.query}" if target.query else "")
                conn.request(self.command, path or "/", body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status, answer.reason)
                for key, value in answer.getheaders():
                    if key.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
            finally:
                conn.close()

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

        def log_message(self, *args: object) -> None:
            pass

    return serving(Proxy)


def test_tables_calls_go_through_the_environments_proxy_unless_no_proxy_names_the_host(no_proxy_env, tmp_path):
    seen: list[str] = []
    with forward_proxy(seen) as proxy, start_local_tables(tmp_path / "t.sqlite3", names=["agent_jobs"]) as tables:
        no_proxy_env.setenv("HTTP_PROXY", proxy)
        no_proxy_env.setenv("NO_PROXY", "example.invalid,.other.invalid")
        with tables.client() as client:
            assert client._session.proxy_for(tables.url) == proxy
            client.tokens.invalidate()  # fetch the token (through the proxy) again
            assert [t["name"] for t in client.list_tables()] == ["agent_jobs"]
        # the token fetch and the API call both went through the proxy, by absolute URL
        assert f"{tables.url}/oauth/token/" in seen
        assert any(url.startswith(f"{tables.url}/api/v0/sdk/tables/api/v1/tables?") for url in seen)

        seen.clear()
        no_proxy_env.setenv("NO_PROXY", "localhost,127.0.0.1")
        with tables.client() as client:
            assert client._session.proxy_for(tables.url) is None
            assert [t["name"] for t in client.list_tables()] == ["agent_jobs"]
        assert seen == []  # direct


def test_a_proxy_that_refuses_is_an_answer_and_a_dead_proxy_a_transport_error(no_proxy_env):
    seen: list[str] = []
    with forward_proxy(seen) as proxy:
        no_proxy_env.setenv("http_proxy", proxy)
        pool = Pool(RetryPolicy(max_attempts=1).build(), ["http://elsewhere.invalid"])
        answer = pool.request("GET", "http://elsewhere.invalid/x", timeout=5)
        assert answer.status == 403 and seen == ["http://elsewhere.invalid/x"]
    dead = Pool(RetryPolicy(max_attempts=1).build(), ["http://elsewhere.invalid"])  # the proxy is gone now
    with pytest.raises(TransportError) as err:
        dead.request("GET", "http://elsewhere.invalid/x", timeout=2)
    assert "elsewhere" not in str(err.value) and err.value.cause


@pytest.mark.parametrize(("no_proxy", "url", "proxied"), [
    ("", "https://sdkapi.zapier.com/x", True),
    ("*", "https://sdkapi.zapier.com/x", False),
    ("zapier.com", "https://sdkapi.zapier.com/x", False),  # a domain covers its subdomains
    (".zapier.com", "https://sdkapi.zapier.com/x", False),
    ("api.zapier.com", "https://sdkapi.zapier.com/x", True),  # not a suffix on a label boundary
    ("sdkapi.zapier.com:8443", "https://sdkapi.zapier.com/x", True),  # another port
    ("sdkapi.zapier.com:443", "https://sdkapi.zapier.com:443/x", False),
    ("localhost, 10.1.2.3", "http://10.1.2.3:8080/x", False),
    ("10.1.2.4", "http://10.1.2.3/x", True),
])
def test_no_proxy_rules(no_proxy_env, no_proxy, url, proxied):
    no_proxy_env.setenv("HTTPS_PROXY", "proxy.internal:3128")
    no_proxy_env.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    no_proxy_env.setenv("NO_PROXY", no_proxy)
    assert environ_proxy(url) == ("http://proxy.internal:3128" if proxied else None)


def test_lower_case_wins_and_all_proxy_is_the_fallback(no_proxy_env):
    no_proxy_env.setenv("ALL_PROXY", "http://all:1")
    assert environ_proxy("https://a.example/") == "http://all:1"
    no_proxy_env.setenv("HTTPS_PROXY", "http://upper:2")
    no_proxy_env.setenv("https_proxy", "http://lower:3")
    assert environ_proxy("https://a.example/") == "http://lower:3"


def test_proxy_credentials_become_proxy_authorization(no_proxy_env):
    no_proxy_env.setenv("HTTPS_PROXY", "http://user:p%40ss@proxy.internal:3128")
    pool = Pool(RetryPolicy().build(), ["https://sdkapi.zapier.com"])
    manager = pool._proxied["https://sdkapi.zapier.com"]
    assert pool.proxy_for("https://sdkapi.zapier.com/api") == "http://proxy.internal:3128"
    assert manager.proxy_headers["proxy-authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss
    assert pool.proxy_for("https://other.example/") is None


def test_ca_bundle_from_the_environment(monkeypatch, tmp_path):
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert ca_bundle() == {"ca_certs": str(bundle)}
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path))
    assert ca_bundle() == {"ca_cert_dir": str(tmp_path)}


DELIVERY = """
import json, sys
from functions_framework import create_app

target = sys.argv[1]
hook = {"type": "INSERT", "table": "agent_jobs", "schema": "public", "old_record": None,
        "record": {"id": "no-requests-1", "status": "queued", "updated_at": "2025-12-22T10:00:00+00:00"}}
app = create_app(target, sys.argv[2]).test_client()
loaded = "requests" in sys.modules
r = app.post("/", json=hook, headers={"X-Zsync-Secret": sys.argv[3]})
print("RESULT " + json.dumps({"status": r.status_code, "body": r.json, "requests_at_load": loaded,
                  "requests": "requests" in sys.modules, "alerts": "shared.services.alerts" in sys.modules}))
"""


def test_a_to_tables_delivery_never_imports_requests(database_url, tmp_path):
    """A fresh process (the test process has requests loaded) loads agent_jobs_to_tables through
    functions-framework and handles one real delivery against Postgres and the local Tables service."""
    with start_local_tables(tmp_path / "t.sqlite3", names=["agent_jobs"], rate_limit=None) as tables:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZSYNC_")}
        env |= tables.env() | {"ZSYNC_DATABASE_URL": database_url, "ZSYNC_WEBHOOK_SECRET": SECRET}
        out = subprocess.run([sys.executable, "-c", DELIVERY, "agent_jobs_to_tables",
                              str(ROOT / "functions" / "main.py"), SECRET],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
        assert result["status"] == 200 and result["body"]["outcome"] == "applied", result
        assert [r.data["id"] for r in tables.client().iter_records(tables.ids["agent_jobs"])] == ["no-requests-1"]
    assert result["requests_at_load"] is False
    assert result["requests"] is False and result["alerts"] is False
