"""`POST /batch`: the steps of one action request, over a list, in one transaction.

The body is `{"actions": [{"action": "<module>/<route>", "body": {...}}, ...]}`, 1 to
BATCH_MAX_ACTIONS steps. The caller is found once (lib.pipeline.path); then every step's action
(404), the caller's scope for it (403) and its validation (422) are checked, all before anything
runs: a bad step answers its problem with `step` (its index) and `action` added, and nothing runs.
Then the steps run in order on one connection in one transaction, an Idempotency-Key covering the
batch as a whole; the first step that fails rolls back every step and answers its own problem,
named the same way. Success answers `{"results": [...]}`, one result per step, in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import Schema, ValidationError, fields
from psycopg2.extensions import connection as Connection

from lib.auth.callers import Caller, authorize
from lib.contract.registry import Action, Registry
from lib.core.errors import MAX_NAME_IN_MESSAGE, ApiError
from lib.core.json import dumps
from lib.core.record import Answer
from lib.db.connections import ConnSpec, rows_as
from lib.pipeline.input import Loaders

ALLOW_POST = {'Allow': 'POST'}
STEP_MEMBERS = frozenset({'action', 'body'})


class _Envelope(Schema):
    """Only to take marshmallow's own words for what is wrong with a batch's envelope: the
    envelope is checked by hand (a schema would walk every step's body once more)."""

    action = fields.String(required=True)
    body = fields.Dict()
    actions = fields.List(fields.Raw())


def _refused(data: Any) -> dict[str, Any]:
    try:
        _Envelope().load(data)
    except ValidationError as error:
        found: dict[str, Any] = error.normalized_messages()  # type: ignore[no-untyped-call]  # untyped in marshmallow
        return found
    raise AssertionError(f'marshmallow accepted {data!r}')


_WRONG = _refused({'action': 1, 'body': 1, 'actions': 1, 'unknown': 1})
MESSAGES = {
    'required': _refused({})['action'][0],
    'string': _WRONG['action'][0],
    'mapping': _WRONG['body'][0],
    'list': _WRONG['actions'][0],
    'unknown': _WRONG['unknown'][0],
    'type': _refused(1)['_schema'][0],
}


@dataclass(frozen=True, slots=True)
class Step:
    index: int
    action: Action
    kwargs: dict[str, Any]


class StepFailed(Exception):
    """Step `index` (`name`) failed with `error`: lib.pipeline.path answers `error`'s problem named
    with the step."""

    def __init__(self, index: int, name: str, error: Exception) -> None:
        super().__init__(f'step {index} ({name}): {error}')
        self.index = index
        self.name = name
        self.error = error


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
        detail_logged=problem.detail_logged,
    )


def check_method(method: str) -> None:
    if method != 'POST':
        raise ApiError(405, 'method-not-allowed', f'/batch is called with POST, not {method[:16]}', headers=ALLOW_POST)


def check_step(index: int, raw: Mapping[str, Any], registry: Registry, caller: Caller, loaders: Loaders) -> Step:
    """One step, ready to run: its action found (404), the caller's scope for it (403), its body
    validated by its schema's loader (422); an action in autocommit cannot join the batch's
    transaction (422)."""
    name: str = raw['action']
    try:
        action = registry.find(name)
        if action is None:
            raise ApiError(404, 'not-found', f'there is no action {name[:MAX_NAME_IN_MESSAGE]!r}')
        authorize(caller, action.module, action.name)
        kwargs = loaders[action.schema](raw['body'])
        if action.conn is not None and action.conn.autocommit:
            raise ApiError(
                422, 'autocommit-in-batch', 'the action runs in autocommit, so it cannot join the batch transaction'
            )
    except Exception as error:
        raise StepFailed(index, name, error) from error
    return Step(index, action, kwargs)


def invalid(errors: dict[str, Any]) -> ApiError:
    return ApiError(422, 'validation-error', 'the batch failed validation', errors=errors)


def step_errors(item: Any) -> dict[str, list[str]]:
    """What is wrong with one entry of `actions`, by member, in marshmallow's words."""
    if not isinstance(item, dict):
        return {'_schema': [MESSAGES['type']]}
    errors = {key: [MESSAGES['unknown']] for key in item if key not in STEP_MEMBERS}
    if 'action' not in item:
        errors['action'] = [MESSAGES['required']]
    elif not isinstance(item['action'], str):
        errors['action'] = [MESSAGES['string']]
    if not isinstance(item.get('body', {}), dict):
        errors['body'] = [MESSAGES['mapping']]
    return errors


def envelope(body: Mapping[str, Any], most: int) -> list[Mapping[str, Any]]:
    """The batch body's steps, each `{"action": str, "body": object}` (an absent body is `{}`)."""
    unknown = {key: [MESSAGES['unknown']] for key in body if key != 'actions'}
    if unknown:
        raise invalid(unknown)
    raw_steps = body.get('actions')
    if raw_steps is None:
        raise invalid({'actions': [MESSAGES['required']]})
    if not isinstance(raw_steps, list):
        raise invalid({'actions': [MESSAGES['list']]})
    if not raw_steps:
        raise ApiError(422, 'validation-error', 'a batch needs at least one action', errors={'actions': ['Empty.']})
    if len(raw_steps) > most:
        raise ApiError(422, 'validation-error', f'a batch holds at most {most} actions, not {len(raw_steps)}')
    errors = {str(index): found for index, item in enumerate(raw_steps) if (found := step_errors(item))}
    if errors:
        raise invalid({'actions': errors})
    return [{'action': item['action'], 'body': item.get('body', {})} for item in raw_steps]


def check_steps(body: Mapping[str, Any], registry: Registry, caller: Caller, most: int, loaders: Loaders) -> list[Step]:
    """Every step checked, in order; the first bad one is the answer."""
    return [check_step(index, raw, registry, caller, loaders) for index, raw in enumerate(envelope(body, most))]


def transaction_of(steps: list[Step]) -> ConnSpec | None:
    """The one transaction the steps run in, or None when no step uses a database; 422 for steps
    on several databases."""
    databases = sorted({step.action.conn.database for step in steps if step.action.conn is not None})
    if len(databases) > 1:
        raise ApiError(
            422,
            'batch-mixes-databases',
            f'the steps use the databases {", ".join(databases)}: one batch runs on one database',
        )
    return None if not databases else ConnSpec(databases[0], named=True, autocommit=False)


def run_steps(steps: list[Step], conn: Connection | None) -> Answer:
    """The call step over the list: every step in order on `conn` (None: no step uses a
    database), and the batch's answer; the first failure raised as StepFailed."""
    results = []
    for step in steps:
        action = step.action
        try:
            if action.conn is None or conn is None:
                result = action.function(**step.kwargs)
            else:
                # Each step gets rows as it declared; the transaction stays the batch's.
                result = action.function(conn=rows_as(conn, action.conn.named), **step.kwargs)
            results.append(result if action.returns is None else action.returns.dump(result))
        except Exception as error:
            raise StepFailed(step.index, action.name, error) from error
    return Answer(200, dumps({'results': results}))
