"""The transaction step: the connection an action, or a whole batch, runs on, and its one
transaction, which this step alone commits.

`run` borrows the connection, runs the work on it (the action, or every step of a batch, and
the answer made of the result), and commits; a failure rolls everything back. With an
Idempotency-Key the step also replays a stored answer instead of running the work, and stores
the work's answer in the same transaction as its writes (lib.idempotency). However it ends, the
connection goes back to its pool clean.
"""

from __future__ import annotations

from collections.abc import Callable

from psycopg2.extensions import connection as Connection

from lib import idempotency
from lib.answer import Served, problem_answer
from lib.db import BorrowedConnection, release
from lib.decorators import ConnSpec
from lib.errors import to_problem
from lib.idempotency import Claim
from lib.scope import RequestScope

Work = Callable[[Connection], Served]


def run(spec: ConnSpec, work: Work, claim: Claim | None, scope: RequestScope) -> Served:
    """`work` on a connection to `spec.database`: its answer once committed (without autocommit),
    or the key's stored answer. Raises what the work raised, after the rollback."""
    if claim is not None:
        # lib sends BEGIN and COMMIT itself, each with a statement of its own (lib.idempotency),
        # so psycopg2 runs in autocommit; the transaction stays the request's (`held`).
        with BorrowedConnection(spec.database, spec.named, autocommit=True, held=True) as conn:
            served = run_claimed(conn, work, claim, scope)
        idempotency.SWEEPER.due(scope.pools.get(spec.database), claim.ttl)
        return served
    # Without autocommit lib holds the transaction: an action's `transactional()` nests in it.
    with BorrowedConnection(spec.database, spec.named, spec.autocommit, held=not spec.autocommit) as conn:
        served = work(conn)
        if not conn.autocommit:
            release(conn).commit()
        return served


def run_claimed(conn: Connection, work: Work, claim: Claim, scope: RequestScope) -> Served:
    """`work` under `claim`: the stored answer if there is one; else the work's answer, stored
    and committed with its writes. A failure's 4xx answer is stored alone after the rollback; a
    5xx is not (nothing was committed: a retry runs the work again)."""
    begun = idempotency.begin(conn, claim)
    if begun.replay is not None:
        scope.replayed = True
        return begun.replay
    try:
        served = work(conn)
        stored = idempotency.commit_with_answer(conn, claim, served, begun)
    except Exception as error:  # a 4xx is stored, anything else re-raised
        idempotency.rollback_quietly(conn)
        problem = to_problem(error)
        if not idempotency.storable(problem):
            if problem is error:
                raise
            raise problem from error
        return stored_or_replayed(conn, claim, problem_answer(problem, scope), scope)
    if stored:
        return served
    # Another request with the key committed after `begin` read: its answer is the key's.
    scope.replayed = True
    return idempotency.stored_answer(conn, claim)


def stored_or_replayed(conn: Connection, claim: Claim, served: Served, scope: RequestScope) -> Served:
    answered = idempotency.store_alone(conn, claim, served)
    scope.replayed = answered is not served
    return answered
