"""The answer step: what an action request answers, before compression and the common headers.

An action's result becomes JSON bytes (dumped through its `@returns` schema when it declares
one), and any failure becomes one problem document (lib.errors). The bytes are made before the
transaction commits: a keyed request stores them with the action's writes (lib.idempotency).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from marshmallow import Schema

from lib.errors import PROBLEM_JSON, ApiError, problem_document
from lib.json import JSON_MIMETYPE, dumps
from lib.scope import RequestScope


@dataclass(slots=True)
class Served:
    """An action request's answer: status, body bytes, content type and its own headers."""

    status: int
    body: bytes
    content_type: str = JSON_MIMETYPE
    headers: Mapping[str, str] = field(default_factory=dict)


def result_data(returns: Schema | None, result: Any) -> Any:
    """The result as it is sent: only the declared fields when the action declares `@returns`."""
    return result if returns is None else returns.dump(result)


def answer(returns: Schema | None, result: Any) -> Served:
    """The 200 answer of an action's result."""
    return Served(200, dumps(result_data(returns, result)))


def problem_answer(problem: ApiError, scope: RequestScope) -> Served:
    """The answer of a failure; the scope keeps the problem for the access record."""
    scope.problem = problem
    return Served(problem.status, dumps(problem_document(problem, scope.request_id)), PROBLEM_JSON, problem.headers)
