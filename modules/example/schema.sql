-- The table the example module needs; applied by `flask --app app apply-sql`.
CREATE TABLE IF NOT EXISTS users (
    email varchar(256) NOT NULL,
    name varchar(256) UNIQUE NOT NULL
);
