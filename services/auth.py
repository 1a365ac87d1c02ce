"""Authentication for every gRPC server of the project: bearer tokens and mutual TLS, in one interceptor.

- Bearer tokens: `authorization: Bearer <token>` metadata, checked against a token file (one token per
  line; blank lines and `#` comments ignored) in constant time; `reload()` re-reads the file (qa-serve
  calls it on SIGHUP), so tokens rotate without a restart. A missing or wrong token is UNAUTHENTICATED.
- Mutual TLS: `server_credentials(..., client_ca=...)` makes gRPC itself refuse, during the handshake,
  any client without a certificate signed by that CA.
- Health checks (`grpc.health.v1.Health`) are exempt, so load balancers and orchestrators can probe.

The interceptor publishes the caller's identity in `caller_scope` for the handler (the passage store
scopes passage ids to it). Identities are digests, never the token itself; neither tokens nor keys are
ever logged.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from realtime_qa.services.interceptors import HEALTH_PREFIX, _BehaviorInterceptor

log = logging.getLogger(__name__)

AUTHORIZATION_HEADER = "authorization"
BEARER_PREFIX = "bearer "
MAX_TOKEN_CHARS = 4096

# The authenticated caller of the current RPC ("" when the server has no authentication).
caller_scope: contextvars.ContextVar[str] = contextvars.ContextVar("caller_scope", default="")


class TokenFileError(ValueError):
    """The token file cannot be read or holds no token."""


def read_tokens(path: Path) -> tuple[bytes, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read token file {path}: {type(exc).__name__}") from None
    tokens = tuple(
        line.strip().encode("utf-8") for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    )
    if not tokens:
        raise TokenFileError(f"token file {path} holds no token")
    if any(len(token) > MAX_TOKEN_CHARS or b" " in token for token in tokens):
        raise TokenFileError(f"token file {path}: a token is longer than {MAX_TOKEN_CHARS} or holds a space")
    return tokens


def identity_of_token(token: bytes) -> str:
    """A stable, non-reversible name for a token's holder (used as the tenant scope and in logs)."""
    return "token:" + hashlib.sha256(token).hexdigest()[:16]


class TokenSet:
    """The accepted bearer tokens, re-read from their file on `reload()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tokens = read_tokens(path)
        log.info("auth: %d bearer tokens loaded", len(self._tokens))

    def __len__(self) -> int:
        return len(self._tokens)

    def reload(self) -> bool:
        """Re-read the file; a broken file keeps the previous tokens (and says so). Returns success."""
        try:
            self._tokens = read_tokens(self.path)
        except TokenFileError as exc:
            log.error("auth: token reload failed, keeping the previous %d tokens: %s", len(self._tokens), exc)
            return False
        log.info("auth: %d bearer tokens reloaded", len(self._tokens))
        return True

    def match(self, presented: bytes) -> bytes | None:
        """The accepted token equal to `presented`, compared in constant time against every token."""
        found = None
        for token in self._tokens:
            if hmac.compare_digest(token, presented):
                found = token
        return found


def bearer_token(metadata: Any) -> bytes | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION_HEADER:
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            if text[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
                return text[len(BEARER_PREFIX) :].strip().encode("utf-8", "surrogateescape")
            return None
    return None


def certificate_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The client certificate's common name (mutual TLS), if the peer presented one."""
    auth = context.auth_context() or {}
    names = auth.get("x509_common_name") or auth.get("x509_subject")
    if not names:
        return None
    return "cert:" + names[0].decode("utf-8", "replace")


class AuthInterceptor(_BehaviorInterceptor):
    """Refuses every RPC but health checks without a valid bearer token (when tokens are configured) and
    records the caller's identity in `caller_scope` for the handler (inside the call, so the servicer's
    task sees it)."""

    def __init__(self, tokens: TokenSet | None, exempt_prefixes: tuple[str, ...] = (HEALTH_PREFIX,)) -> None:
        self.tokens = tokens
        self.exempt_prefixes = exempt_prefixes

    @contextlib.asynccontextmanager
    async def around(
        self, method: str, metadata: Any, context: grpc.aio.ServicerContext, response_streaming: bool
    ) -> AsyncIterator[None]:
        if method.startswith(self.exempt_prefixes):
            yield
            return
        scope = await self._authenticate(metadata, context)
        token = caller_scope.set(scope)
        try:
            yield
        finally:
            caller_scope.reset(token)

    async def _authenticate(self, metadata: Any, context: grpc.aio.ServicerContext) -> str:
        """The caller's identity, or abort with UNAUTHENTICATED."""
        if self.tokens is not None:
            presented = bearer_token(metadata)
            token = self.tokens.match(presented) if presented else None
            if token is None:
                log.info("auth: refused a call with %s bearer token", "a wrong" if presented else "no")
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization: Bearer ...)"
                )
            assert token is not None
            return identity_of_token(token)
        return certificate_identity(context) or ""


def server_credentials(cert: bytes, key: bytes, client_ca: bytes | None = None) -> grpc.ServerCredentials:
    """TLS credentials; with `client_ca`, clients must present a certificate that CA signed (mutual TLS)."""
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


@dataclass(frozen=True)
class ServerSecurity:
    """TLS, mutual TLS and bearer tokens of one server, as flags (for the chain's servers; `qa-serve` declares
    the same settings in `services.config.ServerConfig`)."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("mutual TLS (--tls-client-ca) needs the server's own --tls-cert and --tls-key")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key: serve TLS)")
        add("--tls-key", type=Path, help="PEM private key")
        add("--tls-client-ca", type=Path, help="PEM CA: clients must present a certificate it signed (mutual TLS)")
        add("--auth-token-file", type=Path, help="accepted bearer tokens, one per line (reloaded on SIGHUP)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSecurity:
        return cls(args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_token_file)

    def tokens(self) -> TokenSet | None:
        """The token set (read now: TokenFileError for a bad file)."""
        return TokenSet(self.auth_token_file) if self.auth_token_file is not None else None

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials (files read now: OSError for a missing one), or None for plaintext."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        client_ca = self.tls_client_ca.read_bytes() if self.tls_client_ca is not None else None
        return server_credentials(self.tls_cert.read_bytes(), self.tls_key.read_bytes(), client_ca)
