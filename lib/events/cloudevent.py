"""One event as the relay publishes it: a CloudEvents 1.0 document in structured mode (the JSON
event format), the AMQP message's whole body.

    {"specversion": "1.0", "id": "<uuid>", "source": "<service>", "type": "user.saved",
     "subject": "<key>", "time": "2026-12-05T09:00:00.123456Z",
     "datacontenttype": "application/json", "data": {...}}

`subject` is left out for an event emitted without a key or with an empty one (CloudEvents
wants a non-empty subject). `data` is the outbox row's JSON text,
spliced in as it was written: the relay never parses it. The CloudEvents SDK reads these
documents in the tests (`cloudevents.core.bindings.rabbitmq.from_structured`); it does not make
them here because it costs about 20x more per event than this (docs/performance.md).
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

SPECVERSION = '1.0'
CONTENT_TYPE = 'application/cloudevents+json'  # the AMQP content_type of structured mode
DATA_CONTENT_TYPE = 'application/json'


def rfc3339(moment: datetime) -> str:
    """`moment` in UTC, as RFC 3339 with microseconds and `Z`."""
    return moment.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')


def document(source: str, event_id: str, type_: str, key: str | None, time: datetime, data: str) -> bytes:
    """The structured-mode body of one event; `data` is JSON text."""
    attributes = {
        'specversion': SPECVERSION,
        'id': event_id,
        'source': source,
        'type': type_,
        'time': rfc3339(time),
        'datacontenttype': DATA_CONTENT_TYPE,
    }
    if key:
        attributes['subject'] = key
    head = orjson.dumps(attributes)
    return b''.join((head[:-1], b',"data":', data.encode(), b'}'))
