"""The raw WSGI reference: the least a Python app served by the same gunicorn can do."""

from collections.abc import Callable, Iterable
from typing import Any

BODY = b'{"hello":"world"}'
HEADERS = [('Content-Type', 'application/json'), ('Content-Length', str(len(BODY)))]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    # Drain the body like a real app must, so the connection stays in step.
    environ['wsgi.input'].read()
    start_response('200 OK', HEADERS)
    return [BODY]
