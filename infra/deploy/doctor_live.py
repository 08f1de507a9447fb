"""``zsync doctor --live``: check what zsync assumes about zapier.com against the real account.

The assumptions are listed in ``docs/zapier-assumptions.md``; :data:`ASSUMPTIONS` holds the same list
(key -> what is assumed, whether a difference breaks the sync). :func:`run` makes a scratch table
``zsync-doctor-<random>`` with the field types the table specs use (text, number, decimal, json, datetime,
multiple_string), with the Zapier credentials from the settings (the functions' own), runs each check of
:mod:`infra.deploy.doctor_live_checks` and ALWAYS removes the scratch table and the scratch trigger inboxes
(also after Ctrl-C or a check failing midway), unless ``keep``.

Each check is bounded in time (``check_timeout_s``, and its own waits); one that cannot run says why
(``could not check``). A :class:`Finding` whose assumption breaks the sync and that is not ``ok`` (different,
or could not be checked) makes :func:`exit_code` 1. What the checks share (findings, the scratch table,
raw HTTP) is in :mod:`infra.deploy.doctor_live_base`.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Callable

from infra.deploy.doctor_live_base import (
    ASSUMPTIONS,
    DIFFERENT,
    OK,
    PREFIX,
    UNCHECKED,
    Check,
    Finding,
    Options,
    Raw,
    Scratch,
    exit_code,
    found,
    public_api_url,
    unchecked,
)
from infra.deploy.doctor_live_checks import CHECKS
from shared.adapters.zapier_tables import client_from_settings
from shared.platform.settings import Settings

__all__ = ["ASSUMPTIONS", "CHECKS", "DIFFERENT", "OK", "PREFIX", "UNCHECKED", "Finding", "Options", "exit_code",
           "run"]


# --- running ---------------------------------------------------------------------------------------------

SIGNAL_POLL_S = 0.2  # how often the main thread looks up from waiting on a check (Ctrl-C is handled there)


def _bounded(check: Check, scratch: Scratch, timeout_s: float) -> list[Finding]:
    """Run one check in a thread for at most ``timeout_s``: exactly one finding per key it declares. The thread
    is a daemon: a check still waiting on Zapier (a hanging request, its retries) does not hold the process
    after Ctrl-C - a pool's worker did, until its retry budget ran out. Python runs a signal's handler in the main
    thread, but the kernel may hand the signal to the check's thread: the main thread waits in short slices."""
    keys, fn = check
    answer: queue.SimpleQueue[list[Finding] | Exception] = queue.SimpleQueue()

    def work() -> None:
        try:
            answer.put(fn(scratch))
        except Exception as exc:  # a check that breaks says why; the run goes on
            answer.put(exc)

    threading.Thread(target=work, name=f"doctor-{keys[0]}", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while True:  # in short waits: a Ctrl-C the kernel hands to the check's thread is seen here at the next one
        try:  # (one long wait saw it only when it ended: a CI run waited 60 s and more after the signal)
            got = answer.get(timeout=min(SIGNAL_POLL_S, max(0.0, deadline - time.monotonic())))
            break
        except queue.Empty:
            if time.monotonic() >= deadline:
                return [unchecked(key, f"did not finish within {timeout_s:g} s") for key in keys]
    if isinstance(got, Exception):
        return [unchecked(key, f"{type(got).__name__}: {' '.join(str(got).split())[:240]}") for key in keys]
    reported = {f.key for f in got}
    return got + [unchecked(key, "not reported by its check") for key in keys if key not in reported]


def run(settings: Settings, options: Options | None = None,
        progress: Callable[[Finding], None] | None = None) -> list[Finding]:
    """Make the scratch table, run every check, remove the scratch table (always, unless ``keep``).

    Raises ``ValueError`` when the settings hold no Zapier credentials. ``KeyboardInterrupt`` propagates
    after the scratch table is removed."""
    options = options or Options()
    client = client_from_settings(settings)
    scratch = Scratch(settings, options, client, Raw(client, public_api_url(settings, options.api_url),
                                                     settings.http_timeout_s), secrets.token_hex(4))
    findings: list[Finding] = []

    def note(items: list[Finding]) -> None:
        findings.extend(items)
        for item in items if progress else ():
            progress(item)

    try:
        made = _bounded((("round_trip",), _make_table), scratch, options.check_timeout_s)[0]
        setup = [] if made.status == OK else [made]
        for keys, check in CHECKS:
            if setup:  # no scratch table: nothing else can run
                note([unchecked(k, "could not make the scratch table: " + setup[0].observed) for k in keys])
            elif keys == ("rate_limit",) and not options.rate_limit:
                note([unchecked("rate_limit", "skipped (--skip-rate-limit)")])
            else:
                waits = 3 * options.trigger_wait_s if "payload_change" in keys else 0.0
                note(_bounded((keys, check), scratch, options.check_timeout_s + waits))
    finally:
        try:
            if options.keep:
                note([found("cleanup", True, f"kept (--keep): table {scratch.table_id}, inboxes "
                                             f"{', '.join(scratch.inbox_ids) or 'none'}")])
            else:
                note([scratch.remove()])
        finally:
            scratch.close()
    return findings


def _make_table(scratch: Scratch) -> list[Finding]:
    scratch.create()
    return [found("round_trip", True, "scratch table made")]
