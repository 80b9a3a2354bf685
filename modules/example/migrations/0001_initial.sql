-- example 0001_initial: the users table (this was the module's schema.sql, hence IF NOT EXISTS).
CREATE TABLE IF NOT EXISTS users (
    email varchar(256) NOT NULL,
    name varchar(256) UNIQUE NOT NULL
);
