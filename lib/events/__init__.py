"""Events: what an action commits, every other service hears (a transactional outbox relayed to
RabbitMQ; docs/events.md).

- `outbox`: the declared events, `emit`, and their rows written with the action's commit.
- `cloudevent`: the CloudEvents 1.0 JSON document of one event, as the relay publishes it.
- `broker`: the AMQP side of the relay (pika), publisher confirms.
- `relay`: the process that delivers committed events to the exchange `dbapi.events`.
- `asyncapi`: the AsyncAPI 3.0 document of the declared events.
- `metrics`: the outbox's gauges (served by the API) and the relay's counters.

Only `outbox` is imported by the request path; it needs neither Flask nor pika.
"""
