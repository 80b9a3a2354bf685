"""JSON Web Tokens from an identity provider (Keycloak, Entra ID, Okta, Auth0), checked with PyJWT.

A token is accepted when it is signed with an asymmetric algorithm by a key of the provider's
key set (JWKS), names the configured issuer and audience exactly, and is within its `exp`,
`nbf` and `iat` (give or take `LEEWAY_SECONDS`). `none` and every HMAC algorithm are refused
before any key is looked at, so a token "signed" with a public key as an HMAC secret never
verifies. The caller is the first of the caller claims the token holds (`azp`, then `sub`);
its scopes are the scope claim's words (`scope`, space-separated), in the callers file's syntax.

`KeySet` keeps the provider's keys; PyJWKClient only fetches and parses them (its own cache
would stop serving the keys it holds when the provider is unreachable at the end of its lifespan).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

import jwt
from jwt import PyJWK, PyJWKClient

from lib.core.config import JwtSettings

log = logging.getLogger('dbapi.jwt')

ALGORITHMS = frozenset({'RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA'})
LEEWAY_SECONDS = 30  # clock skew between the provider and this host
FETCH_TIMEOUT_SECONDS = 5.0
REQUIRED_CLAIMS = ['exp', 'iss', 'aud']
MAX_CALLER_NAME = 128
# PyJWT's exceptions -> what the client is told (their own messages are not passed on).
REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, 'the token has expired'),
    (jwt.ImmatureSignatureError, 'the token is not valid yet'),
    (jwt.InvalidIssuerError, 'the token is from another issuer'),
    (jwt.InvalidAudienceError, 'the token is for another audience'),
    (jwt.MissingRequiredClaimError, 'the token lacks a required claim (exp, iss, aud)'),
    (jwt.InvalidSignatureError, 'the token signature does not verify'),
    (jwt.InvalidAlgorithmError, "the token's algorithm does not match its key"),
)


class InvalidToken(Exception):
    """The token is not acceptable (401); the message is safe to show and to log."""


class KeysUnavailable(Exception):
    """The key a token needs is not known and the key set cannot be fetched (503)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__('the identity provider key set cannot be fetched; retry shortly')
        self.retry_after = max(1, math.ceil(retry_after))  # seconds until the next fetch may be tried


def jwt_header(token: bytes) -> dict[str, Any] | None:
    """The header of `token` when it has the shape of a JWT (three parts, a JSON header), else None."""
    if token.count(b'.') != 2:
        return None
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return None


