"""The peer: modules/bench's read and upsert as a Python team would write them with FastAPI.

Written the way FastAPI's documentation teaches, nothing tuned: pydantic models (strict ints,
unknown fields refused), an `HTTPBearer` dependency that compares the token in constant time,
an asyncpg pool made in the lifespan with asyncpg's defaults but the app's pool size (connected
on demand, as the app's is), a connection dependency with `yield`, and an ASGI middleware that
writes one JSON access line per request to the worker's own file. The same SQL as dbapi
(`modules.bench.sql`), the upsert in a transaction and the read without one, as modules/bench
runs them; the same answers (JSON).

bench.service starts it under uvicorn with uvloop and httptools and dbapi's number of workers.
Its settings come from the environment: PEER_TOKEN, PEER_POOL_SIZE, PEER_LOG_DIR, PEER_RESET
('0': asyncpg's reset query on release left out, the variant shown beside it), and dbapi's
DEFAULT_DB_NAME, _HOST, _PORT and _USER.
"""

from __future__ import annotations

import datetime
import hmac
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modules.bench.sql import SQL_READ, SQL_UPSERT

TOKEN = os.environ['PEER_TOKEN'].encode()
if not TOKEN:
    raise RuntimeError('PEER_TOKEN is empty: the peer needs the token its callers send')
POOL_SIZE = int(os.environ.get('PEER_POOL_SIZE', '4'))
RESET = os.environ.get('PEER_RESET', '1') != '0'
LOG_DIR = Path(os.environ.get('PEER_LOG_DIR', '.'))
INT4 = 2**31


def positional(query: str) -> tuple[str, tuple[str, ...]]:
    """The query with asyncpg's `$n` in place of each `%(name)s`, and the names in `$n` order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f'${names.index(match.group(1)) + 1}'

    return re.sub(r'%\((\w+)\)s', number, query), tuple(names)


READ, READ_PARAMS = positional(SQL_READ)
UPSERT, UPSERT_PARAMS = positional(SQL_UPSERT)


class Key(BaseModel):
    model_config = ConfigDict(strict=True, extra='forbid')
    aid: int = Field(ge=1)


class Upsert(BaseModel):
    model_config = ConfigDict(strict=True, extra='forbid')
    aid: int = Field(ge=1)
    bid: int = Field(ge=1)
    abalance: int = Field(ge=-INT4, le=INT4 - 1)


class Account(BaseModel):
    aid: int
    bid: int
    abalance: int
    filler: str | None


class Upserted(BaseModel):
    aid: int
    bid: int
    abalance: int


access = logging.getLogger('peer.access')


def open_access_log() -> None:
    """This worker's own file: `peer-<pid>.log` under PEER_LOG_DIR, one JSON line a record."""
    handler = logging.FileHandler(LOG_DIR / f'peer-{os.getpid()}.log')
    handler.setFormatter(logging.Formatter('%(message)s'))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False


async def keep_session(connection: asyncpg.Connection) -> None:
    """The pool's `reset` hook when PEER_RESET=0: no reset query on release (asyncpg still
    ends an open transaction and drops the connection's listeners itself)."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    open_access_log()
    app.state.pool = await asyncpg.create_pool(
        host=os.environ['DEFAULT_DB_HOST'],
        port=int(os.environ['DEFAULT_DB_PORT']),
        user=os.environ['DEFAULT_DB_USER'],
        database=os.environ['DEFAULT_DB_NAME'],
        min_size=0,  # connects on demand, as the app's pool does (asyncpg's default connects all at start)
        max_size=POOL_SIZE,
        reset=None if RESET else keep_session,
    )
    yield
    await app.state.pool.close()


bearer = HTTPBearer()


async def authorized(credentials: Annotated[HTTPAuthorizationCredentials, Depends(bearer)]) -> None:
    if not hmac.compare_digest(credentials.credentials.encode(), TOKEN):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail='Invalid authentication credentials',
            headers={'WWW-Authenticate': 'Bearer'},
        )


async def connection(request: Request) -> AsyncIterator[asyncpg.Connection]:
    async with request.app.state.pool.acquire() as conn:
        yield conn


Connection = Annotated[asyncpg.Connection, Depends(connection)]

app = FastAPI(lifespan=lifespan)
bench = APIRouter(prefix='/bench', dependencies=[Depends(authorized)])


class AccessLine:
    """One JSON line per request, as an ASGI middleware added with `app.add_middleware` (FastAPI's
    advanced middleware page). Starlette discourages `@app.middleware('http')` (BaseHTTPMiddleware),
    and it took 45% of a worker's reads here (docs/performance.md): the peer is not made to lose."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope['type'] != 'http':
            await self.app(scope, receive, send)
            return
        started = time.perf_counter_ns()
        status_code = 500  # unless the app starts an answer

        async def sending(message: Message) -> None:
            nonlocal status_code
            if message['type'] == 'http.response.start':
                status_code = message['status']
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            record = {
                '@timestamp': datetime.datetime.now(datetime.UTC).isoformat(),
                'http.request.method': scope['method'],
                'url.path': scope['path'],
                'http.response.status_code': status_code,
                'client.ip': scope['client'][0] if scope.get('client') else None,
                'event.duration': time.perf_counter_ns() - started,
            }
            access.info(json.dumps(record))


app.add_middleware(AccessLine)


@bench.post('/read', response_model=Account | None)
async def read(key: Key, conn: Connection) -> Any:
    row = await conn.fetchrow(READ, *(getattr(key, name) for name in READ_PARAMS))
    return dict(row) if row else None


@bench.post('/upsert', response_model=Upserted | None)
async def upsert(body: Upsert, conn: Connection) -> Any:
    async with conn.transaction():
        row = await conn.fetchrow(UPSERT, *(getattr(body, name) for name in UPSERT_PARAMS))
    return dict(row) if row else None


@app.get('/health')
async def health() -> dict[str, str]:
    return {'status': 'ok'}


app.include_router(bench)
