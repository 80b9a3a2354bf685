"""The one path of an action request, read top to bottom (`Pipeline.serve`).

| step         | reads                                    | owned by                  | refuses with   |
| ------------ | ---------------------------------------- | ------------------------- | -------------- |
| caller       | Authorization (opaque token or JWT)      | lib.auth.callers          | 401, 503       |
| action       | the path's route, the method             | `find_action` here        | 404, 405       |
| scope        | the caller's scopes, the action's name   | lib.auth.callers          | 403            |
| body         | Content-Type, Content-Length, the bytes  | lib.pipeline.input        | 400, 413, 415  |
| validation   | the action's schema                      | lib.pipeline.input        | 422            |
| idempotency  | Idempotency-Key, caller, the body's hash | lib.db.idempotency        | 400, 409, 422  |
| transaction  | the action's database and autocommit     | lib.db.connections        | 503, 504       |
| call, answer | the action, its `@returns` schema        | `answer` here             | the action's   |
| commit       | (with a key, the answer stored first)    | lib.db.connections, .idempotency | SQLSTATE → status |

`POST /batch` is the same path with the action, scope and validation steps run once per step
(lib.pipeline.batch), and one transaction for every step. Any failure, at any step, becomes one
problem answer in one place (`Pipeline.failure`, through the pure `to_problem`). The request's
record is written here only: lower layers get what they need as arguments and return results.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import psycopg2
from marshmallow import Schema, ValidationError
from psycopg2.extensions import connection as Connection
from werkzeug.exceptions import HTTPException

from lib.auth.callers import Callers, authenticate, authorize
from lib.auth.jwt_verifier import JwtVerifier
from lib.contract.registry import BATCH, Action, Registry
from lib.core.config import Config
from lib.core.errors import MAX_NAME_IN_MESSAGE, PROBLEM_JSON, ApiError, internal_error, problem_document
from lib.core.json import dumps
from lib.core.record import Answer, RequestRecord
from lib.db import connections, idempotency
from lib.db.connections import ConnSpec, Lending, Pools
from lib.db.errors import database_problem
from lib.db.pool import PoolError
from lib.pipeline import batch
from lib.pipeline.input import Loaders, read_body

log = logging.getLogger('dbapi.errors')

ALLOW_POST = {'Allow': 'POST'}


def find_action(actions: Mapping[str, Action], module: str, route: str, method: str) -> Action:
    """The action `POST /<module>/<route>` names: 404 when there is none, 405 for another method."""
    action = actions.get(route)
    if action is None:
        raise ApiError(404, 'not-found', f'module {module!r} has no action {route[:MAX_NAME_IN_MESSAGE]!r}')
    if method != 'POST':
        raise ApiError(
            405, 'method-not-allowed', f'actions are called with POST, not {method[:16]}', headers=ALLOW_POST
        )
    return action


def result_data(returns: Schema | None, result: Any) -> Any:
    """The result as it is sent: only the declared fields when the action declares `@returns`."""
    return result if returns is None else returns.dump(result)


def answer(returns: Schema | None, result: Any) -> Answer:
    """The answer step: the 200 answer of an action's result, made before the commit (a keyed
    request stores these bytes with the action's writes)."""
    return Answer(200, dumps(result if returns is None else returns.dump(result)))


