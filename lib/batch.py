"""`POST /batch`: several actions in one transaction.

The body is `{"actions": [{"action": "<module>/<route>", "body": {...}}, ...]}`, 1 to
BATCH_MAX_ACTIONS steps. It takes the path of one action request (lib.actions), with the middle
steps done per step: the caller once; then every step's action (404), the caller's scope for it
(403) and its validation (422), all before anything runs: a bad step answers its problem with
`step` (its index) and `action` added, and nothing runs. Then the steps run in order on one
connection in one transaction (lib.transaction), an Idempotency-Key covering the batch as a
whole; the first step that fails rolls back every step and answers its own problem, named the
same way. Success answers `{"results": [...]}`, one result per step, in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from psycopg2.extensions import connection as Connection

from lib import transaction
from lib.actions import ALLOW_POST, MAX_NAME_IN_MESSAGE, Action
from lib.answer import Served, problem_answer, result_data
from lib.auth import authenticate, authorize
from lib.body import read_body
from lib.callers import Caller
from lib.db import give_back_borrowed, rows_as
from lib.decorators import ConnSpec
from lib.errors import ApiError, to_problem
from lib.idempotency import claim_of
from lib.json import dumps
from lib.scope import RequestScope
from lib.validation import arguments

Modules = Mapping[str, Mapping[str, Action]]  # each module's actions by route

PATH = '/batch'
NAME = 'batch'  # the module name it reserves, and its Idempotency-Key's action


STEP_MEMBERS = frozenset({'action', 'body'})


@dataclass(frozen=True, slots=True)
class Step:
    index: int
    action: Action
    kwargs: dict[str, Any]


def with_step(problem: ApiError, index: int, name: str) -> ApiError:
    """`problem` as the answer of the batch: the step's index and action added to it."""
    name = name[:MAX_NAME_IN_MESSAGE]
    return ApiError(
        problem.status,
        problem.slug,
        f'step {index} ({name}): {problem.detail}',
        errors=problem.errors,
        headers=problem.headers,
        members={'step': index, 'action': name},
    )


def find_step_action(modules: Modules, name: str) -> Action:
    module, _, route = name.partition('/')
    action = modules.get(module, {}).get(route)
    if action is None:
        raise ApiError(404, 'not-found', f'there is no action {name[:MAX_NAME_IN_MESSAGE]!r}')
    return action


def check_step(index: int, raw: Mapping[str, Any], modules: Modules, caller: Caller) -> Step:
    """One step, ready to run: its action found, the caller's scope for it, its body validated."""
    name: str = raw['action']
    try:
        action = find_step_action(modules, name)
        authorize(caller, action.module, action.name)
        kwargs = arguments(action.schema, raw['body'])
        if action.conn is not None and action.conn.autocommit:
            raise ApiError(
                422, 'autocommit-in-batch', 'the action runs in autocommit, so it cannot join the batch transaction'
            )
    except Exception as error:
        raise with_step(to_problem(error), index, name) from error
    return Step(index, action, kwargs)


def invalid(errors: dict[str, Any]) -> ApiError:
    return ApiError(422, 'validation-error', 'the batch failed validation', errors=errors)


def step_errors(item: Any) -> dict[str, list[str]]:
    """What is wrong with one entry of `actions`, by member, in marshmallow's words."""
    if not isinstance(item, dict):
        return {'_schema': ['Invalid input type.']}
    errors = {key: ['Unknown field.'] for key in item if key not in STEP_MEMBERS}
    if 'action' not in item:
        errors['action'] = ['Missing data for required field.']
    elif not isinstance(item['action'], str):
        errors['action'] = ['Not a valid string.']
    if not isinstance(item.get('body', {}), dict):
        errors['body'] = ['Not a valid mapping type.']
    return errors


def envelope(body: Mapping[str, Any], most: int) -> list[Mapping[str, Any]]:
    """The batch body's steps, each `{"action": str, "body": object}` (an absent body is `{}`);
    checked by hand, member by member, where a marshmallow schema would walk every step's body
    once more before the step's own schema does."""
    unknown = {key: ['Unknown field.'] for key in body if key != 'actions'}
    if unknown:
        raise invalid(unknown)
    raw_steps = body.get('actions')
    if raw_steps is None:
        raise invalid({'actions': ['Missing data for required field.']})
    if not isinstance(raw_steps, list):
        raise invalid({'actions': ['Not a valid list.']})
    if not raw_steps:
        raise ApiError(422, 'validation-error', 'a batch needs at least one action', errors={'actions': ['Empty.']})
    if len(raw_steps) > most:
        raise ApiError(422, 'validation-error', f'a batch holds at most {most} actions, not {len(raw_steps)}')
    errors = {str(index): found for index, item in enumerate(raw_steps) if (found := step_errors(item))}
    if errors:
        raise invalid({'actions': errors})
    return [{'action': item['action'], 'body': item.get('body', {})} for item in raw_steps]


def check_steps(body: Mapping[str, Any], modules: Modules, caller: Caller, most: int) -> list[Step]:
    """Every step checked, in order; the first bad one is the answer."""
    return [check_step(index, raw, modules, caller) for index, raw in enumerate(envelope(body, most))]


def batch_database(steps: list[Step]) -> str | None:
    """The one database the steps use, or None when no step uses one; 422 for several."""
    databases = sorted({step.action.conn.database for step in steps if step.action.conn is not None})
    if len(databases) > 1:
        raise ApiError(
            422,
            'batch-mixes-databases',
            f'the steps use the databases {", ".join(databases)}: one batch runs on one database',
        )
    return databases[0] if databases else None


def run_steps(steps: list[Step], conn: Connection | None) -> Served:
    """Every step in order on `conn` (None: no step uses a database); the first failure raised
    as the batch's problem."""
    results = []
    for step in steps:
        action = step.action
        try:
            if action.conn is None or conn is None:
                result = action.function(**step.kwargs)
            else:
                # Each step gets rows as it declared; the transaction stays the batch's.
                result = action.function(conn=rows_as(conn, action.conn.named), **step.kwargs)
            results.append(result_data(action.returns, result))
        except Exception as error:
            raise with_step(to_problem(error), step.index, action.name) from error
    return Served(200, dumps({'results': results}))


def serve_batch(
    scope: RequestScope,
    environ: Mapping[str, Any],
    modules: Modules,
    config: Mapping[str, Any],
) -> Served:
    """Answer `POST /batch`; every failure becomes a problem answer, and whatever the request
    borrowed from a pool is back there when this returns."""
    try:
        caller = authenticate(environ.get('HTTP_AUTHORIZATION', ''), config['CALLERS'], config['JWT'])
        scope.caller = caller.name
        method = environ.get('REQUEST_METHOD', '')
        if method != 'POST':
            raise ApiError(
                405, 'method-not-allowed', f'/batch is called with POST, not {method[:16]}', headers=ALLOW_POST
            )
        data, body = read_body(environ, config['MAX_CONTENT_LENGTH'])
        steps = check_steps(body, modules, caller, config['BATCH_MAX_ACTIONS'])
        scope.steps = [step.action.name for step in steps]
        database = batch_database(steps)
        spec = None if database is None else ConnSpec(database, named=True, autocommit=False)
        claim = claim_of(scope, environ, caller.name, NAME, spec, data, config['IDEMPOTENCY_TTL'])
        if spec is None:
            return run_steps(steps, None)
        return transaction.run(spec, lambda conn: run_steps(steps, conn), claim, scope)
    except Exception as error:  # noqa: BLE001 - every failure becomes a problem answer
        return problem_answer(to_problem(error), scope)
    finally:
        give_back_borrowed(scope)
