"""Callers and scopes: BEARER's caller `default`, CALLERS_FILE's callers, the scope step, reloads.

Every test ends by reading every file its log directory holds: no token, and no token's
SHA-256 (whole or its first 10 hex digits, the old label), may be in any of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from lib.auth.callers import Callers, bearer_callers, callers_of, token_digest
from lib.core.config import ConfigError, load
from lib.web.flask_app import PIPELINE_KEY
from tests.conftest import MODULES, TOKEN, make_app
from tests.logs import access_records, read_lines
from tests.service import running_service

ROOT = Path(__file__).resolve().parent.parent
GOOD_DB = {'default': {'dbname': 'x', 'host': '127.0.0.1', 'port': '5432', 'user': 'postgres'}}
# Every token a test here presents, so that the logs can be searched for them afterwards.
SECRETS: set[str] = {TOKEN}


def new_token(label: str) -> str:
    token = f'{label}-{os.urandom(16).hex()}'
    SECRETS.add(token)
    return token


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def callers_toml(callers: dict[str, tuple[list[str], list[str]]]) -> str:
    """A CALLERS_FILE: name -> (tokens, scopes); only the tokens' digests are written."""
    lines = []
    for name, (tokens, scopes) in callers.items():
        lines += [f'[callers.{name}]', f'tokens_sha256 = {json.dumps([sha(t) for t in tokens])}']
        lines += [f'scopes = {json.dumps(scopes)}', '']
    return '\n'.join(lines)


def replace_file(path: Path, text: str) -> None:
    """Write as the README asks: a new file renamed over the old one."""
    temporary = path.with_name(path.name + '.new')
    temporary.write_text(text)
    os.replace(temporary, path)


def assert_no_secrets(log_dir: str | Path, secrets: set[str]) -> None:
    files = [path for path in Path(log_dir).rglob('*') if path.is_file()]
    text = '\n'.join(path.read_text(errors='replace') for path in files)
    for secret in secrets:
        for form in (secret, sha(secret), sha(secret)[:10]):
            assert form not in text, f'a token (or its digest) is in the logs: {form[:6]}...'


@pytest.fixture(autouse=True)
def no_secret_in_logs(log_dir: str) -> Iterator[None]:
    yield
    assert_no_secrets(log_dir, SECRETS)


BILLING, BILLING_NEXT, READER, NOBODY, STRANGER = (
    new_token(name) for name in ('billing', 'billing-next', 'reader', 'nobody', 'stranger')
)
CALLERS = {
    'billing': ([BILLING], ['example']),
    'reader': ([READER], ['example/foo', 'probe/nested/name']),
    'nobody': ([NOBODY], []),
}


@pytest.fixture
def callers_file(tmp_path: Path) -> Path:
    path = tmp_path / 'callers.toml'
    replace_file(path, callers_toml(CALLERS))
    return path


@pytest.fixture
def scoped_app(database: dict[str, Any], log_dir: str, callers_file: Path) -> Iterator[Flask]:
    app = make_app(database, log_dir, CALLERS_FILE=str(callers_file))
    app.extensions[PIPELINE_KEY].callers.recheck_seconds = 0  # every request looks at the file: no waiting here
    yield app
    app.extensions['dbapi.pools'].close()


def bearer(token: str) -> dict[str, str]:
    return {'Authorization': f'Bearer {token}'}


# action -> its body
ACTIONS = {
    '/example/': None,
    '/example/foo': {'name': 'ada'},
    '/probe/returns_none': None,
    '/probe/nested/name': None,
}
# caller -> (headers, the statuses of ACTIONS in order)
MATRIX = {
    'default': (bearer(TOKEN), [200, 200, 200, 200]),
    'billing': (bearer(BILLING), [200, 200, 403, 403]),
    'reader': (bearer(READER), [403, 200, 403, 200]),
    'nobody': (bearer(NOBODY), [403, 403, 403, 403]),
    'unknown token': (bearer(STRANGER), [401, 401, 401, 401]),
    'no token': ({}, [401, 401, 401, 401]),
}