def to_problem(error: BaseException) -> ApiError:
    """The problem any exception answers: pure, apart from logging what the client is not told."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ValidationError):
        return ApiError(422, 'validation-error', 'the body failed validation', errors=error.messages)
    if isinstance(error, batch.StepFailed):
        return batch.with_step(to_problem(error.error), error.index, error.name)
    if isinstance(error, psycopg2.Error):
        return database_problem(error)
    if isinstance(error, HTTPException):
        headers = {k: v for k, v in error.get_headers() if k.lower() in {'allow', 'www-authenticate', 'retry-after'}}
        slug = (error.name or 'error').lower().replace(' ', '-')
        return ApiError(error.code or 500, slug, error.description or error.name, headers=headers)
    log.error('unhandled %s', type(error).__name__, exc_info=error)
    return internal_error()


def problem_answer(problem: ApiError, request_id: str) -> Answer:
    """The one rendering of a problem: RFC 9457 JSON with its headers, whichever layer answers."""
    return Answer(problem.status, dumps(problem_document(problem, request_id)), PROBLEM_JSON, problem.headers)


class Pipeline:
    """The steps of an action request, with what they need of one app."""

    def __init__(
        self, config: Config, registry: Registry, callers: Callers, verifier: JwtVerifier | None, pools: Pools
    ) -> None:
        self.registry = registry
        self.callers = callers
        self.verifier = verifier
        self.pools = pools
        self.max_content_length = config.max_content_length
        self.batch_max_actions = config.batch_max_actions
        self.idempotency_ttl = config.idempotency_ttl
        self.loaders = Loaders(action.schema for action in registry)

    def serve(
        self,
        record: RequestRecord,
        environ: Mapping[str, Any],
        module: str,
        actions: Mapping[str, Action] | None,
        route: str,
    ) -> Answer:
        """Answer `/<module>/<route>` (`actions`: the module's), or `POST /batch` (`actions` None).
        Every failure becomes a problem answer, and whatever the request borrowed from a pool is
        back there when this returns."""
        record.module = module
        if actions is not None and route in actions:
            record.action = route  # a registered action: named in the record whatever the answer
        lent = Lending(self.pools)
        token = connections.lend(lent)
        claim = None
        try:
            caller = authenticate(environ.get('HTTP_AUTHORIZATION', ''), self.callers, self.verifier)
            record.caller = caller.name
            method = environ.get('REQUEST_METHOD', '')
            if actions is not None:
                action = find_action(actions, module, route, method)
                authorize(caller, action.module, action.name)
                data, body = read_body(environ, self.max_content_length)
                kwargs = self.loaders[action.schema](body)
                name, spec = action.name, action.conn
            else:
                batch.check_method(method)
                data, body = read_body(environ, self.max_content_length)
                steps = batch.check_steps(body, self.registry, caller, self.batch_max_actions, self.loaders)
                record.steps = [step.action.name for step in steps]
                name, spec = BATCH, batch.transaction_of(steps)
            key = record.idempotency_key = idempotency.requested_key(environ)
            claim = idempotency.claim_of(key, caller.name, name, spec, data, self.idempotency_ttl)
            if actions is not None:
                return self.call(record, action, kwargs, spec, claim)
            return self.call_batch(record, steps, spec, claim)
        except Exception as error:  # noqa: BLE001 - every failure becomes a problem answer
            return self.failure(record, error, claim)
        finally:
            connections.end_lending(token, lent)

    def call(
        self,
        record: RequestRecord,
        action: Action,
        kwargs: dict[str, Any],
        spec: ConnSpec | None,
        claim: idempotency.Claim | None,
    ) -> Answer:
        """The transaction, call and answer steps of one action."""
        if spec is None:
            return answer(action.returns, action.function(**kwargs))

        def work(conn: Connection) -> Answer:
            return answer(action.returns, action.function(conn=conn, **kwargs))

        return self.transaction(record, spec, work, claim)

    def call_batch(
        self, record: RequestRecord, steps: list[batch.Step], spec: ConnSpec | None, claim: idempotency.Claim | None
    ) -> Answer:
        """The transaction, call and answer steps of a batch: every step on one connection."""
        if spec is None:
            return batch.run_steps(steps, None)
        return self.transaction(record, spec, lambda conn: batch.run_steps(steps, conn), claim)

    def transaction(
        self, record: RequestRecord, spec: ConnSpec, work: connections.Work, claim: idempotency.Claim | None
    ) -> Answer:
        record.database = spec.database
        pool = self.pools.get(spec.database)
        if claim is None:
            result: Answer = connections.run(pool, spec, work)
            return result
        result, record.replayed = idempotency.run_keyed(pool, spec, work, claim)
        return result

    def failure(self, record: RequestRecord, error: Exception, claim: idempotency.Claim | None) -> Answer:
        """The one place a failure becomes its answer. With a claim whose work failed, a 4xx answer
        is stored for the key (a retry gets it again); a 5xx is not (nothing was committed)."""
        problem = to_problem(error)
        record.problem = problem
        cause = error.error if isinstance(error, batch.StepFailed) else error
        if isinstance(cause, psycopg2.Error) and not isinstance(cause, PoolError):
            record.database_error = cause  # the metrics count it by database and SQLSTATE class
        answered = problem_answer(problem, record.request_id)
        if claim is None or not claim.open or not idempotency.storable(problem) or record.database is None:
            return answered
        try:
            answered, record.replayed = idempotency.store_alone(self.pools.get(record.database), claim, answered)
        except psycopg2.Error as failure:
            return self.failure(record, failure, None)
        return answered
