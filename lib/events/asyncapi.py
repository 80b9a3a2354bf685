"""The events' contract: an AsyncAPI 3.0 document built from the modules' declarations (what
`GET /asyncapi.json` serves, like `GET /openapi.json` for the actions).

One channel, `dbapi.events` (the durable topic exchange, routing key = the event's type), one
`send` operation (the relay publishes), one message per declared type: its payload is the
CloudEvents 1.0 document the relay writes (lib/events/cloudevent.py), its `data` the declared
marshmallow schema as JSON Schema (apispec's MarshmallowPlugin, as the OpenAPI document does).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema

from lib.events import cloudevent
from lib.events.outbox import EXCHANGE, EventType

ASYNCAPI_VERSION = '3.0.0'
AMQP_BINDING = '0.3.0'
CHANNEL = 'events'
DESCRIPTION = (
    'Every event the actions of this service commit, published by its relay to the durable topic'
    " exchange `dbapi.events` of RabbitMQ once the action's transaction has committed: the routing"
    " key is the event's type, the body a CloudEvents 1.0 document in structured mode (`subject`"
    " is the event's key), the AMQP `message_id` the event's id. Delivery is at least once: drop a"
    ' duplicate by its id. Events with the same key arrive in commit order. Bind a queue of your own'
    ' to the exchange with the routing keys (or patterns: `user.*`, `#`) you need.'
)


def schema_name(schema: type[Schema] | Schema) -> str:
    """`<package>.<Name>` (`example.UserSaved`), as the OpenAPI document names components."""
    cls = schema if isinstance(schema, type) else type(schema)
    package = cls.__module__.removesuffix('.schemas').rpartition('.')[2]
    return f'{package}.{cls.__name__.removesuffix("Schema") or cls.__name__}'


def envelope(event: EventType, source: str, data: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of the message body: a CloudEvents document carrying `data`."""
    return {
        'type': 'object',
        'required': ['specversion', 'id', 'source', 'type', 'time', 'datacontenttype', 'data'],
        'properties': {
            'specversion': {'type': 'string', 'const': cloudevent.SPECVERSION},
            'id': {'type': 'string', 'format': 'uuid', 'description': 'The event id: a duplicate has the same'},
            'source': {'type': 'string', 'const': source},
            'type': {'type': 'string', 'const': event.type},
            'subject': {'type': 'string', 'description': 'The key: events with one key arrive in commit order'},
            'time': {'type': 'string', 'format': 'date-time', 'description': "The commit's time"},
            'datacontenttype': {'type': 'string', 'const': cloudevent.DATA_CONTENT_TYPE},
            'data': data,
        },
    }


def message(event: EventType, source: str, data: dict[str, Any]) -> dict[str, Any]:
    described = {'description': event.description} if event.description else {}
    return {
        'name': event.type,
        'title': event.type,
        'summary': f'Emitted by the module {event.module}',
        **described,
        'contentType': cloudevent.CONTENT_TYPE,
        'payload': envelope(event, source, data),
        'bindings': {'amqp': {'messageType': event.type, 'bindingVersion': AMQP_BINDING}},
    }


def document(events: Iterable[EventType], version: str, source: str) -> dict[str, Any]:
    """The AsyncAPI document of `events`, as a dict."""
    plugin = MarshmallowPlugin(schema_name_resolver=schema_name)
    spec = APISpec(title=source, version=version, openapi_version='3.1.0', plugins=[plugin])
    converter = plugin.converter
    if converter is None:  # APISpec(plugins=...) sets it
        raise RuntimeError('apispec did not initialise the MarshmallowPlugin')
    messages = {}
    for event in events:
        data = converter.resolve_nested_schema(event.schema)  # type: ignore[no-untyped-call]  # a $ref into components
        messages[event.type] = message(event, source, data)
    schemas = spec.to_dict().get('components', {}).get('schemas', {})
    return {
        'asyncapi': ASYNCAPI_VERSION,
        'info': {'title': f'{source} events', 'version': version, 'description': DESCRIPTION},
        'defaultContentType': cloudevent.CONTENT_TYPE,
        'channels': {
            CHANNEL: {
                'address': EXCHANGE,
                'description': 'The topic exchange; the routing key of each message is its type.',
                'messages': {name: {'$ref': f'#/components/messages/{name}'} for name in messages},
                'bindings': {
                    'amqp': {
                        'is': 'routingKey',
                        'exchange': {'name': EXCHANGE, 'type': 'topic', 'durable': True, 'autoDelete': False},
                        'bindingVersion': AMQP_BINDING,
                    }
                },
            }
        },
        'operations': {
            'publishEvents': {
                'action': 'send',
                'channel': {'$ref': f'#/channels/{CHANNEL}'},
                'summary': 'The relay publishes each committed event, persistent, with publisher confirms.',
                'messages': [{'$ref': f'#/channels/{CHANNEL}/messages/{name}'} for name in messages],
                'bindings': {'amqp': {'deliveryMode': 2, 'mandatory': False, 'bindingVersion': AMQP_BINDING}},
            }
        },
        'components': {'messages': messages, 'schemas': schemas},
    }