def test_callers_by_actions(scoped_app: Flask) -> None:
    client = scoped_app.test_client()
    for caller, (headers, statuses) in MATRIX.items():
        for (path, body), status in zip(ACTIONS.items(), statuses, strict=True):
            response = client.post(path, json=body, headers=headers)
            assert response.status_code == status, (caller, path, response.status_code, response.data[:200])


def test_challenges_follow_rfc_6750(scoped_app: Flask) -> None:
    client = scoped_app.test_client()
    missing = client.post('/example/foo', json={'name': 'a'})
    assert missing.headers['WWW-Authenticate'] == 'Bearer realm="dbapi"'
    other_scheme = client.post('/example/foo', json={'name': 'a'}, headers={'Authorization': f'Basic {BILLING}'})
    assert other_scheme.headers['WWW-Authenticate'] == 'Bearer realm="dbapi"'
    for token in (STRANGER, 'a.b.c', 'x' * 5000):
        unknown = client.post('/example/foo', json={'name': 'a'}, headers=bearer(token))
        assert unknown.status_code == 401
        assert unknown.headers['WWW-Authenticate'] == 'Bearer realm="dbapi", error="invalid_token"'
    empty = client.post('/example/foo', json={'name': 'a'}, headers={'Authorization': 'Bearer '})
    assert empty.headers['WWW-Authenticate'] == 'Bearer realm="dbapi"'
    refused = client.post('/probe/nested/name', headers=bearer(BILLING))
    assert refused.status_code == 403
    assert refused.headers['WWW-Authenticate'] == (
        'Bearer realm="dbapi", error="insufficient_scope", scope="probe/nested/name"'
    )
    assert refused.mimetype == 'application/problem+json'
    assert refused.json['type'] == 'urn:dbapi:problem:insufficient-scope'
    assert refused.json['detail'] == "caller 'billing' has no scope for 'probe/nested/name'"


def test_an_unknown_action_is_404_for_a_known_caller_and_401_for_others(scoped_app: Flask) -> None:
    client = scoped_app.test_client()
    assert client.post('/example/nope', headers=bearer(NOBODY)).status_code == 404
    assert client.post('/example/nope', headers=bearer(STRANGER)).status_code == 401


def test_the_access_record_names_the_caller(scoped_app: Flask, log_dir: str) -> None:
    client = scoped_app.test_client()
    sent = {
        'billing-ok': (BILLING, '/example/foo', 200),
        'billing-refused': (BILLING, '/probe/returns_none', 403),
        'stranger': (STRANGER, '/example/foo', 401),
        'default': (TOKEN, '/example/foo', 200),
    }
    for request_id, (token, path, status) in sent.items():
        headers = {**bearer(token), 'X-Request-ID': request_id}
        assert client.post(path, json={'name': 'a'}, headers=headers).status_code == status
    records = {record['http.request.id']: record for record in access_records(read_lines(log_dir))}
    assert records['billing-ok']['dbapi.caller'] == 'billing'
    assert records['billing-refused']['dbapi.caller'] == 'billing'
    assert records['billing-refused']['error.code'] == 'insufficient-scope'
    assert records['stranger']['dbapi.caller'] is None
    assert records['default']['dbapi.caller'] == 'default'
    assert all('dbapi.token_label' not in record for record in records.values())


def test_rotation_with_two_hashes(scoped_app: Flask, callers_file: Path) -> None:
    client = scoped_app.test_client()

    def statuses() -> list[int]:
        return [client.post('/example/', headers=bearer(t)).status_code for t in (BILLING, BILLING_NEXT)]

    assert statuses() == [200, 401]
    replace_file(callers_file, callers_toml({**CALLERS, 'billing': ([BILLING, BILLING_NEXT], ['example'])}))
    assert statuses() == [200, 200]  # both, while the callers move to the new token
    replace_file(callers_file, callers_toml({**CALLERS, 'billing': ([BILLING_NEXT], ['example'])}))
    assert statuses() == [401, 200]


