"""The dead-letter queue: deliveries a function could not apply, kept whole in SQS for ``zsync replay``.

When a delivery still fails after the in-function retries (the database or Zapier Tables is
unreachable, see :mod:`shared.edge.handler`), the function stores it here and answers 503. The message is the
delivery itself plus what is known about the failure::

    {"v": 1, "key": "<sha256>", "function": "agent_jobs_to_supabase", "table": "agent_jobs",
     "record_id": "abc-123", "payload": {...the parsed JSON body...},
     "error": {"type": "DatabaseUnavailable", "message": "database unreachable: OperationalError"},
     "attempts": 1, "first_seen": iso, "last_seen": iso, "received_at": iso, "audited": false}

with the message attributes ``function`` and ``key``.

Queue type and duplicates
-------------------------
The queue is a **standard** queue (``serverless.yml``, the local stack): a FIFO queue would only
deduplicate within 5 minutes and would serialise replay per group, for no gain, because replay is
idempotent anyway (the upsert compares versions; audit entries have stable ids). A delivery that fails
several times (Zapier's autoreplay, the outbox sweeper) therefore leaves several messages with the same
``key`` = sha256(function + canonical JSON of the payload). Replay applies a key once and deletes every
copy; a key it has to leave (dependency still down) is compacted into one message whose ``attempts`` is
the sum of the copies' (+1 for the replay attempt), ``first_seen`` the earliest and ``last_seen`` now.

The error message never carries secrets: the exceptions it comes from name the failing operation and
the exception type only (no URLs with credentials, no tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.platform.settings import Settings

FORMAT_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024  # SQS limit for body + attributes
ERROR_MESSAGE_MAX = 300
_REGION_IN_URL = re.compile(r"sqs[.-]([a-z0-9-]+)\.amazonaws\.com")
_clients: dict[tuple[str | None, str], Any] = {}
_clients_lock = threading.Lock()


class DeadLetterError(RuntimeError):
    """SQS could not be reached or refused the request."""


def canonical_json(payload: Any) -> str:
    """The payload's canonical JSON text (sorted keys, no whitespace): what the key is computed over."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def delivery_key(function: str, payload: Any) -> str:
    """sha256(function + canonical payload): the same delivery always has the same key."""
    text = function + "\n" + canonical_json(payload)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


@dataclass
class DeadLetter:
    """One dead-lettered delivery (the message body)."""

    function: str
    payload: dict[str, Any]
    error_type: str
    error_message: str
    received_at: datetime
    first_seen: datetime
    last_seen: datetime
    attempts: int = 1
    table: str | None = None
    record_id: str | None = None
    audited: bool = False  # a sync_failed audit entry was written when it failed
    key: str = field(default="")

    def __post_init__(self) -> None:
        if not self.key:
            self.key = delivery_key(self.function, self.payload)
        self.error_message = self.error_message[:ERROR_MESSAGE_MAX]

    @classmethod
    def new(cls, function: str, payload: dict[str, Any], error: BaseException, *, received_at: datetime,
            table: str | None = None, record_id: str | None = None, audited: bool = False) -> DeadLetter:
        now = datetime.now(UTC)
        return cls(function=function, payload=payload, error_type=type(error).__name__,
                   error_message=str(error), received_at=received_at, first_seen=received_at, last_seen=now,
                   table=table, record_id=record_id, audited=audited)

    def to_body(self) -> str:
        return json.dumps({
            "v": FORMAT_VERSION,
            "key": self.key,
            "function": self.function,
            "table": self.table,
            "record_id": self.record_id,
            "payload": self.payload,
            "error": {"type": self.error_type, "message": self.error_message},
            "attempts": self.attempts,
            "first_seen": iso(self.first_seen),
            "last_seen": iso(self.last_seen),
            "received_at": iso(self.received_at),
            "audited": self.audited,
        }, ensure_ascii=True, allow_nan=False)  # ASCII: SQS refuses some code points (U+FFFE, lone surrogates)

    @classmethod
    def from_body(cls, body: str) -> DeadLetter:
        """Parse a message body; ValueError if it is not a dead letter of a known format."""
        try:
            data = json.loads(body)
            if not isinstance(data, dict) or data.get("v") != FORMAT_VERSION:
                raise ValueError(f"unknown dead-letter format {data.get('v') if isinstance(data, dict) else None!r}")
            if not isinstance(data["payload"], dict) or not isinstance(data["function"], str):
                raise ValueError("payload must be an object and function a name")
            error = data.get("error") or {}
            return cls(
                function=data["function"], payload=data["payload"], error_type=str(error.get("type", "")),
                error_message=str(error.get("message", "")), received_at=parse_iso(data["received_at"]),
                first_seen=parse_iso(data["first_seen"]), last_seen=parse_iso(data["last_seen"]),
                attempts=int(data.get("attempts", 1)), table=data.get("table"), record_id=data.get("record_id"),
                audited=bool(data.get("audited", False)),
                key=delivery_key(data["function"], data["payload"]),  # recomputed: never trust a stored key
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a dead letter: {type(exc).__name__}: {str(exc)[:100]}") from None

    def merged(self, other: DeadLetter) -> DeadLetter:
        """One message for two copies of the same delivery."""
        assert other.key == self.key
        newer = self if self.last_seen >= other.last_seen else other
        return DeadLetter(
            function=self.function, payload=self.payload, error_type=newer.error_type,
            error_message=newer.error_message, received_at=min(self.received_at, other.received_at),
            first_seen=min(self.first_seen, other.first_seen), last_seen=max(self.last_seen, other.last_seen),
            attempts=self.attempts + other.attempts, table=self.table or other.table,
            record_id=self.record_id or other.record_id, audited=self.audited or other.audited, key=self.key,
        )


@dataclass
class Received:
    """A message taken from the queue (invisible to others until deleted or released)."""

    message_id: str
    receipt_handle: str
    receive_count: int
    letter: DeadLetter | None  # None: the body is not a dead letter (reported, never deleted)
    problem: str | None = None


def _region(settings: Settings, queue_url: str) -> str:
    found = _REGION_IN_URL.search(queue_url)
    if found:
        return found.group(1)
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def sqs_client(settings: Settings, queue_url: str) -> Any:
    """A cached boto3 SQS client: short timeouts and few retries (a function must still answer in time).

    With ``ZSYNC_AWS_ENDPOINT_URL`` (moto locally) missing AWS credentials default to dummy ones. boto3 is
    imported here, not at module level: the Lambda runtime provides it (the artifact leaves it out) and a
    deployment without a DLQ (Google Cloud) never needs it.
    """
    import boto3
    from botocore.config import Config

    endpoint = settings.aws_endpoint_url
    region = _region(settings, queue_url)
    with _clients_lock:
        client = _clients.get((endpoint, region))
        if client is None:
            extra: dict[str, str] = {}
            if endpoint:
                extra = {
                    "aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID", "local"),
                    "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
                }
            config = Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 3, "mode": "standard"})
            client = boto3.session.Session().client("sqs", endpoint_url=endpoint, region_name=region,
                                                    config=config, **extra)
            _clients[(endpoint, region)] = client
        return client


