"""What `scripts/flask` runs: Flask's own command line, whose `--version` names dbapi's version
(pyproject.toml, as `dbapi_build_info` and the OpenAPI document do) before Python's, Flask's and
Werkzeug's.

    scripts/flask --app app --version
    scripts/flask --app app actions
"""

from __future__ import annotations

import platform
from importlib.metadata import version

import click
from flask.cli import FlaskGroup
from flask.cli import cli as flask_cli


def show_version(ctx: click.Context, _: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from lib.core.config import project_version

    click.echo(
        f'dbapi {project_version()}\nPython {platform.python_version()}\n'
        f'Flask {version("flask")}\nWerkzeug {version("werkzeug")}'
    )
    ctx.exit()


VERSION_OPTION = click.Option(
    ['--version'],
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=show_version,
    help="Show dbapi's version, then Python's, Flask's and Werkzeug's.",
)
cli = FlaskGroup(name='flask', help=flask_cli.help, add_version_option=False, params=[VERSION_OPTION])

if __name__ == '__main__':
    cli.main(prog_name='scripts/flask')