def test_a_broken_file_keeps_the_last_good_set_and_logs_one_error(
    scoped_app: Flask, callers_file: Path, log_dir: str
) -> None:
    client = scoped_app.test_client()

    def works() -> bool:
        return client.post('/example/', headers=bearer(BILLING)).status_code == 200

    def errors() -> list[str]:
        return [
            r['message']
            for r in read_lines(log_dir)
            if r['log.logger'] == 'dbapi.callers' and r['log.level'] == 'error'
        ]

    pasted = callers_toml(CALLERS).replace(sha(READER), READER)  # a token where its digest belongs
    broken = [
        ('[callers.billing\ntokens_sha256 = [', 'is not valid TOML'),
        (pasted, 'callers.reader.tokens_sha256[0] is not 64 hex digits'),
        (callers_toml({**CALLERS, 'other': ([BILLING], [])}), 'callers.other.tokens_sha256[0] is the same token as'),
    ]
    for number, (text, message) in enumerate(broken, 1):
        replace_file(callers_file, text)
        assert all(works() for _ in range(5))
        assert len(errors()) == number, errors()
        assert message in errors()[-1]
        assert str(callers_file) in errors()[-1]
    callers_file.unlink()
    assert all(works() for _ in range(5))
    assert 'cannot be read' in errors()[-1]
    assert len(errors()) == len(broken) + 1
    replace_file(callers_file, callers_toml({**CALLERS, 'billing': ([BILLING_NEXT], ['example'])}))
    assert not works()  # a good file again: it is read, billing's old token is revoked
    assert client.post('/example/', headers=bearer(BILLING_NEXT)).status_code == 200
    assert len(errors()) == len(broken) + 1


def test_a_thousand_callers(database: dict[str, Any], log_dir: str, tmp_path: Path) -> None:
    tokens = {f'caller{number:04d}': new_token(f'c{number}') for number in range(1000)}
    path = tmp_path / 'callers.toml'
    replace_file(
        path,
        callers_toml(
            {name: ([token], [f'example/{"foo" if n % 2 else ""}']) for n, (name, token) in enumerate(tokens.items())}
        ),
    )
    app = make_app(database, log_dir, CALLERS_FILE=str(path))
    try:
        client = app.test_client()
        assert len(app.extensions[PIPELINE_KEY].callers.current) == 1001  # and BEARER's
        for number in (0, 1, 998, 999):
            token = tokens[f'caller{number:04d}']
            allowed, refused = ('/example/foo', '/example/') if number % 2 else ('/example/', '/example/foo')
            assert client.post(allowed, json=ACTIONS[allowed], headers=bearer(token)).status_code == 200
            assert client.post(refused, json=ACTIONS[refused], headers=bearer(token)).status_code == 403
    finally:
        app.extensions['dbapi.pools'].close()


# --- start: the file, and BEARER beside it ---------------------------------------------------


def config(**overrides: Any) -> Callers:
    """The callers a start with these settings would have (create_app builds them so)."""
    return callers_of(load(overrides={'DATABASES': GOOD_DB, 'MODULES': MODULES, **overrides}))


