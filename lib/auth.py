"""The caller and scope steps of `lib.actions.serve()`: who calls (401, or 503 when the identity
provider's keys cannot be had), and whether that caller may call the action (403).

A Bearer token is a JWT when JWT_* is configured and the token has a JWT's shape (three parts,
a JSON header: lib.jwt_auth); any other token is opaque, found by its SHA-256 digest among the
callers of BEARER and CALLERS_FILE (lib.callers). The token never leaves these steps: the
request keeps the caller's name only. The challenges follow RFC 6750 §3.1: no error code when
no Bearer token came, `invalid_token` for one that is not valid, and `insufficient_scope` (403)
with the scope the action needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lib.callers import Caller, Callers
from lib.errors import ApiError
from lib.jwt_auth import InvalidToken, JwtVerifier, KeysUnavailable, jwt_header

REALM = 'dbapi'
CHALLENGE = f'Bearer realm="{REALM}"'
NOT_VALID = 'the Bearer token is not valid'


def unauthorized(detail: str, code: str | None = 'invalid_token') -> ApiError:
    """401 with its challenge; `code` None when the request carried no Bearer token at all."""
    challenge = CHALLENGE if code is None else f'{CHALLENGE}, error="{code}"'
    return ApiError(401, 'unauthorized', detail, headers={'WWW-Authenticate': challenge})


def presented_token(header: str) -> bytes:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    scheme, _, token = header.strip().partition(' ')
    if scheme.lower() != 'bearer':
        raise unauthorized('an Authorization: Bearer <token> header is required', None)
    token = token.strip()
    if not token:
        raise unauthorized('the Bearer token is empty', None)  # no token: no error code either
    # WSGI hands headers over as latin-1 text: this gets the client's bytes back, whatever they were.
    try:
        return token.encode('latin-1')
    except UnicodeEncodeError:
        # Text no wire could have sent (a non-WSGI caller): no configured token can equal it.
        raise unauthorized(NOT_VALID) from None


def authenticate(header: str, callers: Callers, verifier: JwtVerifier | None) -> Caller:
    """The caller an `Authorization` header presents: 401 unless its token is known or a valid JWT."""
    token = presented_token(header)
    if verifier is not None:
        claims_header = jwt_header(token)
        if claims_header is not None:
            return jwt_caller(verifier, token, claims_header)
    caller = callers.find(token)
    if caller is None:
        raise unauthorized(NOT_VALID)
    return caller


def jwt_caller(verifier: JwtVerifier, token: bytes, header: Mapping[str, Any]) -> Caller:
    try:
        return verifier.caller(token, header)
    except InvalidToken as error:
        raise unauthorized(str(error)) from None
    except KeysUnavailable as error:
        # The caller did nothing wrong: it may send the same token again.
        headers = {'Retry-After': str(error.retry_after)}
        raise ApiError(503, 'keys-unavailable', str(error), headers=headers) from None


def authorize(caller: Caller, module: str, action: str) -> None:
    """403 unless one of the caller's scopes covers `action` (`module/route`)."""
    if caller.may_call(module, action):
        return
    scope = action.replace('\\', '\\\\').replace('"', '\\"')
    challenge = f'{CHALLENGE}, error="insufficient_scope", scope="{scope}"'
    raise ApiError(
        403,
        'insufficient-scope',
        f'caller {caller.name!r} has no scope for {action!r}',
        headers={'WWW-Authenticate': challenge},
    )
