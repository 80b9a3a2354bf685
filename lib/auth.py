"""Bearer auth, checked by `lib.actions.serve()` before anything else of an action request.

Several tokens can be valid at once (rotation). Every configured token is compared, in
constant time, whether or not an earlier one matched, so timing tells nothing. The token
itself never leaves this file: the request keeps only its short label, for the logs.
"""

from __future__ import annotations

import hmac

from lib.errors import ApiError

REALM = 'dbapi'
CHALLENGE = {'WWW-Authenticate': f'Bearer realm="{REALM}"'}


def unauthorized(detail: str) -> ApiError:
    return ApiError(401, 'unauthorized', detail, headers=CHALLENGE)


def presented_token(header: str) -> bytes:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    scheme, _, token = header.strip().partition(' ')
    if scheme.lower() != 'bearer':
        raise unauthorized('an Authorization: Bearer <token> header is required')
    token = token.strip()
    if not token:
        raise unauthorized('the Bearer token is empty')
    # WSGI hands headers over as latin-1 text: this gets the client's bytes back, whatever they were.
    try:
        return token.encode('latin-1')
    except UnicodeEncodeError:
        # Text no wire could have sent (a non-WSGI caller): no configured token can equal it.
        raise unauthorized('the Bearer token is not valid') from None


def match_token(token: bytes, tokens: dict[bytes, str]) -> str | None:
    """The label of the configured token equal to `token`, or None."""
    label = None
    for candidate, candidate_label in tokens.items():
        if hmac.compare_digest(candidate, token):
            label = candidate_label
    return label


def authenticate(header: str, tokens: dict[bytes, str]) -> str:
    """The label of the token an `Authorization` header presents; 401 unless it is configured."""
    label = match_token(presented_token(header), tokens)
    if label is None:
        raise unauthorized('the Bearer token is not valid')
    return label
