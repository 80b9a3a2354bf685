"""The request scope: what one request carries down its path, without Flask's contexts.

`lib.gateway` opens one `RequestScope` per request, before anything else runs, and makes it
current for the length of the app's call. Every step of the path reads it or adds to it: the
request id, the app's pools, the connections the action borrowed, and what the access record
reports (module, action, caller, the problem answered). Actions never need it: `lib.db` does.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lib.db import Pools
    from lib.errors import ApiError


@dataclass(slots=True)
class RequestScope:
    """One request. Fields after `pools` are filled in by the steps that know them."""

    request_id: str
    pools: Pools
    module: str | None = None
    action: str | None = None  # only a real action: a scanner's made-up names stay in url.path
    caller: str | None = None  # the caller's name, once authenticated (never its token)
    problem: ApiError | None = None  # the failure answered, for the access record (never values)
    borrowed: list[tuple[Any, Any]] = field(default_factory=list)  # (pool, connection) to give back
    database: str | None = None  # the pool the request last took a connection from (lib.pool)
    database_error: Exception | None = None  # the psycopg2 error answered, for the metrics (lib.errors)
    idempotency_key: str | None = None  # the request's Idempotency-Key, once checked (lib.idempotency)
    replayed: bool = False  # the answer is the key's stored one: the action did not run
    steps: list[str] | None = None  # a batch's actions (`module/route`), in order, once all are checked


_current: ContextVar[RequestScope | None] = ContextVar('dbapi_request_scope', default=None)


def current_scope() -> RequestScope | None:
    """The scope of the request this thread is serving, or None outside a request."""
    return _current.get()


def enter(scope: RequestScope) -> Token[RequestScope | None]:
    """Make `scope` current; give the token to `leave` when the request's app call returns."""
    return _current.set(scope)


def leave(token: Token[RequestScope | None]) -> None:
    _current.reset(token)
