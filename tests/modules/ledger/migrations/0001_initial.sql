CREATE TABLE IF NOT EXISTS ledger_entries (
    id serial PRIMARY KEY,
    note text NOT NULL,
    code text UNIQUE
);
