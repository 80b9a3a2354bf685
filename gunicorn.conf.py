"""gunicorn's configuration (read by `gunicorn -c gunicorn.conf.py app:app`).

Every value can be changed from the environment; the defaults are the production ones.
"""

import multiprocessing
import os

bind = os.getenv('BIND', '0.0.0.0:8000')
workers = int(os.getenv('WEB_CONCURRENCY', 2 * multiprocessing.cpu_count() + 1))
worker_class = os.getenv('WORKER_CLASS', 'sync')
threads = int(os.getenv('THREADS', '1'))
timeout = int(os.getenv('WORKER_TIMEOUT', '60'))
graceful_timeout = int(os.getenv('GRACEFUL_TIMEOUT', '30'))
keepalive = int(os.getenv('KEEPALIVE', '5'))
max_requests = int(os.getenv('MAX_REQUESTS', '10000'))
max_requests_jitter = int(os.getenv('MAX_REQUESTS_JITTER', '1000'))
# The app (and its database pools) is loaded in each worker after the fork, never shared.
preload_app = False
accesslog = None  # the app writes one JSON access record per request itself
errorlog = '-'
loglevel = os.getenv('GUNICORN_LOG_LEVEL', 'info')
# gunicorn's own lines (master and workers) go through the app's handlers: ECS JSON in the same
# per-process files (lib/logger.py). gunicorn has put the repository on sys.path before reading this.
from lib.logger import gunicorn_logconfig  # noqa: E402

logconfig_dict = gunicorn_logconfig()
