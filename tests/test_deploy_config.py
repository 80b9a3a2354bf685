"""The deployment files, checked by the real tools: `docker stack config` (Docker's own Swarm
parser, no daemon needed), `nginx -t` on the rendered template, and gunicorn's master checks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lib.core.config import default_of, load, parse_database
from lib.server.startup import budgets, check_connection_budget
from scripts.topology import (
    NGINX_DEFAULTS,
    PLACEHOLDER,
    TEMPLATE,
    Nginx,
    TopologyError,
    find_nginx,
    free_port,
    render,
)
from tests.conftest import PG
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / 'docker-compose.yml'
PGBOUNCER_COMPOSE = ROOT / 'docker-compose.pgbouncer.yml'  # deployed over COMPOSE to turn pgbouncer on
GUNICORN = Path(sys.executable).parent / 'gunicorn'
# ${NAME:-default} or ${NAME:?message}: anything else becomes empty when NAME is unset.
SAFE_REFERENCE = re.compile(r'\$\{[A-Z][A-Z0-9_]*:[-?][^}]*\}')
REQUIRED_REFERENCE = re.compile(r'\$\{([A-Z][A-Z0-9_]*):\?[^}]*\}')
# The resolve parameter of upstream servers is in open-source nginx from 1.27.3.
RESOLVE_SINCE = (1, 27, 3)


def strings(node: Any) -> list[str]:
    """Every key and value of the parsed file: what Docker interpolates (comments are not)."""
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in (*strings(key), *strings(value))]
    if isinstance(node, list):
        return [text for item in node for text in strings(item)]
    return [node] if isinstance(node, str) else []


def compose_strings(*files: Path) -> list[str]:
    return [text for path in files or (COMPOSE,) for text in strings(yaml.safe_load(path.read_text()))]


def required_variables(*files: Path) -> set[str]:
    return {name for text in compose_strings(*files) for name in REQUIRED_REFERENCE.findall(text)}


def required_values(**overrides: str) -> dict[str, str]:
    values = {name: f'value-of-{name.lower()}' for name in required_variables()}
    return {**values, 'EXPOSED_PORT': '8080', **overrides}


def stack_config(env: dict[str, str], *files: Path) -> subprocess.CompletedProcess[str]:
    docker = require_tool(shutil.which('docker'), 'the Docker CLI')
    clean = {'PATH': os.environ['PATH'], 'HOME': str(ROOT / '.local'), **env}  # nothing inherited by accident
    compose = [argument for path in files or (COMPOSE,) for argument in ('-c', str(path))]
    return subprocess.run([docker, 'stack', 'config', *compose], capture_output=True, text=True, env=clean, timeout=60)


def deployed_stack(*files: Path) -> dict[str, Any]:
    result = stack_config(required_values(), *files)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def seconds(duration: str) -> float:
    units = {'h': 3600, 'm': 60, 's': 1}
    return sum(float(n) * units[u] for n, u in re.findall(r'([0-9.]+)([hms])', duration))


@pytest.mark.parametrize('files', [(COMPOSE,), (COMPOSE, PGBOUNCER_COMPOSE)], ids=['stack', 'with-pgbouncer'])
def test_every_variable_of_the_stack_has_a_default_or_must_be_set(files: tuple[Path, ...]) -> None:
    # `$$` is a literal dollar; a lone $NAME or ${NAME} silently becomes empty when unset.
    text = '\n'.join(compose_strings(*files)).replace('$$', '')
    references = re.findall(r'\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*', text)
    unsafe = [ref for ref in references if not SAFE_REFERENCE.fullmatch(ref)]
    assert not unsafe, f'these become empty when unset: {unsafe}'
    assert {'VERSION', 'EXPOSED_PORT', 'DB_HOST', 'DB_NAME', 'DB_USER'} <= required_variables(*files)


@pytest.mark.parametrize('files', [(COMPOSE,), (COMPOSE, PGBOUNCER_COMPOSE)], ids=['stack', 'with-pgbouncer'])
def test_the_stack_refuses_to_render_with_a_required_variable_unset(files: tuple[Path, ...]) -> None:
    for missing in sorted(required_variables(*files)):
        values = required_values()
        del values[missing]
        result = stack_config(values, *files)
        assert result.returncode != 0, f'the stack rendered without {missing}'
        assert missing in result.stderr


def test_the_stack_is_accepted_by_the_swarm_parser() -> None:
    stack = deployed_stack()
    api, nginx = stack['services']['api'], stack['services']['nginx']
    deploy = api['deploy']
    assert deploy['replicas'] == 10
    assert deploy['restart_policy']['condition'] == 'any'
    assert deploy['update_config']['order'] == 'start-first'
    assert deploy['update_config']['failure_action'] == 'rollback'
    assert 'rollback_config' in deploy and 'limits' in deploy['resources']
    assert 'start_period' in api['healthcheck']
    assert seconds(api['stop_grace_period']) > int(api['environment']['GRACEFUL_TIMEOUT'])
    assert {secret['source'] for secret in api['secrets']} == {'dbapi_bearer', 'dbapi_db_pass'}
    assert api['environment']['BEARER_FILE'] == '/run/secrets/dbapi_bearer'
    assert api['environment']['DEFAULT_DB_PASS_FILE'] == '/run/secrets/dbapi_db_pass'
    assert nginx['ports'] == [{'mode': 'host', 'target': 8000, 'published': 8080, 'protocol': 'tcp'}]
    assert {volume['target'] for volume in stack['services']['filebeat']['volumes']} >= {'/src/logs'}


def test_the_stack_sizes_connections_for_a_default_postgresql() -> None:
    api = deployed_stack()['services']['api']['environment']
    replicas, workers, pool = int(api['API_REPLICAS']), int(api['WEB_CONCURRENCY']), int(api['POOL_SIZE'])
    assert (replicas + 1) * workers * pool <= 100 - 3  # stock max_connections minus superuser_reserved


def test_pgbouncer_is_off_unless_its_file_is_deployed_over_the_stack() -> None:
    stack = deployed_stack()
    assert 'pgbouncer' not in stack['services']
    assert 'DEFAULT_DB_PGBOUNCER' not in stack['services']['api']['environment']


def test_the_pgbouncer_file_puts_a_pinned_transaction_pooler_between_api_and_postgresql() -> None:
    stack = deployed_stack(COMPOSE, PGBOUNCER_COMPOSE)
    api, pooler = stack['services']['api'], stack['services']['pgbouncer']
    env, own = api['environment'], pooler['environment']
    assert re.fullmatch(r'edoburu/pgbouncer:v\d+\.\d+\.\d+-p\d+', pooler['image']), pooler['image']
    assert (env['DEFAULT_DB_HOST'], env['DEFAULT_DB_PORT']) == ('pgbouncer', own['LISTEN_PORT'])
    through = parse_database('default', {'dbname': 'x', 'pgbouncer': env['DEFAULT_DB_PGBOUNCER']})
    assert through.pgbouncer is not None and through.pgbouncer.mode == 'transaction'
    assert own['POOL_MODE'] == 'transaction'
    assert 'options' not in own.get('IGNORE_STARTUP_PARAMETERS', '')  # the api needs no workaround
    assert own['DB_HOST'] == required_values()['DB_HOST']  # PostgreSQL itself
    assert (own['DB_NAME'], own['DB_USER']) == (env['DEFAULT_DB_NAME'], env['DEFAULT_DB_USER'])
    assert own['DB_USER'] in own['STATS_USERS'].split(',')  # the start-up check reads SHOW CONFIG
    assert own['AUTH_FILE'] == '/run/secrets/dbapi_pgbouncer_userlist'
    assert {secret['source'] for secret in pooler['secrets']} == {'dbapi_pgbouncer_userlist'}
    assert 'pg_isready' in pooler['healthcheck']['test'] and own['LISTEN_PORT'] in pooler['healthcheck']['test']
    assert pooler['deploy']['replicas'] == 1
    assert int(own['QUERY_WAIT_TIMEOUT']) <= 5 and int(own['SERVER_LOGIN_RETRY']) <= 2


DATABASE_KEYS = ('DEFAULT_DB_HOST', 'DEFAULT_DB_PORT', 'DEFAULT_DB_NAME', 'DEFAULT_DB_USER', 'DEFAULT_DB_PASS_FILE')


def test_a_job_applies_the_migrations_once_per_rollout_to_the_api_s_database() -> None:
    stack = deployed_stack()
    api, job = stack['services']['api'], stack['services']['migrate']
    assert job['deploy']['mode'] == 'replicated-job' and job['deploy']['replicas'] == 1
    assert job['deploy']['restart_policy']['condition'] == 'on-failure'
    assert job['command'] == ['flask', '--app', 'app', 'migrate']
    assert job['image'] == api['image']  # the new VERSION's files: each deploy runs the job again
    assert job['healthcheck'] == {'disable': True}  # the image's check asks for a server the job does not run
    assert {key: job['environment'][key] for key in DATABASE_KEYS} == {
        key: api['environment'][key] for key in DATABASE_KEYS
    }
    assert job['environment']['ENVIRONMENT'] == 'production' and 'MIGRATE_ON_START' not in api['environment']
    assert {secret['source'] for secret in job['secrets']} == {'dbapi_bearer', 'dbapi_db_pass'}


def test_with_pgbouncer_the_migrate_job_still_goes_straight_to_postgresql() -> None:
    stack = deployed_stack(COMPOSE, PGBOUNCER_COMPOSE)
    api, job = stack['services']['api']['environment'], stack['services']['migrate']['environment']
    postgresql = (required_values()['DB_HOST'], '5432')
    assert (job['DEFAULT_DB_HOST'], job['DEFAULT_DB_PORT']) == postgresql and 'DEFAULT_DB_PGBOUNCER' not in job
    assert (api['DEFAULT_DB_MIGRATE_HOST'], api['DEFAULT_DB_MIGRATE_PORT']) == postgresql


def test_the_pgbouncer_file_sizes_clients_and_its_pool() -> None:
    stack = deployed_stack(COMPOSE, PGBOUNCER_COMPOSE)['services']
    api, own = stack['api']['environment'], stack['pgbouncer']['environment']
    replicas, workers, pool = int(api['API_REPLICAS']), int(api['WEB_CONCURRENCY']), int(api['POOL_SIZE'])
    assert (replicas + 1) * workers * pool <= int(own['MAX_CLIENT_CONN'])
    assert int(own['DEFAULT_POOL_SIZE']) <= 100 - 3  # stock max_connections minus superuser_reserved


def test_every_layer_agrees_on_the_body_limit() -> None:
    stack = deployed_stack()['services']
    limit = default_of('MAX_CONTENT_LENGTH')
    assert stack['api']['environment']['MAX_CONTENT_LENGTH'] == limit
    assert stack['nginx']['environment']['MAX_CONTENT_LENGTH'] == limit
    assert f'MAX_CONTENT_LENGTH={limit}' in (ROOT / 'nginx' / 'Dockerfile').read_text()


def test_nginx_runs_one_worker_per_cpu_of_its_limit_in_every_layer() -> None:
    nginx = deployed_stack()['services']['nginx']
    cpus = float(nginx['deploy']['resources']['limits']['cpus'])
    assert cpus.is_integer()
    workers = str(int(cpus))
    assert nginx['environment']['NGINX_WORKER_PROCESSES'] == workers
    assert f'NGINX_WORKER_PROCESSES={workers}' in (ROOT / 'nginx' / 'Dockerfile').read_text()
    assert NGINX_DEFAULTS['NGINX_WORKER_PROCESSES'] == workers  # the local topology and the bench
    assert 'worker_processes auto' not in TEMPLATE.read_text()  # auto counts the node's CPUs


def test_the_stack_and_the_image_fill_every_placeholder_of_the_template() -> None:
    placeholders = set(PLACEHOLDER.findall(TEMPLATE.read_text()))
    assert set(deployed_stack()['services']['nginx']['environment']) == placeholders
    image_defaults = set(re.findall(r'^\s+([A-Z_]+)=', (ROOT / 'nginx' / 'Dockerfile').read_text(), re.MULTILINE))
    assert placeholders <= image_defaults


def test_the_template_renders_like_envsubst_in_the_image() -> None:
    envsubst = require_tool(shutil.which('envsubst'), 'envsubst (gettext-base)')
    values = deployed_stack()['services']['nginx']['environment']
    shell_format = ' '.join(f'${{{name}}}' for name in values)
    rendered = subprocess.run(
        [envsubst, shell_format], input=TEMPLATE.read_text(), capture_output=True, text=True, env=values, check=True
    ).stdout
    assert rendered == render(TEMPLATE.read_text(), values)


def test_an_unset_placeholder_is_refused_with_its_name() -> None:
    with pytest.raises(TopologyError, match='NGINX_UPSTREAM_SERVERS'):
        render(TEMPLATE.read_text(), {'NGINX_LISTEN': '8000'})


def nginx_version(binary: str) -> tuple[int, ...]:
    output = subprocess.run([binary, '-v'], capture_output=True, text=True, check=True).stderr
    return tuple(int(part) for part in re.search(r'nginx/([0-9.]+)', output).group(1).split('.'))


def test_nginx_accepts_the_local_rendering(tmp_path: Path) -> None:
    require_tool(find_nginx(), 'nginx')
    nginx = Nginx(tmp_path, [free_port(), free_port()])
    try:
        checked = nginx.test()
    finally:
        nginx.stop()  # removes the prefix directory it made under /tmp when run as root
    assert checked.returncode == 0, checked.stderr


def test_nginx_that_fails_to_start_leaves_no_prefix_behind(tmp_path: Path) -> None:
    require_tool(find_nginx(), 'nginx')
    nginx = Nginx(tmp_path, [free_port()], NGINX_RATE_LIMIT='not-a-rate')
    with pytest.raises(TopologyError, match='nginx -t rejected'):
        nginx.start()
    assert nginx.process is None
    if nginx.prefix != nginx.directory:  # as root: a directory of its own under /tmp
        assert not nginx.prefix.exists()


def test_nginx_accepts_the_swarm_rendering(tmp_path: Path) -> None:
    """The stack's values; an nginx older than 1.27.3 (Debian 12 has 1.22) lacks `resolve` and
    cannot resolve tasks.api here, so it checks everything else: the same line without both."""
    binary = require_tool(find_nginx(), 'nginx')
    values = dict(deployed_stack()['services']['nginx']['environment'])
    values['NGINX_ACCESS_LOG'] = str(tmp_path / 'nginx-access.log')
    values['NGINX_LISTEN'] = f'127.0.0.1:{free_port()}'
    assert values['NGINX_UPSTREAM_SERVERS'] == 'server tasks.api:8000 resolve;'
    if nginx_version(binary) < RESOLVE_SINCE:
        values['NGINX_UPSTREAM_SERVERS'] = 'server 127.0.0.1:8000;'
    nginx = Nginx(tmp_path, [])
    nginx.conf.write_text(render(TEMPLATE.read_text(), values))
    try:
        checked = subprocess.run(nginx.command('-t'), capture_output=True, text=True, timeout=30)
    finally:
        nginx.stop()
    assert checked.returncode == 0, checked.stderr
    assert 'FROM nginx:1.28' in (ROOT / 'nginx' / 'Dockerfile').read_text()  # the image has `resolve`


def gunicorn_master(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {
        'PATH': os.environ['PATH'],
        'ENVIRONMENT': 'testing',
        'BEARER': 'testing-token',
        'DEFAULT_DB_HOST': str(PG['host']),
        'DEFAULT_DB_PORT': str(PG['port']),
        'DEFAULT_DB_USER': str(PG['user']),
        'DEFAULT_DB_NAME': 'postgres',
        'BIND': f'127.0.0.1:{free_port()}',
        'LOG_DIR': str(ROOT / '.local' / 'test-logs'),
    }
    command = [str(GUNICORN), '-c', 'gunicorn.conf.py', 'app:app']
    return subprocess.run(command, cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=30)


def test_a_wrong_setting_stops_the_master_with_one_line() -> None:
    result = gunicorn_master({'ENVIRONMENT': 'production', 'BEARER': 'short'})
    assert result.returncode == 3
    errors = [line for line in result.stderr.splitlines() if line.startswith('dbapi:')]
    assert errors == ['dbapi: configuration error: BEARER has a token shorter than 24 characters']
    assert 'Traceback' not in result.stderr
    assert 'Booting worker' not in result.stderr


def test_more_connections_than_postgresql_accepts_stops_the_master() -> None:
    result = gunicorn_master({'API_REPLICAS': '500', 'WEB_CONCURRENCY': '2', 'POOL_SIZE': '4'})
    assert result.returncode == 3
    assert 'dbapi: configuration error: (API_REPLICAS=500 + 1) x workers=2 x POOL_SIZE=4 = 4008 connections' in (
        result.stderr
    )
    assert 'Booting worker' not in result.stderr


def test_a_database_that_does_not_answer_yet_is_a_warning_not_a_refusal() -> None:
    config = load(overrides={'POOL_SIZE': 4, 'DATABASES': {'default': dict(PG, port=free_port(), dbname='postgres')}})
    (budget,) = check_connection_budget(config, workers=2, replicas=50)
    assert budget.usable is None and budget.error
    assert budget.needed == 51 * 2 * 4


def test_databases_on_one_server_share_its_budget() -> None:
    databases = {'default': dict(PG, dbname='postgres'), 'other': dict(PG, dbname='x')}
    (budget,) = budgets(load(overrides={'POOL_SIZE': 2, 'DATABASES': databases}), workers=3, replicas=4)
    assert (budget.databases, budget.needed) == (2, 5 * 3 * 2 * 2)
    assert budget.usable is not None and budget.usable > 0


def test_a_non_number_of_replicas_is_named() -> None:
    result = gunicorn_master({'API_REPLICAS': 'ten'})
    assert result.returncode == 3
    assert "dbapi: configuration error: API_REPLICAS='ten' is not a whole number" in result.stderr


def test_the_stack_can_run_prometheus_beside_the_api_and_does_not_by_default() -> None:
    prometheus = deployed_stack()['services']['prometheus']
    assert prometheus['deploy']['replicas'] == 0
    assert {config['target'] for config in prometheus['configs']} == {
        '/etc/prometheus/prometheus.yml',
        '/etc/prometheus/alerts.yml',
    }
    assert '--config.file=/etc/prometheus/prometheus.yml' in prometheus['command']
    on = stack_config(required_values(PROMETHEUS_REPLICAS='1'))
    assert on.returncode == 0, on.stderr
    assert yaml.safe_load(on.stdout)['services']['prometheus']['deploy']['replicas'] == 1


def test_prometheus_scrapes_every_api_task_on_the_port_gunicorn_binds() -> None:
    scrape = yaml.safe_load((ROOT / 'deploy' / 'prometheus' / 'prometheus.yml').read_text())
    (job,) = [job for job in scrape['scrape_configs'] if job['job_name'] == 'dbapi']
    (discovery,) = job['dns_sd_configs']
    assert discovery['names'] == ['tasks.api'] and discovery['type'] == 'A'
    assert 'api' in deployed_stack()['services']
    assert default_of('BIND').endswith(f':{discovery["port"]}')  # gunicorn.conf.py binds the setting
    assert job.get('metrics_path', '/metrics') == '/metrics'


def test_the_image_carries_the_version_the_metrics_report() -> None:
    copied = re.findall(r'^COPY (.*) \./$', (ROOT / 'Dockerfile').read_text(), re.MULTILINE)
    assert any('pyproject.toml' in line.split() for line in copied), copied


@pytest.mark.parametrize('files', [(COMPOSE,), (COMPOSE, PGBOUNCER_COMPOSE)], ids=['stack', 'with-pgbouncer'])
def test_the_stack_runs_rabbitmq_and_two_relays_connected_directly_to_postgresql(files: tuple[Path, ...]) -> None:
    stack = deployed_stack(*files)
    relay, broker = stack['services']['relay'], stack['services']['rabbitmq']
    assert relay['command'] == ['flask', '--app', 'app', 'relay']
    assert relay['deploy']['replicas'] == 2 and broker['deploy']['replicas'] == 1
    environment = relay['environment']
    assert environment['DEFAULT_DB_HOST'] == 'value-of-db_host' and 'DEFAULT_DB_PGBOUNCER' not in environment
    assert environment['EVENTS_AMQP_URL_FILE'] == '/run/secrets/dbapi_amqp_url'
    assert {secret['source'] for secret in relay['secrets']} == {'dbapi_bearer', 'dbapi_db_pass', 'dbapi_amqp_url'}
    assert seconds(relay['stop_grace_period']) > 30  # the relay's confirms wait at most 30 s (CONFIRM_TIMEOUT)
    assert broker['image'].startswith('rabbitmq:') and broker['image'].split(':')[1][0].isdigit()
    assert [secret['target'] for secret in broker['secrets']] == ['/etc/rabbitmq/conf.d/20-dbapi.conf']
    assert '/var/lib/rabbitmq' in {volume['target'] for volume in broker['volumes']}


def test_prometheus_scrapes_every_relay_on_the_port_it_serves() -> None:
    scrape = yaml.safe_load((ROOT / 'deploy' / 'prometheus' / 'prometheus.yml').read_text())
    (job,) = [job for job in scrape['scrape_configs'] if job['job_name'] == 'dbapi-relay']
    (discovery,) = job['dns_sd_configs']
    relay = deployed_stack()['services']['relay']
    assert discovery['names'] == ['tasks.relay']
    assert str(discovery['port']) == relay['environment']['EVENTS_METRICS_PORT']
