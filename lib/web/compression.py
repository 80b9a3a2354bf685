"""The one compressor of answers: an action's (the gateway) and Flask's own (an `after_request`
hook), JSON of 2xx answers at least COMPRESS_MIN_SIZE long, in the coding the client ranks highest.

Not flask-compress: its chooser takes a coding the client refused with `q=0` (RFC 9110 §12.5.3
says q=0 is "not acceptable"), and its API works on a Flask response inside a request context,
which the action path never builds. The levels are flask-compress's defaults.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Mapping

import brotli
from flask import Response, request
from werkzeug.http import parse_accept_header

from lib.core.errors import PROBLEM_JSON
from lib.core.json import JSON_MIMETYPE

try:  # Python 3.14's standard library, or its backport
    from compression import zstd
except ImportError:
    from backports import zstd

Compressor = Callable[[bytes], bytes]


ALGORITHMS: dict[str, Compressor] = {  # in the server's order of preference
    'zstd': lambda data: zstd.compress(data, 3),
    'br': lambda data: brotli.compress(data, mode=0, quality=4, lgwin=22, lgblock=0),
    'gzip': lambda data: gzip.compress(data, 6),
}
COMPRESSED_TYPES = frozenset({JSON_MIMETYPE, PROBLEM_JSON})
VARY = ('Vary', 'Accept-Encoding')


def choose(accept_encoding: str, algorithms: Mapping[str, Compressor]) -> str | None:
    """The algorithm the client ranks highest (`q` values, `*` included); ties go to the
    server's order. None when the client accepts none of them, or prefers `identity`."""
    if not accept_encoding:
        return None
    accepted = parse_accept_header(accept_encoding.lower())
    best, best_quality = None, 0.0
    for name in algorithms:
        quality = accepted[name]
        if quality > best_quality:
            best, best_quality = name, quality
    if best is not None and accepted['identity'] > best_quality:
        return None
    return best


def compressed(body: bytes, accept_encoding: str) -> tuple[bytes, str | None]:
    """`body` in the coding the client ranks highest, and that coding; as it was, and None, when
    the client accepts none."""
    algorithm = choose(accept_encoding, ALGORITHMS)
    if algorithm is None:
        return body, None
    return ALGORITHMS[algorithm](body), algorithm


def compress_flask_response(min_size: int) -> Callable[[Response], Response]:
    """Flask's `after_request` hook: its 2xx JSON answers compressed as an action's are."""

    def compress(response: Response) -> Response:
        response.vary.add('Accept-Encoding')
        accept_encoding = request.headers.get('Accept-Encoding', '')
        if (
            not accept_encoding
            or not 200 <= response.status_code < 300
            or response.mimetype not in COMPRESSED_TYPES
            or response.is_streamed  # sent as it is made: never read whole here
            or 'Content-Encoding' in response.headers
        ):
            return response
        body = response.get_data()
        if len(body) < min_size:
            return response
        body, algorithm = compressed(body, accept_encoding)
        if algorithm is not None:
            response.set_data(body)
            response.headers['Content-Encoding'] = algorithm
        return response

    return compress
