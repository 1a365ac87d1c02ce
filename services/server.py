"""The grpc.aio server: QA service, standard health checking and reflection, metrics, graceful shutdown.

Start-up binds the port first (health NOT_SERVING, QA calls UNAVAILABLE), then loads and warms up
each engine; a model's health entry turns SERVING once its engine is warm, and the service's and
the server's entries once every model is. Shutdown turns health NOT_SERVING, stops accepting calls,
lets in-flight calls finish within the grace period, then stops the batchers and closes the engines.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from realtime_qa.qacore.default_engine import DEFAULT_PRECISION
from realtime_qa.qacore.factory import EngineOptions
from realtime_qa.qacore.files import read_bytes
from realtime_qa.qacore.window_results import warm_span_search
from realtime_qa.services.auth import AuthInterceptor, TokenSet, server_credentials
from realtime_qa.services.batcher import Batcher
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.interceptors import CallTracker, server_interceptors
from realtime_qa.services.metrics import ServiceMetrics
from realtime_qa.services.models import ModelRegistry, load_model
from realtime_qa.services.passages import open_passage_store
from realtime_qa.services.qa_service import SERVICE_NAME, QuestionAnsweringService

from realtime_qa.qa.v1 import qa_pb2_grpc

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set by `qa-serve --workers` (services/workers.py)
QUEUE_DEPTH_REFRESH_S = 0.5
FINAL_GRACE_S = 0.25  # after draining, how long idle streams and health watches get to close
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"  # the same protocol as v1alpha under its final name


def model_health_name(model_id: str) -> str:
    """The health-check service name of one model: `qa.v1.QuestionAnswering/<model_id>`."""
    return f"{SERVICE_NAME}/{model_id}"


def default_engine_specs(precision: str = DEFAULT_PRECISION) -> tuple[EngineSpec, ...]:
    """The shipped model's CPU engine (INT8 unless `precision` says fp32), built on first use by a child
    `qa-build --default` (then cached)."""
    from realtime_qa.qacore.default_engine import DefaultEngineSpec, resolve_default_engine

    return (EngineSpec(resolve_default_engine(DefaultEngineSpec(precision=precision))),)


def engine_options(config: ServerConfig) -> EngineOptions:
    """How this process runs its engines (a worker's, or the `--engine-process` process's)."""
    return EngineOptions(
        intra_op_threads=config.intra_op_threads,
        allow_spinning=config.engine_spinning,
        # "auto" spins: one process holds the GPU (`--workers` resolves it to "block" for workers that each do).
        gpu_blocking_sync=config.gpu_sync == "block",
    )


class QAServer:
    """One running server; `start()` then `stop()` (or use `async with`)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServiceMetrics(config.budget_ns)
        self.models = ModelRegistry()
        self.passages = open_passage_store(config.passage_cache_chars, config.passage_store, config.passage_ttl_s)
        self.tokens: TokenSet | None = None  # accepted bearer tokens (--auth-token-file), read in listen()
        self.cpu_executor = ThreadPoolExecutor(max_workers=config.cpu_threads, thread_name_prefix="qa-cpu")
        self.calls = CallTracker()
        self.service = QuestionAnsweringService(
            self.models, self.passages, self.metrics, config, self.cpu_executor, self.calls
        )
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        # Interceptors of other concerns (authentication) for the standard chain; set before `start()`.
        self.extra_interceptors: list[grpc.aio.ServerInterceptor] = []
        self.engine_calls_abandoned = False  # set when stop() left an engine call running (qa-serve exits hard)
        self._stopping: asyncio.Task[None] | None = None
        self._depth_refresh: asyncio.Task[None] | None = None

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
        # oversize request with INVALID_ARGUMENT; beyond that gRPC answers RESOURCE_EXHAUSTED (and ends a
        # stream): documented in qa.proto as the transport's cut-off, not as a full queue.
        transport_limit = 2 * config.max_message_bytes
        if config.auth_token_file is not None:
            self.tokens = TokenSet(config.auth_token_file)
        server = grpc.aio.server(
            interceptors=server_interceptors(
                self.metrics,
                [AuthInterceptor(self.tokens), *self.extra_interceptors],
                calls=self.calls,
                max_message_bytes=config.max_message_bytes,
            ),
            options=[
                ("grpc.max_receive_message_length", transport_limit),
                ("grpc.max_send_message_length", transport_limit),
                ("grpc.so_reuseport", 1 if config.reuse_port else 0),  # `--workers`: processes share the port
            ],
        )
        qa_pb2_grpc.add_QuestionAnsweringServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if config.reflection:
            enable_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))
        for name in (health.OVERALL_HEALTH, SERVICE_NAME):
            await self.health.set(name, NOT_SERVING)
        credentials = self._tls_credentials()
        try:  # grpcio raises RuntimeError for an address it cannot bind (older releases returned 0)
            if credentials is not None:
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

    def _tls_credentials(self) -> grpc.ServerCredentials | None:
        """The server's TLS credentials, with the certificate and key checked first: a bad certificate is a
        one-line error naming the problem, not a failure to bind."""
        config = self.config
        if config.tls_cert is None or config.tls_key is None:
            return None
        key, chain = read_bytes(config.tls_key, "TLS key"), read_bytes(config.tls_cert, "TLS certificate")
        check_tls_pair(config.tls_cert, config.tls_key)
        client_ca = read_bytes(config.tls_client_ca, "TLS client CA") if config.tls_client_ca is not None else None
        return server_credentials(chain, key, client_ca)

    def reload_tokens(self) -> None:
        """Re-read the bearer token file (SIGHUP); a broken file keeps the tokens in use."""
        if self.tokens is not None:
            self.tokens.reload()

    async def load_models(self) -> None:
        config = self.config
        specs = config.engines or await asyncio.to_thread(default_engine_specs, config.precision)
        options = engine_options(config)
        started = time.perf_counter_ns()
        remote_engines = {address.engine_dir: address for address in config.remote_engines}
        for spec in specs:
            remote = remote_engines.get(spec.engine_dir)
            model = await load_model(
                spec, options, config.engine_contexts, config.batcher, self.metrics.batch_observer, remote
            )
            try:
                # Capture the span search's graphs now, not on a request (the engine process did it for its own).
                if config.span_search and remote is None:
                    for engine in model.engines:
                        await asyncio.to_thread(warm_span_search, engine, model.decoder_config.max_answer_length)
                self.models.add(model)
            except BaseException:
                await model.close()
                raise
            self.metrics.track_queue_depth(model.model_id, depth_of(model.batcher))
            await self.health.set(model_health_name(model.model_id), SERVING)
        for name in (SERVICE_NAME, health.OVERALL_HEALTH):
            await self.health.set(name, SERVING)
        if os.environ.get(MULTIPROC_ENV):  # a `--workers` process: see _refresh_queue_depth
            self._depth_refresh = asyncio.create_task(self._refresh_queue_depth())
        # Everything loaded so far (the engine's framework, the tokenizer, gRPC) lives as long as the process:
        # out of the collector's sight, a full collection no longer walks it. On the H200 host a full
        # collection of the torch engine's process paused the event loop for up to 96 ms (profile_h200.md).
        gc.collect()
        gc.freeze()
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

    async def _refresh_queue_depth(self) -> None:
        """Multiprocess metrics (`--workers`) merge the values workers write to files, and a gauge's function
        is not such a value: queue depths are copied into the gauges every QUEUE_DEPTH_REFRESH_S instead."""
        while True:
            for model in self.models:
                self.metrics.queue_depth.labels(model.model_id).set(model.batcher.depth)
            await asyncio.sleep(QUEUE_DEPTH_REFRESH_S)

    async def _stop(self, grace_s: float) -> None:
        started = time.perf_counter_ns()
        if self._depth_refresh is not None:
            self._depth_refresh.cancel()
        deadline_s = time.monotonic() + grace_s
        # Drain first: new calls get UNAVAILABLE from the call-tracking interceptor (a clear, retryable
        # status), open streams stop reading, and calls and stream questions in flight finish. Only then
        # is the gRPC server stopped; calls it would still have to refuse at that point would get
        # CANCELLED, which a client cannot tell from a lost request.
        self.calls.drain()
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            log.info("shutting down: refusing new calls, %.1f s for %d in flight", grace_s, self.calls.in_flight)
            if not await self.calls.wait_idle(grace_s):
                log.warning(
                    "grace period of %.1f s over with %d calls still in flight: cancelling them",
                    grace_s, self.calls.in_flight,
                )  # fmt: skip
            # What is left are idle connections and health watches: close them promptly.
            await self._server.stop(min(FINAL_GRACE_S, max(0.0, deadline_s - time.monotonic())))
        # Work still queued is dropped, not run, and a running engine call is not waited for beyond the
        # grace period: the grace period bounds the shutdown.
        for model in self.models:
            model.batcher.abandon()
            stopped = await model.batcher.close(max(FINAL_GRACE_S, deadline_s - time.monotonic()))
            if stopped:
                await model.close()
            else:
                self.engine_calls_abandoned = True
                log.warning("model %s: an engine call is still running after the grace period; not waited for",
                            model.model_id)  # fmt: skip
        # A long tokenization still running is not waited for; queued ones are cancelled.
        self.cpu_executor.shutdown(wait=False, cancel_futures=True)
        await self.passages.close()
        self.metrics.close()
        log.info("stopped after %.2f s", (time.perf_counter_ns() - started) / 1e9)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def enable_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Server reflection under both names clients use: `grpc.reflection.v1` (grpcurl, Postman, current
    grpcio) and `grpc.reflection.v1alpha` (older tools). The two protocols are the same messages on the
    wire, so one servicer answers both."""
    names = (*service_names, reflection.SERVICE_NAME, REFLECTION_V1)
    reflection.enable_server_reflection(names, server)
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


def check_tls_pair(cert: Path, key: Path) -> None:
    """Raise ValueError naming the problem when the PEM certificate chain and key cannot serve TLS."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except (ssl.SSLError, ValueError):
        raise ValueError(f"TLS certificate {cert} is not a usable PEM certificate chain") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "MISMATCH" in (exc.reason or "").upper():
            raise ValueError(f"TLS certificate {cert} does not match the key {key}") from None
        raise ValueError(f"TLS key {key} is not a usable unencrypted PEM private key") from None


def depth_of(batcher: Batcher) -> Callable[[], float]:
    return lambda: batcher.depth
