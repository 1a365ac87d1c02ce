"""The grpc.aio server: QA service, standard health checking and reflection, metrics, graceful shutdown.

Start-up binds the port first (health NOT_SERVING, QA calls UNAVAILABLE), then loads and warms up
each engine; a model's health entry turns SERVING once its engine is warm, and the service's and
the server's entries once every model is. Shutdown turns health NOT_SERVING, stops accepting calls,
lets in-flight calls finish within the grace period, then stops the batchers and closes the engines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qa.v1 import qa_pb2_grpc
from qacore.factory import EngineOptions
from qacore.files import read_bytes
from services.batcher import Batcher
from services.config import EngineSpec, ServerConfig
from services.metrics import ServiceMetrics
from services.models import ModelRegistry, load_model
from services.passages import PassageCache
from services.qa_service import SERVICE_NAME, QuestionAnsweringService

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FINAL_GRACE_S = 1.0  # after draining, how long idle streams and health watches get to close


def model_health_name(model_id: str) -> str:
    """The health-check service name of one model: `qa.v1.QuestionAnswering/<model_id>`."""
    return f"{SERVICE_NAME}/{model_id}"


def default_engine_specs() -> tuple[EngineSpec, ...]:
    """The shipped model's CPU engine, built on first use (slow once, then cached)."""
    from builder.defaults import ensure_default_engine

    return (EngineSpec(ensure_default_engine()),)


class QAServer:
    """One running server; `start()` then `stop()` (or use `async with`)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServiceMetrics(config.budget_ns)
        self.models = ModelRegistry()
        self.passages = PassageCache(config.passage_cache_chars)
        self.cpu_executor = ThreadPoolExecutor(max_workers=config.cpu_threads, thread_name_prefix="qa-cpu")
        self.service = QuestionAnsweringService(self.models, self.passages, self.metrics, config, self.cpu_executor)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None

    async def __aenter__(self) -> QAServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def target(self) -> str:
        """Where clients connect, e.g. "127.0.0.1:50051"."""
        if self.port is None:
            raise RuntimeError("server is not started")
        host = self.config.host if self.config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> None:
        """Listen, then load and warm up every engine; returns once all models are SERVING."""
        await self.listen()
        await self.load_models()

    async def listen(self) -> int:
        """Bind and start the gRPC server (health NOT_SERVING until models load); returns the port."""
        config = self.config
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(config.metrics_host, config.metrics_port)
        # The transport admits up to twice the documented limit so the service itself can answer an
        # oversize request with INVALID_ARGUMENT; beyond that gRPC answers RESOURCE_EXHAUSTED.
        transport_limit = 2 * config.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", transport_limit),
                ("grpc.max_send_message_length", transport_limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        qa_pb2_grpc.add_QuestionAnsweringServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        for name in (health.OVERALL_HEALTH, SERVICE_NAME):
            await self.health.set(name, NOT_SERVING)
        try:  # grpcio raises RuntimeError for an address it cannot bind (older releases returned 0)
            if config.tls_cert is not None and config.tls_key is not None:
                key, chain = read_bytes(config.tls_key, "TLS key"), read_bytes(config.tls_cert, "TLS certificate")
                credentials = grpc.ssl_server_credentials([(key, chain)])
                port = server.add_secure_port(config.address, credentials)
            else:
                port = server.add_insecure_port(config.address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {config.address}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {config.address}")
        await server.start()
        self._server = server
        self.port = port
        log.info("qa-serve listening on %s:%d (%s)", config.host, port, "TLS" if config.tls_cert else "plaintext")
        return port

    async def load_models(self) -> None:
        config = self.config
        specs = config.engines or await asyncio.to_thread(default_engine_specs)
        options = EngineOptions(intra_op_threads=config.intra_op_threads, allow_spinning=config.engine_spinning)
        started = time.perf_counter_ns()
        for spec in specs:
            model = await load_model(spec, options, config.engine_contexts, config.batcher, self.metrics.batch_observer)
            try:
                self.models.add(model)
            except ValueError:
                await model.close()
                raise
            self.metrics.track_queue_depth(model.model_id, depth_of(model.batcher))
            await self.health.set(model_health_name(model.model_id), SERVING)
        for name in (SERVICE_NAME, health.OVERALL_HEALTH):
            await self.health.set(name, SERVING)
        log.info(
            "serving %s (default %s) after %.1f s",
            ", ".join(model.model_id for model in self.models),
            self.models.default_id,
            (time.perf_counter_ns() - started) / 1e9,
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown (idempotent; concurrent callers wait for the same shutdown)."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(self.config.grace_s if grace_s is None else grace_s))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace_s: float) -> None:
        started = time.perf_counter_ns()
        deadline_s = time.monotonic() + grace_s
        # Drain first: new calls get UNAVAILABLE from the service itself (a clear, retryable status),
        # calls in flight finish. Only then is the gRPC server stopped; calls it would still have to
        # refuse at that point would get CANCELLED, which a client cannot tell from a lost request.
        self.service.drain()
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            log.info("shutting down: refusing new calls, %.1f s for in-flight ones", grace_s)
            if not await self.service.wait_idle(grace_s):
                log.warning("grace period of %.1f s over with calls still in flight: cancelling them", grace_s)
            # What is left are idle connections and health watches: close them promptly.
            await self._server.stop(min(FINAL_GRACE_S, max(0.0, deadline_s - time.monotonic())))
        for model in self.models:
            await model.close()
        await asyncio.to_thread(self.cpu_executor.shutdown, True)  # may be finishing a long tokenization
        self.metrics.close()
        log.info("stopped after %.2f s", (time.perf_counter_ns() - started) / 1e9)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def depth_of(batcher: Batcher) -> Callable[[], float]:
    return lambda: batcher.depth