@pytest.mark.parametrize(
    ('text', 'bearer_setting', 'message'),
    [
        (
            callers_toml({'a': ([BILLING], ['example'])}).replace(sha(BILLING), BILLING),
            TOKEN,
            'callers.a.tokens_sha256[0] is not 64 hex digits',
        ),
        (
            callers_toml({'a': ([BILLING], [])}).replace(sha(BILLING), sha(BILLING)[:63]),
            TOKEN,
            'callers.a.tokens_sha256[0] is not 64 hex digits',
        ),
        (
            callers_toml({'a': ([BILLING, BILLING], [])}),
            TOKEN,
            'callers.a.tokens_sha256[1] is the same token as callers.a.tokens_sha256[0]',
        ),
        (
            callers_toml({'a': ([BILLING], []), 'b': ([READER, BILLING], [])}),
            TOKEN,
            'callers.b.tokens_sha256[1] is the same token as callers.a.tokens_sha256[0]',
        ),
        (callers_toml({'a': ([TOKEN], [])}), TOKEN, 'a token of callers.a is also in BEARER'),
        (callers_toml({'default': ([BILLING], [])}), TOKEN, 'callers.default is the name of the BEARER tokens'),
        (
            callers_toml({'a': ([BILLING], ['ex ample'])}),
            TOKEN,
            'callers.a.scopes[0] is not "*", a module or module/action',
        ),
        (callers_toml({'a': ([BILLING], ['*/foo'])}), TOKEN, 'callers.a.scopes[0] is not "*"'),
        ('[callers.a]\ntokens_sha256 = []\nscope = ["example"]\n', TOKEN, "callers.a has unknown key 'scope'"),
        ('[caller.a]\ntokens_sha256 = []\n', TOKEN, "unknown top-level key 'caller'"),
        ('[callers."a b"]\ntokens_sha256 = []\n', TOKEN, "caller name 'a b' is invalid"),
        ('[callers.a]\ntokens_sha256 = "x"\n', TOKEN, 'callers.a.tokens_sha256 must be a list'),
        ('[callers.a\n', TOKEN, 'is not valid TOML'),
        ('', f'{TOKEN},{TOKEN}', 'BEARER lists its token number 2 twice'),
    ],
)
def test_a_bad_file_stops_the_start_naming_the_entry(
    tmp_path: Path, text: str, bearer_setting: str, message: str
) -> None:
    path = tmp_path / 'callers.toml'
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config(CALLERS_FILE=str(path), BEARER=bearer_setting)
    assert message in str(caught.value)
    assert '\n' not in str(caught.value)
    for secret in (BILLING, READER, TOKEN):
        assert secret not in str(caught.value) and sha(secret)[:16] not in str(caught.value)


def test_a_missing_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'CALLERS_FILE .*none\.toml cannot be read: No such file'):
        config(CALLERS_FILE=str(tmp_path / 'none.toml'))


def test_the_file_alone_is_enough_and_nothing_at_all_is_refused(callers_file: Path) -> None:
    built = config(BEARER='', CALLERS_FILE=str(callers_file))
    assert built.current.find(BILLING.encode()).name == 'billing'
    assert built.current.find(TOKEN.encode()) is None
    with pytest.raises(ConfigError, match='BEARER is empty and neither CALLERS_FILE nor JWT_JWKS_URL is set'):
        config(BEARER='', CALLERS_FILE='')


def test_a_bad_file_stops_the_process_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / 'callers.toml'
    path.write_text(callers_toml({'billing': ([BILLING], [])}).replace(sha(BILLING), BILLING))
    env = {**os.environ, 'ENVIRONMENT': 'testing', 'CALLERS_FILE': str(path), 'LOG_DIR': str(tmp_path / 'logs')}
    command = [sys.executable, '-c', 'import app; app.app']
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 3, done.stderr
    assert done.stderr == (
        f'dbapi: configuration error: CALLERS_FILE {path}: callers.billing.tokens_sha256[0] is not 64 hex digits'
        ' (the SHA-256 of a token: flask --app app new-token billing)\n'
    )


def test_callers_show_no_digest() -> None:
    callers = Callers(bearer_callers([TOKEN.encode()]), None)
    assert sha(TOKEN) not in repr(callers) and token_digest(TOKEN.encode()).hex()[:10] not in repr(callers)


# --- new-token ---------------------------------------------------------------------------------


def test_new_token_prints_a_token_once_and_its_line(scoped_app: Flask, callers_file: Path) -> None:
    result = scoped_app.test_cli_runner().invoke(args=['new-token', 'payroll'])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    token = lines[1].strip()
    SECRETS.add(token)
    assert re.fullmatch(r'[A-Za-z0-9_-]{43}', token)  # 32 random bytes, base64url
    assert result.output.count(token) == 1
    stanza = '\n'.join(lines[3:]).replace('scopes = []', 'scopes = ["example/foo"]')
    assert f'tokens_sha256 = ["{sha(token)}"]' in stanza
    client = scoped_app.test_client()
    assert client.post('/example/foo', json={'name': 'a'}, headers=bearer(token)).status_code == 401
    replace_file(callers_file, callers_toml(CALLERS) + '\n' + stanza + '\n')
    assert client.post('/example/foo', json={'name': 'a'}, headers=bearer(token)).status_code == 200
    assert client.post('/example/', headers=bearer(token)).status_code == 403
    again = scoped_app.test_cli_runner().invoke(args=['new-token', 'payroll']).output.splitlines()[1].strip()
    SECRETS.add(again)
    assert again != token


