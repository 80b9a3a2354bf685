"""What one request carries down its path, and what it answers.

`RequestRecord` is the request's own record: the web layer makes one per request, the
pipeline fills it in as its steps learn things (only the pipeline writes it), and observability
reads the finished record (the access record, the metrics). Lower layers never see it: they get
what they need as arguments and return results.

`Answer` is an action request's answer before compression and the common headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lib.core.errors import ApiError
from lib.core.json import JSON_MIMETYPE


@dataclass(slots=True)
class Answer:
    """Status, body bytes, content type and the answer's own headers."""

    status: int
    body: bytes
    content_type: str = JSON_MIMETYPE
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class RequestRecord:
    """One request. Fields after `started_ns` are filled in by the steps that know them."""

    request_id: str
    started_ns: int  # time.perf_counter_ns() when the request reached the app
    module: str | None = None  # a registered module (or `batch`); None for the infrastructure's paths
    action: str | None = None  # a registered action's route: a scanner's made-up names stay in url.path
    caller: str | None = None  # the caller's name, once authenticated (never its token)
    problem: ApiError | None = None  # the failure answered (never the values that caused it)
    database: str | None = None  # the database the request's connection came from
    database_error: Exception | None = None  # the psycopg2 error answered, for the metrics
    idempotency_key: str | None = None  # the Idempotency-Key, once checked
    replayed: bool = False  # the answer is the key's stored one: the action did not run
    steps: list[str] | None = None  # a batch's actions (`module/route`), in order, once all are checked
    status: int = 0  # the status handed to the server; 0 until then
    sent: int = 0  # body bytes handed to the server
    finished: bool = False  # the record was written (exactly once)
