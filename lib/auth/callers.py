"""The caller and scope steps: who calls (401, or 503 when the identity provider's keys cannot
be had), and whether that caller may call the action (403); and the callers themselves: their
tokens' SHA-256 digests and their scopes.

A Bearer token is a JWT when JWT_* is configured and the token has a JWT's shape (three parts,
a JSON header: lib.auth.jwt); any other token is opaque, found by its SHA-256 digest among the
callers of BEARER and CALLERS_FILE. The token never leaves these steps: the request keeps the
caller's name only. The challenges follow RFC 6750 §3.1: no error code when no Bearer token came,
`invalid_token` for one that is not valid, and `insufficient_scope` (403) with the scope the
action needs.

Two sources, both optional, merged into one immutable `CallerSet`:

- `BEARER`: its tokens form the caller `default`, with scope `*` (every action).
- `CALLERS_FILE`, a TOML file that holds only digests, never a token::

      [callers.billing]
      tokens_sha256 = ["<sha256 hex of a token>", "<another, during a rotation>"]
      scopes = ["orders", "example/foo"]   # a module, or module/action; "*" is everything

`Callers` is what a worker holds: it looks at the file at most once a second, on the request
path (one `os.stat`), and swaps in a new `CallerSet` when the file's content changed and parses.
A file that no longer parses, or is gone, leaves the last good set in force and is reported
once. Nothing here ever logs a token, a digest or a line of the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lib.auth.jwt_verifier import InvalidToken, JwtVerifier, KeysUnavailable, jwt_header
from lib.core.config import Config, ConfigError
from lib.core.errors import ApiError

log = logging.getLogger('dbapi.callers')

ALL = '*'
BEARER_CALLER = 'default'
CALLER_NAME = re.compile(r'[A-Za-z0-9_-]{1,64}')  # a TOML bare key, and short enough for a log field
SCOPE = re.compile(r'[^\s*/][^\s*]{0,199}')  # module or module/action (routes may hold '/', '.', '-')
SHA256_HEX = re.compile(r'[0-9a-fA-F]{64}')
CALLER_KEYS = frozenset({'tokens_sha256', 'scopes'})
RECHECK_SECONDS = 1.0
# A file modified this recently may still change within the same mtime tick without its
# stat changing: it is read again at each check until it is older than this.
RACY_NS = 2_000_000_000


class CallersError(ValueError):
    """The callers cannot be built; the one-line message names the entry, never a token or digest."""


def token_digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    scopes: frozenset[str]

    def may_call(self, module: str, action: str) -> bool:
        """Whether a scope covers `action` (`module/route`): `*`, its module, or the action itself."""
        scopes = self.scopes
        return ALL in scopes or module in scopes or action in scopes


@dataclass(frozen=True, slots=True)
class CallerSet:
    """Every known token's digest -> its caller. Built once, never changed: a reload makes a new one.

    `find` hashes the presented token and looks the digest up in a dict: O(1) whatever the
    number of callers. This is a constant-time comparison in the sense that matters: the only
    thing compared is SHA-256(presented token), so how long the lookup takes (the dict's bucket,
    how many leading bytes of two digests agree) depends on the digest of the attacker's own
    guess, never on a secret's bytes. Learning that a guess's digest shares a prefix with a
    stored digest brings no token closer: finding a token for a given digest is a preimage
    attack on SHA-256. `hmac.compare_digest` over every stored digest would cost O(n) and protect
    nothing more.
    """

    by_digest: Mapping[bytes, Caller]

    def find(self, token: bytes) -> Caller | None:
        return self.by_digest.get(token_digest(token))

    def __repr__(self) -> str:  # never the digests
        return f'<CallerSet of {self.callers()} callers>'

    def __len__(self) -> int:
        return len(self.by_digest)

    def callers(self) -> int:
        return len({caller.name for caller in self.by_digest.values()})


def check_caller_name(name: str) -> str:
    if not CALLER_NAME.fullmatch(name):
        raise CallersError(f'caller name {name[:80]!r} is invalid: use 1 to 64 letters, digits, _ and -')
    return name


def bearer_callers(tokens: Iterable[bytes]) -> dict[bytes, Caller]:
    """BEARER's tokens as the caller `default` with every scope; a token listed twice is refused."""
    default = Caller(BEARER_CALLER, frozenset({ALL}))
    found: dict[bytes, Caller] = {}
    for position, token in enumerate(tokens, 1):
        digest = token_digest(token)
        if digest in found:
            raise CallersError(f'BEARER lists its token number {position} twice')
        found[digest] = default
    return found


