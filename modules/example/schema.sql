-- The table the example module needs; applied by `python -m lib.apply_sql`.
CREATE TABLE IF NOT EXISTS users (
    email varchar(256) NOT NULL,
    name varchar(256) UNIQUE NOT NULL
);
