from psycopg2.extensions import connection as Connection

from lib import Prepared, get_db_from_conn, inject_conn, transactional, use_schema

from .schemas import CodeSchema, SecondsSchema

# A read of tests/modules/probe's table, declared the way modules/bench declares its own.
READ_ITEM = Prepared(
    "SELECT code, qty, %(bonus)s AS bonus, '50%%' AS pct FROM probe_items WHERE code = %(code)s",
    code='varchar',
    bonus='integer',
)


@use_schema(SecondsSchema)
@inject_conn(autocommit=True)
def sleep_autocommit(conn: Connection, seconds: float) -> bool:
    get_db_from_conn(conn).fetch_one('SELECT pg_sleep(%s)', [seconds])
    return True


@inject_conn(autocommit=True)
def timeouts(conn: Connection) -> dict:
    """The statement_timeout a statement runs under: alone in autocommit, and in a transaction."""
    alone = get_db_from_conn(conn).fetch_one('SHOW statement_timeout')
    with transactional(conn) as db:
        db.fetch_one('SELECT 1')
        later = db.fetch_one('SHOW statement_timeout')
    return {'autocommit': alone, 'transaction': later}


@use_schema(CodeSchema)
@inject_conn(autocommit=True)
def read_item(conn: Connection, code: str) -> dict | None:
    return get_db_from_conn(conn).fetch_row(READ_ITEM, {'code': code, 'bonus': 1.5})


@inject_conn(autocommit=True)
def missing_prepared(conn: Connection) -> int:
    """What a statement prepared in an earlier transaction meets behind pgbouncer: SQLSTATE 26000."""
    return get_db_from_conn(conn).fetch_one('EXECUTE dbapi_never_prepared')
