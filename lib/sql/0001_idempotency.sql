-- dbapi's own table: the stored answers of requests sent with an Idempotency-Key (lib/idempotency.py).
-- dbapi's first migration (`flask --app app migrate`), applied before any module's. It was
-- lib/idempotency.sql, hence IF NOT EXISTS: a database it built adopts it with `migrate --baseline`.
CREATE TABLE IF NOT EXISTS dbapi_idempotency (
    caller       text        NOT NULL,  -- the caller's name: keys belong to the caller that sent them
    key          text        NOT NULL,
    action       text        NOT NULL,  -- module/route, or batch
    body_sha256  bytea       NOT NULL,  -- of the request body's bytes
    status       smallint    NOT NULL,
    content_type text        NOT NULL,
    answer       bytea       NOT NULL,  -- the body answered, uncompressed
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, key)
);
-- The expiry sweep finds the old rows: rows arrive in created_at order, so a BRIN index (a few
-- pages, next to nothing per insert) narrows the scan to the oldest blocks.
CREATE INDEX IF NOT EXISTS dbapi_idempotency_created_at ON dbapi_idempotency USING brin (created_at);
