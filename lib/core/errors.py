"""Errors as data: `ApiError`, the helpers actions raise, and the RFC 9457 document of one.

Every failure a client sees is one `application/problem+json` document of one shape, whichever
layer answers (lib.pipeline turns any exception into an `ApiError` in one place). The client gets
a title, a detail and the request id; the log gets the traceback and the SQL error, never the client.
"""

from __future__ import annotations

from typing import Any

from werkzeug.http import HTTP_STATUS_CODES

PROBLEM_JSON = 'application/problem+json'
RETRY_AFTER_SECONDS = '1'
MAX_NAME_IN_MESSAGE = 80  # how much of a client's made-up name a detail quotes


class ApiError(Exception):
    """An error with a status, a short slug (`urn:dbapi:problem:<slug>`) and a detail for the client."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        errors: Any = None,
        headers: dict[str, str] | None = None,
        members: dict[str, Any] | None = None,
        detail_logged: bool = True,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.errors = errors  # by field, what validation refused (422); the constraint (409)
        self.headers = headers or {}
        self.members = members  # RFC 9457 extension members of the document (a batch's `step`, `action`)
        # False when the detail may quote submitted values (a database's message): the access
        # record then names the kind of failure only.
        self.detail_logged = detail_logged


def bad_request(detail: str) -> ApiError:
    return ApiError(400, 'bad-request', detail)


# For actions: `raise not_found(...)` answers that problem, and the transaction rolls back.
def not_found(detail: str) -> ApiError:
    """404: what the body names does not exist."""
    return ApiError(404, 'not-found', detail)


def conflict(detail: str, errors: Any = None) -> ApiError:
    """409: the request clashes with the data as it is (a duplicate, a stale version)."""
    return ApiError(409, 'conflict', detail, errors=errors)


def unprocessable(detail: str, errors: dict[str, list[str]] | None = None) -> ApiError:
    """422: the body is well formed but cannot be acted on; `errors` names fields as validation does."""
    return ApiError(422, 'validation-error', detail, errors=errors)


def internal_error() -> ApiError:
    """500: what the client sees of a bug or an unexpected failure (the log has the rest)."""
    return ApiError(500, 'internal-error', 'internal error; the request id finds it in the logs')


def problem_document(error: ApiError, request_id: str) -> dict[str, Any]:
    """The RFC 9457 body of `error`: the one shape of every error, whichever layer answers."""
    body: dict[str, Any] = {
        'type': f'urn:dbapi:problem:{error.slug}',
        'title': HTTP_STATUS_CODES.get(error.status, 'Error'),
        'status': error.status,
        'detail': error.detail,
        'request_id': request_id,
    }
    if error.errors is not None:
        body['errors'] = error.errors
    if error.members:
        body.update(error.members)
    return body
