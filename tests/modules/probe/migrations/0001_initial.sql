CREATE TABLE IF NOT EXISTS probe_items (
    id serial PRIMARY KEY,
    code varchar(32) UNIQUE NOT NULL,
    qty integer NOT NULL CHECK (qty >= 0),
    parent integer REFERENCES probe_items (id)
);
CREATE TABLE IF NOT EXISTS probe_log (id serial PRIMARY KEY, note text NOT NULL);
CREATE OR REPLACE FUNCTION probe_double(n integer) RETURNS integer LANGUAGE sql AS 'SELECT n * 2';
CREATE OR REPLACE FUNCTION probe_series(n integer) RETURNS TABLE (i integer, sq integer)
    LANGUAGE sql AS 'SELECT g, g * g FROM generate_series(1, n) AS g';
