"""A small grpc.aio server for one chain stage (ASR stub, response, assistant front) with health checking.

Each stage's servicer is registered by a callback; standard health checking reports the stage's
service name and the server as SERVING once started and NOT_SERVING while shutting down. Every call
goes through the project's standard interceptor chain (`services.interceptors.server_interceptors`:
request ids in log lines, error mapping, drain on shutdown, malformed messages as INVALID_ARGUMENT);
extra interceptors (authentication) are passed in by whoever builds the server, so the stages
themselves know nothing about them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from realtime_qa.services.interceptors import CallTracker, server_interceptors
from realtime_qa.services.logctx import NO_REQUEST, REQUEST_ID_HEADER

log = logging.getLogger(__name__)

TRACE_ID_HEADER = "x-trace-id"  # a conversational turn's trace id, sent to every stage the turn calls
MAX_TRACE_ID_CHARS = 128

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # a 1 MiB audio chunk, a 1M-character passage, a spoken reply


@dataclass(frozen=True)
class StageBinding:
    """One service of a stage: its full gRPC name and how to add its servicer to a server."""

    service_name: str
    register: Callable[[grpc.aio.Server], None]


def trace_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-trace-id (else its x-request-id, else "-"), cut to a sane length, for log lines."""
    metadata = dict(context.invocation_metadata() or ())
    value = metadata.get(TRACE_ID_HEADER) or metadata.get(REQUEST_ID_HEADER) or NO_REQUEST
    text = value if isinstance(value, str) else value.decode("utf-8", "replace")
    return text[:MAX_TRACE_ID_CHARS]


def host_port(host: str, port: int) -> str:
    """The address clients dial: wildcard hosts become loopback; IPv6 in brackets."""
    host = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class StageServer:
    """One listening gRPC server for one or more stage services; `start()` then `stop()`."""

    def __init__(  # interceptors: extra ones (e.g. authentication), inside request ids and error mapping
        self,
        name: str,
        bindings: Sequence[StageBinding],
        host: str = "127.0.0.1",
        port: int = 0,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.name = name
        self.bindings = tuple(bindings)
        self.host = host
        self.requested_port = port
        self.interceptors = tuple(interceptors)
        self.credentials: grpc.ServerCredentials | None = None  # TLS (services.auth); set before start()
        self.calls = CallTracker()
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} server is not started")
        return host_port(self.host, self.port)

    async def start(self) -> int:
        """Bind, start and report SERVING; returns the port (OSError when the address cannot be bound)."""
        chain = server_interceptors(None, self.interceptors, calls=self.calls, max_message_bytes=MAX_MESSAGE_BYTES)
        server = grpc.aio.server(
            interceptors=chain,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        for binding in self.bindings:
            binding.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"[{self.host}]:{self.requested_port}" if ":" in self.host else f"{self.host}:{self.requested_port}"
        try:
            if self.credentials is not None:
                port = server.add_secure_port(address, self.credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        self._server, self.port = server, port
        for binding in self.bindings:
            await self.health.set(binding.service_name, SERVING)
        await self.health.set(health.OVERALL_HEALTH, SERVING)
        log.info("%s listening on %s", self.name, self.target)
        return port

    async def stop(self, grace_s: float = 2.0) -> None:
        """Report NOT_SERVING, let calls in flight finish within `grace_s`, then close (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        self.calls.drain()  # new calls get UNAVAILABLE; calls in flight may finish within the grace period
        await self.health.enter_graceful_shutdown()
        await self.calls.wait_idle(grace_s)
        await server.stop(0.5)
        log.info("%s stopped", self.name)

    async def __aenter__(self) -> StageServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