def file_callers(text: str, source: str) -> dict[bytes, Caller]:
    """The callers of a CALLERS_FILE's text; `source` names the file in the errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise CallersError(f'{source} is not valid TOML: {error}') from None
    unknown = sorted(set(data) - {'callers'})
    if unknown:
        raise CallersError(f'{source}: unknown top-level key {unknown[0][:80]!r} (only [callers.<name>] tables)')
    tables = data.get('callers', {})
    if not isinstance(tables, dict):
        raise CallersError(f'{source}: callers must be tables, [callers.<name>]')
    found: dict[bytes, Caller] = {}
    where: dict[bytes, str] = {}
    for name, entry in tables.items():
        caller = parse_caller(name, entry, source)
        for position, digest in enumerate(digests(name, entry, source)):
            here = f'callers.{name}.tokens_sha256[{position}]'
            if digest in where:
                raise CallersError(f'{source}: {here} is the same token as {where[digest]}')
            where[digest] = here
            found[digest] = caller
    return found


def parse_caller(name: str, entry: Any, source: str) -> Caller:
    try:
        check_caller_name(name)
    except CallersError as error:
        raise CallersError(f'{source}: {error}') from None
    if not isinstance(entry, dict):
        raise CallersError(f'{source}: callers.{name} must be a table with tokens_sha256 and scopes')
    unknown = sorted(set(entry) - CALLER_KEYS)
    if unknown:
        raise CallersError(f'{source}: callers.{name} has unknown key {unknown[0][:80]!r} (tokens_sha256, scopes)')
    scopes = entry.get('scopes', [])
    if not isinstance(scopes, list):
        raise CallersError(f'{source}: callers.{name}.scopes must be a list of strings')
    for position, scope in enumerate(scopes):
        if not isinstance(scope, str) or not (scope == ALL or SCOPE.fullmatch(scope)):
            shown = str(scope)[:80]
            where = f'callers.{name}.scopes[{position}]'
            raise CallersError(f'{source}: {where} is not "*", a module or module/action: {shown!r}')
    return Caller(name, frozenset(scopes))


def digests(name: str, entry: Mapping[str, Any], source: str) -> list[bytes]:
    listed = entry.get('tokens_sha256', [])
    if not isinstance(listed, list):
        raise CallersError(f'{source}: callers.{name}.tokens_sha256 must be a list of hex digests')
    found = []
    for position, value in enumerate(listed):
        if not isinstance(value, str) or not SHA256_HEX.fullmatch(value):
            # The value itself is never shown: it may be a token pasted in place of its digest.
            raise CallersError(
                f'{source}: callers.{name}.tokens_sha256[{position}] is not 64 hex digits'
                f' (the SHA-256 of a token: flask --app app new-token {name})'
            )
        found.append(bytes.fromhex(value))
    return found


def merge(bearer: Mapping[bytes, Caller], listed: Mapping[bytes, Caller], source: str) -> CallerSet:
    """One set of both sources; a token in both, or a file caller named like BEARER's, is refused."""
    if bearer and any(caller.name == BEARER_CALLER for caller in listed.values()):
        raise CallersError(f'{source}: callers.{BEARER_CALLER} is the name of the BEARER tokens')
    for digest, caller in listed.items():
        if digest in bearer:
            raise CallersError(f'{source}: a token of callers.{caller.name} is also in BEARER')
    return CallerSet({**bearer, **listed})


Stat = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


def stat_of(path: str) -> Stat:
    info = os.stat(path)
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def read(path: str) -> tuple[Stat, bytes]:
    """The file's stat, taken before its content: a change during the read shows at the next check."""
    stat = stat_of(path)
    with open(path, 'rb') as file:
        return stat, file.read()


