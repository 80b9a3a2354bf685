"""Compressing an action's answer, as flask-compress compresses Flask's own responses.

The gateway answers actions without a Flask response object, so it cannot hand them to
flask-compress; this module does the same with the compression libraries' own calls and
flask-compress's documented settings (`COMPRESS_ALGORITHM`, `COMPRESS_MIN_SIZE`, the levels), so
both kinds of answer are compressed alike.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Mapping
from typing import Any

import brotli
from werkzeug.http import parse_accept_header

try:  # Python 3.14's standard library, or its backport (a dependency of flask-compress)
    from compression import zstd
except ImportError:
    from backports import zstd

Compressor = Callable[[bytes], bytes]


def compressors(config: Mapping[str, Any]) -> dict[str, Compressor]:
    """The configured algorithms, in the server's order of preference, with their levels."""
    known: dict[str, Compressor] = {
        'zstd': lambda data: zstd.compress(data, config['COMPRESS_ZSTD_LEVEL']),
        'br': lambda data: brotli.compress(
            data,
            mode=config['COMPRESS_BR_MODE'],
            quality=config['COMPRESS_BR_LEVEL'],
            lgwin=config['COMPRESS_BR_WINDOW'],
            lgblock=config['COMPRESS_BR_BLOCK'],
        ),
        'gzip': lambda data: gzip.compress(data, config['COMPRESS_LEVEL']),
    }
    wanted = config['COMPRESS_ALGORITHM']
    names = [wanted] if isinstance(wanted, str) else list(wanted)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f'COMPRESS_ALGORITHM: cannot compress answers with {unknown} (known: {list(known)})')
    return {name: known[name] for name in names}


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
