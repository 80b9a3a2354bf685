"""The benchmark's SQL. `bench.pgbench` runs these same texts in pgbench, so both sides match."""

from lib import Prepared

MAX_ROWS = 10_000

SQL_READ = """
SELECT aid, bid, abalance, filler
FROM pgbench_accounts
WHERE aid = %(aid)s
"""

SQL_UPSERT = """
INSERT INTO pgbench_accounts (aid, bid, abalance, filler)
VALUES (%(aid)s, %(bid)s, %(abalance)s, '')
ON CONFLICT (aid) DO UPDATE SET abalance = EXCLUDED.abalance
RETURNING aid, bid, abalance
"""

SQL_ROWS = """
SELECT aid, bid, abalance, filler
FROM pgbench_accounts
WHERE aid BETWEEN %(first)s AND %(last)s
ORDER BY aid
"""

# The one-row statements run prepared: parsing and planning were a quarter of PostgreSQL's
# time per key lookup. The 10,000-row read is not: its plan is nothing next to its rows.
READ = Prepared(SQL_READ, aid='integer')
UPSERT = Prepared(SQL_UPSERT, aid='integer', bid='integer', abalance='integer')
