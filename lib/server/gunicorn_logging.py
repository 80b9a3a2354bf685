"""gunicorn's logging: its master's and workers' own lines through the app's handlers, and no
access log of its own (the app writes one record per request)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from gunicorn import glogging

from lib.core.config import Config, LogSettings
from lib.observability import logging_setup


def gunicorn_logconfig(config: Config) -> dict[str, Any]:
    """gunicorn's `logconfig_dict`: gunicorn's loggers keep no handler of their own and propagate
    to the root, which gets the app's handlers, so each process writes one file."""
    kinds = config.log.kinds()
    factory = 'lib.server.gunicorn_logging.make_handler'
    # Plain values only: gunicorn also takes this dict as --logconfig-dict JSON.
    settings = {'log': asdict(config.log), 'environment': config.environment, 'process_id': config.process_id}
    return {
        'version': 1,
        'disable_existing_loggers': False,
        'formatters': {},
        'handlers': {kind: {'()': factory, 'kind': kind, **settings} for kind in kinds},
        'root': {'level': config.log.level, 'handlers': kinds},
        'loggers': {
            'gunicorn.error': {'handlers': [], 'propagate': True},
            'gunicorn.access': {'handlers': [], 'propagate': False},
        },
    }


def make_handler(kind: str, log: dict[str, Any], environment: str, process_id: str) -> logging.Handler:
    """dictConfig's factory of one handler: the app's own (lib.observability.logging_setup)."""
    return logging_setup.make_handler(kind, LogSettings(**log), environment, process_id)


class GunicornLogger(glogging.Logger):
    """gunicorn's logger, without its access log: the app writes one record per request itself
    (lib.observability.access_log), so gunicorn's `access()` (the documented hook of a logger
    class) does nothing, and builds nothing, for every request."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return None
