# The dbapi image: docker build -t dbapi:$VERSION .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ENVIRONMENT=production \
    LOG_DIR=/src/logs

WORKDIR /src
# Dependencies first: this layer is rebuilt only when the pinned requirements change.
COPY requirements.txt ./
RUN pip install --no-compile -r requirements.txt

# A user of its own; the code stays root-owned and read-only to it, only the logs are writable.
RUN useradd --system --uid 10001 --no-create-home --home-dir /src --shell /usr/sbin/nologin dbapi \
 && mkdir -p /src/logs && chown dbapi:dbapi /src/logs
COPY app.py settings.py gunicorn.conf.py start.sh pyproject.toml ./
COPY lib ./lib
COPY modules ./modules
COPY env ./env

USER dbapi
EXPOSE 8000
VOLUME ["/src/logs"]
# Ready = every configured database answers and has recorded the migrations this code needs
# (GET /health/ready, 503 otherwise).
HEALTHCHECK --interval=10s --timeout=4s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=3).status != 200)"]
# start.sh execs gunicorn: SIGTERM reaches its master, which drains in-flight requests.
CMD ["./start.sh"]
