"""AWS Lambda entry point for all seven functions (``handler: functions/lambda_adapter.handler``).

The same functions-framework target that runs on Google Cloud / locally (``functions/main.py``),
chosen by ``ZSYNC_FUNCTION``, served through apig-wsgi, which understands Lambda function URL events
(payload format 2.0, base64 bodies included). Secrets are loaded from SSM / Secrets Manager first.

Everything is built once per cold start, during Lambda's init phase when running on Lambda: that is the
phase SnapStart snapshots (serverless.yml), so a restored instance answers its first request without
importing anything. The logging library is imported synchronously there (``shared.platform.logs.prepare``): a
Lambda instance is frozen after each answer, so no log line may be left for later.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAIN = Path(__file__).resolve().with_name("main.py")
LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]
_handlers: dict[str, LambdaHandler] = {}


def build(target: str) -> LambdaHandler:
    import functions_framework
    from apig_wsgi import make_lambda_handler

    from shared.platform import logs
    from shared.platform.aws_secrets import load_into_environment

    logs.prepare()
    load_into_environment()
    app = functions_framework.create_app(target=target, source=str(MAIN))
    return make_lambda_handler(app, binary_support=True)


def drain_inbox(target: str) -> dict[str, Any]:
    """The scheduled safety drain (serverless.yml ``schedule`` event): drain this function's trigger inbox."""
    from shared.core.spec import FUNCTIONS
    from shared.platform.aws_secrets import load_into_environment
    from shared.platform.settings import get_settings
    from shared.services.deliveries import context_for
    from shared.services.inbox_consumer import drain_function

    load_into_environment()
    settings = get_settings()
    fn = FUNCTIONS[target]
    return drain_function(fn, context_for(fn, settings), settings.inbox_drain_budget_s).as_json()


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    target = os.environ["ZSYNC_FUNCTION"]
    if isinstance(event, dict) and event.get("zsync") == "drain_inbox":
        return drain_inbox(target)
    fn = _handlers.get(target)
    if fn is None:
        fn = _handlers[target] = build(target)
    if event.get("zsync") == "check_trash":  # EventBridge schedule (serverless.yml): Tables deletes
        return _check_trash(target)
    return fn(event, context)


def _check_trash(target: str) -> dict[str, Any]:
    """The scheduled trash check of this function's table (shared/services/tables_trash.py); secrets are loaded."""
    from shared.services.tables_trash import run_check

    answer, ok = run_check(target)
    return {"ok": ok, **answer}


def _reseed_after_restore() -> None:
    """A SnapStart snapshot clones the ``random`` state into every restored instance: reseed it (retry jitter)."""
    try:
        from snapshot_restore_py import register_after_restore  # provided by the Lambda Python runtime
    except ImportError:
        return
    import random

    register_after_restore(random.seed)


if os.environ.get("AWS_LAMBDA_FUNCTION_NAME") and os.environ.get("ZSYNC_FUNCTION"):
    _handlers[os.environ["ZSYNC_FUNCTION"]] = build(os.environ["ZSYNC_FUNCTION"])
    _reseed_after_restore()
