-- dbapi's own table: events emitted by actions, written in their transactions, until the relay
-- has delivered them to RabbitMQ and EVENTS_RETENTION has passed (lib/events/). dbapi 0002_outbox.
CREATE TABLE IF NOT EXISTS dbapi_outbox (
    -- Taken at the flush, after the key's lock: for one key, seq order is commit order. No
    -- primary key: every index costs each insert, and the relays find rows by the one below.
    seq          bigint      GENERATED ALWAYS AS IDENTITY,
    id           uuid        NOT NULL,  -- the event's id (CloudEvents id, AMQP message_id)
    type         text        NOT NULL,  -- the declared type, the routing key
    key          text,                  -- CloudEvents subject; one key's events keep their order
    key_lock     integer,               -- 32-bit hash of key: the writers' and relays' advisory locks
    data         json        NOT NULL,  -- as the action emitted it, text kept as written
    time         timestamptz NOT NULL,  -- the commit's time (the statement just before COMMIT)
    delivered_at timestamptz            -- when the broker confirmed it; NULL: still to send
);
-- What the relays claim and mark: the undelivered rows in seq order (a few pages while they keep up).
CREATE INDEX IF NOT EXISTS dbapi_outbox_pending ON dbapi_outbox (seq) WHERE delivered_at IS NULL;
-- The prune finds delivered rows older than the retention: rows arrive in time order, so a BRIN
-- index (a few pages, next to nothing per insert) narrows the scan to the oldest blocks.
CREATE INDEX IF NOT EXISTS dbapi_outbox_time ON dbapi_outbox USING brin (time);
