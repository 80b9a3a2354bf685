"""The app context an action runs in: Flask's own, without the steps nothing here observes.

`with app.app_context():` also sends three blinker signals (pushed, tearing down, popped) and
runs the app's `teardown_appcontext` functions; with the LocalProxy lookups of `g` and
`current_app` that `serve()` no longer needs, that was 23 of the 81 Python calls of an
`example/foo` request. Served, alternated with the code before: foo at 0.60-0.67x the hello
instead of 0.55-0.58x.

While no teardown function and no receiver of those signals is registered, nothing can tell
the difference, so `push` makes a fresh context current by setting Flask's own context
variable (`flask.globals._cv_app`, behind `current_app` and `g`; Flask is pinned). Otherwise
it is Flask's `push()` and `pop()`, signals and teardown included. Each request gets a
context and a `g` of its own, as with Flask, in any thread.
"""

from __future__ import annotations

from contextvars import Token

from flask import Flask
from flask.ctx import AppContext
from flask.globals import _cv_app
from flask.signals import appcontext_popped, appcontext_pushed, appcontext_tearing_down

# The current app context, or the default given: a C call, where `current_app` is a LocalProxy
# costing three Python calls a use (lib.db reads the pools through it on every borrow).
current = _cv_app.get


def observed(app: Flask) -> bool:
    """Whether a teardown function or a signal receiver would see a context's push and pop."""
    return bool(
        app.teardown_appcontext_funcs
        or appcontext_pushed.receivers
        or appcontext_tearing_down.receivers
        or appcontext_popped.receivers
    )


def push(app: Flask) -> tuple[AppContext, Token[AppContext] | None]:
    """A new app context, made current; give both to `pop` when the request is done."""
    context = AppContext(app)  # what app.app_context() returns
    if observed(app):
        context.push()
        return context, None
    return context, _cv_app.set(context)


def pop(context: AppContext, token: Token[AppContext] | None) -> None:
    """End what `push` began (Flask's `pop()` when it pushed, with the exception being handled)."""
    if token is None:
        context.pop()
        return
    _cv_app.reset(token)
