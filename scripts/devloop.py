"""The dev loop of `scripts/serve.sh` in local mode: a change to the code is served without a restart.

    python -m scripts.devloop watch MASTER_PID   # serve.sh runs this beside gunicorn's master
    python -m scripts.devloop check              # what `watch` runs for each change, in a new process

`watch` polls the files under modules/ and lib/ (and settings.py, app.py) twice a second. Once
they have changed and then stayed the same for a moment, it runs `check` in a new Python
process, on the files as they are now: the app is built (every module imported, every setting
checked), then `flask --app app migrate` applies dbapi's and every module's pending
migrations. Only when both pass does it send SIGHUP to the master, which starts new workers on
the new code and retires the old ones once they have answered what they hold (gunicorn.conf.py's
`on_reload` imports the project's code in the master, once, and every new worker inherits it:
a file saved broken while the workers boot cannot stop the server). When either fails it prints
one line naming the file and the error, and the workers already running keep serving the code
they loaded.

Why not gunicorn's own --reload: a worker watches only the files it has imported (a new module
is not one, and the master's copy of settings.py never changes), a syntax error is served as a
500 page, and any other import error stops the whole server ("Worker failed to boot",
benoitc/gunicorn#2595).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WATCHED_DIRS = ('modules', 'lib')
WATCHED_FILES = ('settings.py', 'app.py')
WATCHED_SUFFIXES = ('.py', '.sql')
POLL_SECONDS = 0.5
SETTLE_SECONDS = 0.3  # a change is checked once the files stop changing for this long
CHECK_TIMEOUT_SECONDS = 120
SQL_COMMAND = 'migrate'  # `flask --app app migrate`: the one way SQL is applied
APPLIED = re.compile(r'^\S+: applied \S+ \S+ in \d+ ms$')  # migrate's line for each file it applied

Snapshot = dict[str, tuple[int, int]]


def snapshot(root: Path = ROOT) -> Snapshot:
    """Each watched file's (mtime_ns, size), by its path relative to `root`."""
    found: Snapshot = {}
    paths = [root / name for name in WATCHED_FILES]
    for folder in WATCHED_DIRS:
        for directory, subdirectories, files in os.walk(root / folder):
            subdirectories[:] = [d for d in subdirectories if d != '__pycache__' and not d.startswith('.')]
            paths.extend(Path(directory) / name for name in files if name.endswith(WATCHED_SUFFIXES))
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue  # removed meanwhile
        found[str(path.relative_to(root))] = (stat.st_mtime_ns, stat.st_size)
    return found


def changed_files(before: Snapshot, after: Snapshot) -> list[str]:
    return sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))


# --- check: run in a new process, on the files as they are now ---------------------------------


def shown(filename: str) -> str:
    path = Path(filename)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else filename


def culprit(error: BaseException) -> str:
    """Where the error comes from: the innermost frame in a module, else in the project, else the last."""
    if isinstance(error, SyntaxError) and error.filename:
        return f'{shown(error.filename)}, line {error.lineno}'
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if Path(f.filename).is_relative_to(ROOT) and '.venv' not in Path(f.filename).parts]
    in_modules = [f for f in ours if Path(f.filename).is_relative_to(ROOT / 'modules')]
    frame = (in_modules or ours or frames or [None])[-1]
    return 'the app' if frame is None else f'{shown(frame.filename)}, line {frame.lineno}'


def describe(error: BaseException) -> str:
    text = error.msg if isinstance(error, SyntaxError) else str(error)
    first = (text.strip().splitlines() or [''])[0]
    return f'{type(error).__name__}: {first}' if first else type(error).__name__


def check() -> dict[str, object]:
    """Build the app and apply the SQL; what happened, as data for `watch`."""
    sys.path.insert(0, str(ROOT))
    try:
        from app import create_app
        from lib.core.config import ConfigError

        try:
            application = create_app()
        except ConfigError as error:
            return {'ok': False, 'error': f'configuration error: {error}'}
    except Exception as error:  # noqa: BLE001 - any import error of any module: one line naming it
        return {'ok': False, 'error': f'{culprit(error)}: {describe(error)}'}
    result = application.test_cli_runner().invoke(args=[SQL_COMMAND])
    lines = result.output.splitlines()
    if result.exit_code != 0:
        said = [line.removeprefix('Error: ') for line in lines if line.startswith('Error: ')]
        if said:
            return {'ok': False, 'error': said[-1]}
        error = result.exception or RuntimeError(f'exit status {result.exit_code}')
        return {'ok': False, 'error': f'flask --app app {SQL_COMMAND}: {describe(error)}'}
    return {'ok': True, 'applied': [line for line in lines if APPLIED.match(line)]}


# --- watch: the long-lived loop beside gunicorn's master ---------------------------------------


def say(line: str, error: bool = False) -> None:
    print(f'serve.sh: {line}', file=sys.stderr if error else sys.stdout, flush=True)


def run_check() -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, '-m', 'scripts.devloop', 'check'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_SECONDS,
        check=False,
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith('{'):
            result: dict[str, object] = json.loads(line)
            return result
    last = (done.stderr.strip().splitlines() or [f'exit status {done.returncode}'])[-1]
    return {'ok': False, 'error': f'checking the code failed: {last}'}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def settled(previous: Snapshot) -> Snapshot:
    """The files once they have stopped changing for SETTLE_SECONDS (an editor, the scaffold)."""
    while True:
        time.sleep(SETTLE_SECONDS)
        now = snapshot()
        if now == previous:
            return now
        previous = now


def watch(master: int) -> int:
    # serve.sh stops this with SIGTERM; Ctrl-C reaches the whole process group, and serve.sh
    # handles it (this loop must not die in the middle of a reload with a traceback).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    served = snapshot()  # what the running workers loaded
    seen = served  # the last state checked, passed or not
    while alive(master):
        time.sleep(POLL_SECONDS)
        now = snapshot()
        if now == seen:
            continue
        now = settled(now)
        changed = changed_files(served, now)
        seen = now
        if not changed:
            continue  # back to what is served
        result = run_check()
        if not result['ok']:
            say(f'not reloaded: {result["error"]} (still serving the code from before)', error=True)
            continue
        served = now
        for line in map(str, result.get('applied') or ()):
            say(line)  # `default: applied orders 0002_add_note in 4 ms`: each file is applied once
        try:
            os.kill(master, signal.SIGHUP)
        except ProcessLookupError:
            return 0
        files = changed[0] if len(changed) == 1 else f'{changed[0]} and {len(changed) - 1} more'
        say(f'reloading the workers: {files} changed')
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)
    commands.add_parser('watch', help="reload gunicorn's workers when the code changes").add_argument(
        'master', type=int, help="gunicorn master's pid"
    )
    commands.add_parser('check', help='build the app and apply the SQL; one JSON line says how it went')
    args = parser.parse_args(argv)
    if args.command == 'watch':
        return watch(args.master)
    result = check()
    print(json.dumps(result), flush=True)
    return 0 if result['ok'] else 1


if __name__ == '__main__':
    raise SystemExit(main())