class KeySet:
    """The provider's signing keys by `kid`, as last fetched.

    A token whose kid is known is verified with the key held, whether or not the provider can
    be reached. An unknown kid fetches the set (at most once per `refetch_seconds`, all threads
    together); a key the provider removed stops verifying once a fetch no longer lists it. Past
    `max_age_seconds` the set is fetched again in a background thread while the held keys serve.
    """

    def __init__(self, settings: JwtSettings) -> None:
        self.settings = settings
        # The fetch and the parsing only: this class keeps the keys (cache_jwk_set off).
        self.client = PyJWKClient(settings.jwks_url, cache_jwk_set=False, timeout=FETCH_TIMEOUT_SECONDS)
        self.keys: Mapping[str, PyJWK] = {}
        self.fetched_at: float | None = None  # monotonic time of the last successful fetch
        self.tried_at: float | None = None  # ... of the last attempt, successful or not
        self.failed = False  # whether the last attempt failed
        self.lock = threading.Lock()
        self.refreshing = False

    def key(self, kid: str) -> PyJWK:
        """The key `kid` names: InvalidToken when the set has none, KeysUnavailable when it cannot be had."""
        key = self.keys.get(kid)
        if key is None:
            return self.fetch_for(kid)
        fetched = self.fetched_at
        if fetched is not None and time.monotonic() - fetched >= self.settings.max_age_seconds:
            self.refresh_in_background()
        return key

    def fetch_for(self, kid: str) -> PyJWK:
        with self.lock:
            key = self.keys.get(kid)  # fetched by another thread while this one waited
            if key is not None:
                return key
            now = time.monotonic()
            wait = self.cooldown_left(now)
            if wait > 0:
                if self.failed:
                    raise KeysUnavailable(wait)
                raise InvalidToken('no key of the identity provider has this kid')
            if not self.fetch(now):
                raise KeysUnavailable(self.settings.refetch_seconds)
            key = self.keys.get(kid)
            if key is None:
                raise InvalidToken('no key of the identity provider has this kid')
            return key

    def cooldown_left(self, now: float) -> float:
        if self.tried_at is None:
            return 0.0
        return self.tried_at + self.settings.refetch_seconds - now

    def fetch(self, now: float) -> bool:
        """Fetch the set and keep its usable keys; on failure keep the held ones. Whether it worked."""
        self.tried_at = now
        try:
            fetched = self.client.get_signing_keys(refresh=True)
        except jwt.PyJWTError as error:
            if not self.failed:
                log.warning(
                    'JWT_JWKS_URL %s cannot be fetched (%s); the %d keys held stay in use',
                    self.settings.jwks_url,
                    type(error).__name__,
                    len(self.keys),
                )
            self.failed = True
            return False
        keys = {key.key_id: key for key in fetched if key.key_id and key.algorithm_name in ALGORITHMS}
        if self.failed or set(keys) != set(self.keys):
            log.info('JWT_JWKS_URL %s fetched: %d keys (kid %s)', self.settings.jwks_url, len(keys), sorted(keys))
        self.keys, self.fetched_at, self.failed = keys, time.monotonic(), False
        return True

    def refresh_in_background(self) -> None:
        if not self.lock.acquire(blocking=False):
            return  # a fetch is under way
        try:
            if self.refreshing or self.cooldown_left(time.monotonic()) > 0:
                return
            self.refreshing = True
        finally:
            self.lock.release()
        threading.Thread(target=self.refresh, name='dbapi-jwks', daemon=True).start()

    def refresh(self) -> None:
        try:
            with self.lock:
                self.fetch(time.monotonic())
        finally:
            self.refreshing = False


class JwtVerifier:
    """Turns a verified token into its caller's name and scopes."""

    def __init__(self, settings: JwtSettings) -> None:
        self.settings = settings
        self.keys = KeySet(settings)

    def __repr__(self) -> str:
        return f'<JwtVerifier {self.settings.jwks_url} iss={self.settings.issuer!r}>'

    def caller(self, token: bytes, header: Mapping[str, Any]) -> tuple[str, frozenset[str]]:
        """The caller's name and scopes of a token with this (unverified) header; InvalidToken or
        KeysUnavailable otherwise."""
        algorithm, kid = header.get('alg'), header.get('kid')
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            raise InvalidToken('the token algorithm is not accepted (asymmetric ones only)')
        if not isinstance(kid, str) or not kid:
            raise InvalidToken('the token names no key (kid)')
        key = self.keys.key(kid)
        claims = self.verified_claims(token, key)
        return self.caller_name(claims), self.scopes(claims)

    def verified_claims(self, token: bytes, key: PyJWK) -> dict[str, Any]:
        settings = self.settings
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[key.algorithm_name],
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=LEEWAY_SECONDS,
                options={'require': REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as error:
            reason = next((text for kind, text in REASONS if isinstance(error, kind)), 'the token is not valid')
            raise InvalidToken(reason) from None

    def caller_name(self, claims: Mapping[str, Any]) -> str:
        for claim in self.settings.caller_claims:
            value = claims.get(claim)
            if isinstance(value, str) and value:
                return value[:MAX_CALLER_NAME]
        raise InvalidToken(f'the token names no caller ({", ".join(self.settings.caller_claims)})')

    def scopes(self, claims: Mapping[str, Any]) -> frozenset[str]:
        value = claims.get(self.settings.scope_claim)
        if isinstance(value, str):
            return frozenset(value.split())
        if isinstance(value, list):
            return frozenset(item for item in value if isinstance(item, str))
        return frozenset()
