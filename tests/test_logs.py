"""Log lines: one JSON object per event on the function's stdout, written by google-cloud-logging's
StructuredLogHandler, whose ``sourceLocation`` names the code that logged (not shared/platform/logs.py), also for
the lines a fresh process holds until the library is imported (shared/platform/logs.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from infra.local.stack import MAIN, REPO, free_port, wait_listening
from shared.platform import logs
from shared.platform.settings import DEFAULT_SECRET_HEADER

SECRET = "logs-test-secret"
SOURCE = "logging.googleapis.com/sourceLocation"


def _events(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "event" in entry:
            found.append(entry)
    return found


def _logged_here(logger: logging.Logger) -> None:
    logs.log_event(logger, logging.INFO, "probe", id="p-1")


def test_a_field_the_handler_writes_itself_is_refused_not_lost(capsys: pytest.CaptureFixture[str]) -> None:
    """StructuredLogHandler writes ``message`` and ``severity`` itself: a field of that name was silently replaced
    (every ``inbox_message`` line lost its message id so). log_event refuses such a name; others reach the line."""
    logger = logs.get_logger("logs_probe")
    for name in ("message", "severity"):  # what the handler does with one, sent past log_event
        logger.info("overwritten", extra={"json_fields": {"event": "raw", name: "mine"}})
        with pytest.raises(ValueError, match=name):
            logs.log_event(logger, logging.INFO, "probe", **{name: "mine"})
    logs.log_event(logger, logging.INFO, "probe", message_id="m-1")
    logs.flush()
    found = _events(capsys.readouterr().out)
    assert [e["message"] for e in found if e["event"] == "raw"] == ["overwritten", "overwritten"]
    assert [e["severity"] for e in found if e["event"] == "raw"] == ["INFO", "INFO"]
    assert [e["message_id"] for e in found if e["event"] == "probe"] == ["m-1"]


def test_source_location_names_the_caller_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logs.get_logger("logs_probe")
    _logged_here(logger)
    logs.flush()  # the library may still be importing on its background thread
    [entry] = [e for e in _events(capsys.readouterr().out) if e["event"] == "probe"]
    assert entry["severity"] == "INFO" and entry["id"] == "p-1"
    assert entry["logging.googleapis.com/labels"]["function"] == "logs_probe"
    location = entry[SOURCE]
    assert location["file"] == __file__
    assert location["function"] == "_logged_here"
    assert int(location["line"]) == _logged_here.__code__.co_firstlineno + 1


def test_a_fresh_function_process_logs_each_delivery_with_its_real_source(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSYNC_")}
    env.update({"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "ZSYNC_WEBHOOK_SECRET": SECRET,
                "ZSYNC_DATABASE_URL": database_url})
    out_path = tmp_path / "stdout.log"
    with out_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "functions_framework", "--source", str(MAIN),
                                 "--target", "agent_jobs_to_supabase", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_listening(port)
        url = f"http://127.0.0.1:{port}/"
        headers = {DEFAULT_SECRET_HEADER: SECRET}
        good = requests.post(url, json={"id": f"logs-{uuid.uuid4().hex[:8]}", "status": "queued"}, headers=headers,
                             timeout=30)
        assert good.status_code == 200, good.text
        bad = requests.post(url, json={"id": "logs-bad", "created_at": "31.02.2025"}, headers=headers, timeout=30)
        assert bad.status_code == 400, bad.text
        deadline = time.monotonic() + 20
        while len(_events(out_path.read_text(errors="replace"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)
    text = out_path.read_text(errors="replace")
    events = _events(text)
    assert [(e["event"], e["status"]) for e in events] == [("delivery", 200), ("delivery", 400)], text[-3000:]
    for entry in events:
        assert entry["logging.googleapis.com/labels"]["function"] == "agent_jobs_to_supabase"
        location = entry[SOURCE]
        assert location["file"] == str(REPO / "shared" / "edge" / "handler.py"), location
        assert location["function"] == "answer", location
        assert int(location["line"]) > 0
    assert events[1]["severity"] == "WARNING" and events[1]["problems"]
    assert "shared/platform/logs.py" not in text


def test_on_lambda_the_init_phase_imports_everything_and_holds_no_line() -> None:
    """What SnapStart snapshots: the app is built and google-cloud-logging imported before any request, without
    its generated gRPC API clients (GOOGLE_CLOUD_DISABLE_GRPC: nothing here calls the API)."""
    code = ("import sys; import functions.lambda_adapter as a; from shared.platform import logs; "
            "print(sorted(a._handlers), 'google.cloud.logging_v2' in sys.modules, 'flask' in sys.modules, "
            "logs._structured_cls is not None, 'google.cloud.logging_v2._gapic' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZSYNC_", "AWS_", "GOOGLE_CLOUD_"))}
    env.update({"PYTHONPATH": str(REPO), "AWS_LAMBDA_FUNCTION_NAME": "zsync-ci-agent_jobs_to_supabase",
                "ZSYNC_FUNCTION": "agent_jobs_to_supabase"})
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['agent_jobs_to_supabase'] True True True False"
