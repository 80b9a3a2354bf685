"""Deprecated: the 0.1 path of the worker class (`WORKER_CLASS=lib.gunicorn_worker.DrainingKeepAliveWorker`);
name `lib.server.gunicorn_worker.DrainingKeepAliveWorker` instead. Kept for one release."""

import warnings

from lib.server.gunicorn_worker import DrainingKeepAliveWorker

warnings.warn(
    'lib.gunicorn_worker is deprecated: set WORKER_CLASS=lib.server.gunicorn_worker.DrainingKeepAliveWorker',
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ['DrainingKeepAliveWorker']
