"""The validation step: a body loaded by the action's schema, or refused with 422 naming the fields."""

from __future__ import annotations

from typing import Any

import pytest
from marshmallow import ValidationError

from lib.pipeline.input import arguments
from lib.pipeline.path import to_problem
from modules.example.schemas import FooSchema
from tests.conftest import AUTH


@pytest.mark.parametrize(
    ('body', 'expected'),
    [
        ({'name': 'ada'}, {'name': 'ada'}),
        ({'name': 'ada', 'email': 'ada@example.com'}, {'name': 'ada', 'email': 'ada@example.com'}),
    ],
)
def test_a_valid_body_becomes_the_keyword_arguments(body: dict[str, Any], expected: dict[str, Any]) -> None:
    assert arguments(FooSchema(), body) == expected


@pytest.mark.parametrize(
    ('body', 'fields'),
    [
        ({}, {'name'}),
        ({'name': 1}, {'name'}),
        ({'name': 'ada', 'email': 'not an address'}, {'email'}),
        ({'name': 'ada', 'extra': 1}, {'extra'}),
        ({'name': None}, {'name'}),
    ],
)
def test_an_invalid_body_names_every_bad_field(body: dict[str, Any], fields: set[str]) -> None:
    with pytest.raises(ValidationError) as raised:
        arguments(FooSchema(), body)
    assert set(raised.value.messages) == fields


def test_an_action_without_a_schema_takes_no_fields() -> None:
    assert arguments(None, {}) == {}
    with pytest.raises(ValidationError) as raised:
        arguments(None, {'surprise': 1})
    problem = to_problem(raised.value)  # what the client gets of it
    assert problem.status == 422 and problem.errors == {'surprise': ['Unknown field.']}


@pytest.mark.parametrize(
    ('body', 'field'),
    [
        (b'{"name": 1}', 'name'),
        (b'{"email": "ada@example.com"}', 'name'),
        (b'{"name": "ada", "email": "nope"}', 'email'),
    ],
)
def test_a_client_gets_a_422_naming_the_field(client, body: bytes, field: str) -> None:
    response = client.post('/example/foo', data=body, headers={**AUTH, 'Content-Type': 'application/json'})
    assert response.status_code == 422
    assert response.content_type == 'application/problem+json'
    assert field in response.get_json()['errors']