def reset_clients() -> None:
    with _clients_lock:
        _clients.clear()


class DeadLetterQueue:
    """Send, receive, delete and release dead letters on one SQS queue."""

    def __init__(self, settings: Settings, queue_url: str | None = None):
        url = queue_url or settings.dlq_url
        if not url:
            raise DeadLetterError("ZSYNC_DLQ_URL is not set")
        self.url = url
        self._sqs = sqs_client(settings, url)

    def _call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._sqs, op)(QueueUrl=self.url, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise DeadLetterError(f"SQS {op} failed: {type(exc).__name__}") from exc

    def send(self, letter: DeadLetter) -> str:
        """Store one dead letter; -> the SQS message id. DeadLetterError if SQS is unreachable or too big."""
        body = letter.to_body()
        attributes = {
            "function": {"DataType": "String", "StringValue": letter.function},
            "key": {"DataType": "String", "StringValue": letter.key},
        }
        size = len(body.encode("utf-8")) + sum(len(k) + len(v["StringValue"]) + 6 for k, v in attributes.items())
        if size > MAX_MESSAGE_BYTES:
            raise DeadLetterError(f"delivery too large for SQS ({size} bytes > {MAX_MESSAGE_BYTES})")
        return self._call("send_message", MessageBody=body, MessageAttributes=attributes)["MessageId"]

    def receive(self, max_messages: int = 10, visibility_timeout_s: int = 300, wait_s: int = 0) -> list[Received]:
        """Take up to ``max_messages`` (<= 10) messages, hidden from others for ``visibility_timeout_s``."""
        answer = self._call(
            "receive_message", MaxNumberOfMessages=max(1, min(10, max_messages)),
            VisibilityTimeout=visibility_timeout_s, WaitTimeSeconds=wait_s,
            MessageAttributeNames=["All"], MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        out = []
        for m in answer.get("Messages", []):
            count = int(m.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
            try:
                out.append(Received(m["MessageId"], m["ReceiptHandle"], count, DeadLetter.from_body(m["Body"])))
            except ValueError as exc:
                out.append(Received(m["MessageId"], m["ReceiptHandle"], count, None, str(exc)))
        return out

    def iter_receive(self, limit: int | None = None, visibility_timeout_s: int = 300) -> Iterator[Received]:
        """Receive until the queue answers empty (or ``limit`` messages were taken)."""
        taken = 0
        while limit is None or taken < limit:
            batch = self.receive(10 if limit is None else min(10, limit - taken), visibility_timeout_s)
            if not batch:
                return
            for message in batch:
                taken += 1
                yield message

    def delete(self, messages: list[Received]) -> None:
        for start in range(0, len(messages), 10):
            chunk = messages[start:start + 10]
            entries = [{"Id": str(i), "ReceiptHandle": m.receipt_handle} for i, m in enumerate(chunk)]
            answer = self._call("delete_message_batch", Entries=entries)
            if answer.get("Failed"):
                raise DeadLetterError(f"SQS refused to delete {len(answer['Failed'])} message(s)")

    def release(self, messages: list[Received]) -> None:
        """Make received messages visible again now (instead of after the visibility timeout)."""
        for start in range(0, len(messages), 10):
            chunk = messages[start:start + 10]
            entries = [{"Id": str(i), "ReceiptHandle": m.receipt_handle, "VisibilityTimeout": 0}
                       for i, m in enumerate(chunk)]
            self._call("change_message_visibility_batch", Entries=entries)

    def approximate_depth(self) -> int:
        attrs = self._call("get_queue_attributes", AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def dead_letter(settings: Settings, letter: DeadLetter) -> str | None:
    """Best effort, for the functions: store ``letter``. -> None if stored, else why not (no queue
    configured, SQS unreachable, too large). Never raises: a 503 must not become a 500 because of the DLQ."""
    if not settings.dlq_url:
        return "ZSYNC_DLQ_URL is not set"
    try:
        DeadLetterQueue(settings).send(letter)
        return None
    except DeadLetterError as exc:
        return str(exc)
    except Exception as exc:
        return f"unexpected {type(exc).__name__}"