class Callers:
    """The callers one worker knows right now, re-read from CALLERS_FILE when it changes.

    `find` is the only call on the request path. At most once per `recheck_seconds`, the
    thread that gets there first stats the file (the others go on with the current set); only
    a changed stat leads to a read, and only changed content to a parse. The new `CallerSet`
    replaces the old one in one assignment, so each lookup sees one whole set, and a request in
    flight keeps the caller it was authenticated as.
    """

    def __init__(
        self, bearer: Mapping[bytes, Caller], path: str | None, recheck_seconds: float = RECHECK_SECONDS
    ) -> None:
        self.path = path
        self.recheck_seconds = recheck_seconds
        self._bearer = dict(bearer)
        self._lock = threading.Lock()
        self._seen: Stat | None = None  # the stat of the content last examined; None: examine again
        self._content = b''  # the SHA-256 of the content last examined
        self._reported = ''  # the failure last reported: each is reported once
        self._checked_at = time.monotonic()  # when the file was last looked at
        self.current = CallerSet(dict(bearer))
        if path is not None:
            try:
                stat, data = read(path)
            except OSError as error:
                raise CallersError(f'CALLERS_FILE {path} cannot be read: {error.strerror or error}') from None
            self.current = self.parse(data)
            self.examined(stat, data)

    def __repr__(self) -> str:
        return f'<Callers {self.current!r} file={self.path!r}>'

    def find(self, token: bytes) -> Caller | None:
        """The caller whose token this is, or None; the file is looked at first when a check is due."""
        if self.path is not None and time.monotonic() - self._checked_at >= self.recheck_seconds:
            self.check(self.path)
        return self.current.find(token)

    def parse(self, data: bytes) -> CallerSet:
        source = f'CALLERS_FILE {self.path}'
        try:
            text = data.decode('utf-8')
        except UnicodeDecodeError:
            raise CallersError(f'{source} is not UTF-8 text') from None
        return merge(self._bearer, file_callers(text, source), source)

    def examined(self, stat: Stat, data: bytes) -> None:
        # A file modified within RACY_NS may change again in the same mtime tick with the same
        # size: its stat proves nothing, so it is read again at the next check.
        self._seen = None if time.time_ns() - stat[2] < RACY_NS else stat
        self._content = hashlib.sha256(data).digest()

    def check(self, path: str) -> None:
        """Swap in the file's callers if it changed and parses; otherwise keep the current ones."""
        if not self._lock.acquire(blocking=False):
            return  # another thread is checking: this request uses the set in force
        try:
            now = time.monotonic()
            if now - self._checked_at < self.recheck_seconds:
                return  # checked by another thread meanwhile
            self._checked_at = now
            self.reload(path)
        finally:
            self._lock.release()

    def reload(self, path: str) -> None:
        try:
            if stat_of(path) == self._seen:
                return
            stat, data = read(path)
        except OSError as error:
            self.report(f'CALLERS_FILE {path} cannot be read: {error.strerror or error}')
            return
        unchanged = hashlib.sha256(data).digest() == self._content
        self.examined(stat, data)
        if unchanged:
            return
        try:
            found = self.parse(data)
        except CallersError as error:
            self.report(str(error))
            return
        self.current, self._reported = found, ''
        log.info('CALLERS_FILE %s reloaded: %d callers, %d tokens', path, found.callers(), len(found))

    def report(self, message: str) -> None:
        """One error line per failure met, not one per check; it names the entry, never a value."""
        if message == self._reported:
            return
        self._reported = message
        log.error('%s; the callers read before stay in force', message)


def callers_of(config: Config) -> Callers:
    """BEARER's caller and CALLERS_FILE's, read now; a file that cannot be used stops the start."""
    try:
        return Callers(bearer_callers(config.bearer_tokens), config.callers_file)
    except CallersError as error:
        raise ConfigError(str(error)) from None


REALM = 'dbapi'
CHALLENGE = f'Bearer realm="{REALM}"'
NOT_VALID = 'the Bearer token is not valid'


def unauthorized(detail: str, code: str | None = 'invalid_token') -> ApiError:
    """401 with its challenge; `code` None when the request carried no Bearer token at all."""
    challenge = CHALLENGE if code is None else f'{CHALLENGE}, error="{code}"'
    return ApiError(401, 'unauthorized', detail, headers={'WWW-Authenticate': challenge})


def presented_token(header: str) -> bytes:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    scheme, _, token = header.strip().partition(' ')
    if scheme.lower() != 'bearer':
        raise unauthorized('an Authorization: Bearer <token> header is required', None)
    token = token.strip()
    if not token:
        raise unauthorized('the Bearer token is empty', None)  # no token: no error code either
    # WSGI hands headers over as latin-1 text: this gets the client's bytes back, whatever they were.
    try:
        return token.encode('latin-1')
    except UnicodeEncodeError:
        # Text no wire could have sent (a non-WSGI caller): no configured token can equal it.
        raise unauthorized(NOT_VALID) from None


def authenticate(header: str, callers: Callers, verifier: JwtVerifier | None) -> Caller:
    """The caller an `Authorization` header presents: 401 unless its token is known or a valid JWT."""
    token = presented_token(header)
    if verifier is not None:
        claims_header = jwt_header(token)
        if claims_header is not None:
            return jwt_caller(verifier, token, claims_header)
    caller = callers.find(token)
    if caller is None:
        raise unauthorized(NOT_VALID)
    return caller


def jwt_caller(verifier: JwtVerifier, token: bytes, header: Mapping[str, Any]) -> Caller:
    try:
        name, scopes = verifier.caller(token, header)
    except InvalidToken as error:
        raise unauthorized(str(error)) from None
    except KeysUnavailable as error:
        # The caller did nothing wrong: it may send the same token again.
        headers = {'Retry-After': str(error.retry_after)}
        raise ApiError(503, 'keys-unavailable', str(error), headers=headers) from None
    return Caller(name, scopes)


def authorize(caller: Caller, module: str, action: str) -> None:
    """403 unless one of the caller's scopes covers `action` (`module/route`)."""
    if caller.may_call(module, action):
        return
    scope = action.replace('\\', '\\\\').replace('"', '\\"')
    challenge = f'{CHALLENGE}, error="insufficient_scope", scope="{scope}"'
    raise ApiError(
        403,
        'insufficient-scope',
        f'caller {caller.name!r} has no scope for {action!r}',
        headers={'WWW-Authenticate': challenge},
    )