def test_new_token_refuses_a_name_the_file_cannot_hold(scoped_app: Flask) -> None:
    result = scoped_app.test_cli_runner().invoke(args=['new-token', 'pay roll'])
    assert result.exit_code != 0
    assert "caller name 'pay roll' is invalid" in result.output


# --- a real gunicorn: revocation and addition under load ---------------------------------------


class Load:
    """Threads posting with a token that stays valid throughout; every answer must be 200."""

    def __init__(self, url: str, token: str, threads: int = 4, limit_seconds: float = 60) -> None:
        self.url, self.token = url, token
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.deadline = time.monotonic() + limit_seconds
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            try:  # a new connection each time: the workers share the load
                response = requests.post(
                    f'{self.url}/example/foo', json={'name': 'a'}, headers=bearer(self.token), timeout=10
                )
                self.statuses.append(response.status_code)
            except requests.RequestException as error:
                self.errors.append(type(error).__name__)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


def served_by(log_dir: str, request_ids: set[str]) -> dict[str, int]:
    return {
        record['http.request.id']: record['process.pid']
        for record in access_records(read_lines(log_dir))
        if record['http.request.id'] in request_ids
    }


def test_revocation_and_addition_under_load_in_every_worker(
    database: dict[str, Any], log_dir: str, tmp_path: Path
) -> None:
    keep, revoked, added = new_token('keep'), new_token('revoked'), new_token('added')
    path = tmp_path / 'callers.toml'
    before = {'keep': ([keep], ['example']), 'leaving': ([revoked], ['example', 'probe'])}
    after = {'keep': ([keep], ['example']), 'arriving': ([added], ['example'])}
    replace_file(path, callers_toml(before))
    with running_service(database, log_dir, CALLERS_FILE=str(path)) as service:
        url = service.url

        def post(token: str, number: int) -> requests.Response:
            headers = {**bearer(token), 'X-Request-ID': f'probe-{token[:6]}-{number}'}
            return requests.post(f'{url}/example/', headers=headers, timeout=10)

        assert post(revoked, 0).status_code == 200 and post(added, 0).status_code == 401
        with Load(url, keep) as load:
            in_flight: list[int] = []
            slow = threading.Thread(
                target=lambda: in_flight.append(
                    requests.post(
                        f'{url}/probe/sleep', json={'seconds': 1.5}, headers=bearer(revoked), timeout=20
                    ).status_code
                )
            )
            slow.start()
            time.sleep(0.3)  # the slow request is authenticated and running
            replace_file(path, callers_toml(after))
            changed = time.monotonic()
            time.sleep(max(0.0, changed + 2.0 - time.monotonic()))  # the contract: in force within 2 s
            ids, pids = set(), set()
            for number in range(1, 200):
                assert post(revoked, number).status_code == 401
                assert post(added, number).status_code == 200
                ids |= {f'probe-{revoked[:6]}-{number}', f'probe-{added[:6]}-{number}'}
                if number % 10 == 0:
                    pids = set(served_by(log_dir, ids).values())
                    if len(pids) >= service.workers:
                        break
            slow.join(20)
        assert len(pids) == service.workers, f'the checks reached only workers {pids}'
        assert in_flight == [200]  # authenticated before the change: it is not failed by it
        assert load.errors == [] and load.statuses and set(load.statuses) == {200}, (load.errors, set(load.statuses))
        replace_file(path, '[callers.keep\n')  # broken: the last good set stays
        time.sleep(2.0)
        assert all(post(added, 1000 + n).status_code == 200 for n in range(40))
    reload_errors = [r for r in read_lines(log_dir) if r['log.logger'] == 'dbapi.callers' and r['log.level'] == 'error']
    assert reload_errors, 'the broken file was not reported'
    assert all('is not valid TOML' in r['message'] for r in reload_errors)
    assert len({r['process.pid'] for r in reload_errors}) == len(reload_errors)  # once per worker, not per request
    assert 'Traceback' not in service.stderr()
