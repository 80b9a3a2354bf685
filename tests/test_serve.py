"""The README's first command, for real: a fresh local start with a private PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def stop_postgres(pgdata: Path) -> None:
    pid_file = pgdata / 'postmaster.pid'
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split()[0])
    os.kill(pid, signal.SIGTERM)  # "smart" shutdown of the private server
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and pid_file.exists():
        time.sleep(0.1)


def test_serve_starts_a_working_api_and_prints_a_curl_line_that_works(tmp_path):
    pgdata = tmp_path / 'pgdata'
    env = {k: v for k, v in os.environ.items() if not k.startswith(('DEFAULT_DB_', 'BEARER')) and k != 'ENVIRONMENT'}
    env.update(PORT=str(free_port()), LOCAL_PGDATA=str(pgdata), LOG_DIR=str(tmp_path / 'logs'), WEB_CONCURRENCY='2')
    process = subprocess.Popen(
        ['scripts/serve.sh'],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        curl = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and curl is None:
            line = process.stdout.readline()
            assert line or process.poll() is None, ''.join(output)
            output.append(line)
            if line.startswith('try:'):
                curl = line.removeprefix('try:').strip()
        assert curl, ''.join(output)
        assert any(line.startswith('token: local-dev-token') for line in output)
        answer = None
        while time.monotonic() < deadline:
            result = subprocess.run(['bash', '-c', curl], capture_output=True, text=True, timeout=30)
            if result.stdout:
                answer = orjson.loads(result.stdout)
                break
            time.sleep(0.2)
        assert answer is not None and answer['name'] == 'ada' and answer['email'] == 'ada@example.com', output
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        stop_postgres(pgdata)
