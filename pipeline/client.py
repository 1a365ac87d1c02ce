"""A typed asyncio client of the qa.v1 QuestionAnswering service.

Domain dataclasses in, domain dataclasses out (protobuf stays inside this module). Unary calls take a
deadline and retry UNAVAILABLE (server warming up, restarting, or one replica gone) with exponential
backoff and jitter inside that deadline: gRPC's own retry policy from the channel's service config
(with retry throttling, so a dead cluster is not hammered) makes up to 5 attempts per call, and only a
policy asking for more than gRPC's limit of 5 repeats the call here. Failures raise `QAClientError`
with the gRPC status code. Streams are not retried: a failed question on a stream arrives as an
`AnswerFailure`, the stream stays open.

Several replicas without a proxy: give several addresses ("127.0.0.1:50051,127.0.0.1:50052") or a DNS
name ("dns:///qa.internal:50051"); gRPC's `round_robin` policy spreads calls over every address. One
`qa-serve --workers N` without a proxy: `ClientConfig(connections=K)` opens K connections (the kernel gives
each to one worker) and sends each call on the one with the fewest calls in flight (`LeastBusy`).
Security: `ClientConfig(tls_root_cert=..., tls_client_cert=..., tls_client_key=..., token=...)` for
TLS, mutual TLS and a bearer token (sent as call credentials over TLS; over plaintext, which only a
loopback or private hop should carry, as the same `authorization` header).

    async with QAClient("127.0.0.1:50051") as client:
        answer = await client.answer("Who wrote it?", passage)
        async for result in client.answer_stream(questions):
            ...
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from realtime_qa.qacore.decoding import Span, new_span
from realtime_qa.qacore.latency import StageTimings

from realtime_qa.qa.v1 import qa_pb2, qa_pb2_grpc

REQUEST_ID_HEADER = "x-request-id"
AUTHORIZATION_HEADER = "authorization"
SERVICE_NAME = "qa.v1.QuestionAnswering"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
GRPC_MAX_ATTEMPTS = 5  # gRPC caps a retry policy's maxAttempts at 5
# Floor of the backoff in the service config: with a ~1 ms backoff gRPC core (grpc/grpc#41036, seen with
# grpcio 1.85) intermittently never sends the retry and the call hangs until its deadline. 10 ms never did.
GRPC_MIN_BACKOFF_S = 0.01
# Unary methods safe to retry: answers are reads, PutPassage is idempotent (content ids). Streams never are.
RETRIED_METHODS = (
    {"service": SERVICE_NAME, "method": "Answer"},
    {"service": SERVICE_NAME, "method": "PutPassage"},
    {"service": SERVICE_NAME, "method": "ListModels"},
    {"service": SERVICE_NAME, "method": "GetModelInfo"},
)
T = TypeVar("T")
MAX_CONNECTIONS = 64


class QAClientError(Exception):
    """A call failed with gRPC status `code` (after any retries)."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: attempt n waits about initial * multiplier**(n-1), capped, with full jitter."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    retry_codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})

    def backoff_s(self, attempt: int) -> float:
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(0.0, ceiling)

    @property
    def grpc_attempts(self) -> int:
        """Attempts gRPC itself makes per call (its limit is 5)."""
        return max(1, min(GRPC_MAX_ATTEMPTS, self.max_attempts))

    def service_config(self, load_balancing: str = "round_robin", throttle_tokens: int = 10) -> str:
        """The channel's gRPC service config: load-balancing policy, retry policy, retry throttling.

        Throttling: every failed attempt costs a token, every success returns 0.1; below half of
        `throttle_tokens` gRPC stops retrying (calls fail fast until the servers recover).
        """
        config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
        if self.grpc_attempts > 1:
            config["methodConfig"] = [
                {
                    "name": list(RETRIED_METHODS),
                    "retryPolicy": {
                        "maxAttempts": self.grpc_attempts,
                        "initialBackoff": f"{max(self.initial_backoff_s, GRPC_MIN_BACKOFF_S):.3f}s",
                        "maxBackoff": f"{max(self.max_backoff_s, self.initial_backoff_s, GRPC_MIN_BACKOFF_S):.3f}s",
                        "backoffMultiplier": self.multiplier,
                        "retryableStatusCodes": sorted(code.name for code in self.retry_codes),
                    },
                }
            ]
            config["retryThrottling"] = {"maxTokens": throttle_tokens, "tokenRatio": 0.1}
        return json.dumps(config)


@dataclass(frozen=True)
class ClientConfig:
    timeout_s: float | None = 10.0  # default deadline of a unary call, retries included
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_message_bytes: int = 8 * 1024 * 1024
    tls_root_cert: Path | None = None  # PEM CA bundle that signed the server's certificate; set to use TLS
    tls_client_cert: Path | None = None  # PEM client certificate chain for mutual TLS (with tls_client_key)
    tls_client_key: Path | None = None
    tls_server_name: str | None = None  # the name to verify in the server's certificate, if not the target's
    token: str | None = field(default=None, repr=False)  # bearer token (never printed)
    load_balancing: str = "round_robin"  # gRPC policy over the target's addresses ("pick_first" also works)
    # gRPC shares one connection among every channel of a process to the same target with the same options, so
    # several QAClients are still one connection, and `qa-serve --workers` (SO_REUSEPORT spreads connections,
    # not calls) serves them all from one worker. True: this client opens a connection of its own.
    own_connection: bool = False
    # Connections of its own to spread calls over (1..MAX_CONNECTIONS): each unary call and each new stream goes on
    # the one with the fewest calls and streams in flight (`LeastBusy`), so a connection whose worker answers slower
    # gets fewer. For one `qa-serve --workers N` without a proxy in front (docs/deploy.md).
    connections: int = 1

    def __post_init__(self) -> None:
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key")
        if self.tls_client_cert is not None and self.tls_root_cert is None:
            raise ValueError("a client certificate needs TLS: set tls_root_cert too")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("a bearer token must be non-empty and hold no whitespace")
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be 1..{MAX_CONNECTIONS}, not {self.connections}")


class LeastBusy(Generic[T]):
    """Which of `targets` takes the next call: the one with the fewest `in_flight`, ties in turn (gRPC's
    least-request balancing). Round-robin would send a slow target as many calls as the others; this sends it
    fewer, so one busy worker does not hold every caller's tail latency."""

    def __init__(self, targets: Sequence[T], in_flight: Callable[[T], int]) -> None:
        if not targets:
            raise ValueError("nothing to pick from")
        self.targets = list(targets)
        self.in_flight = in_flight
        self._turn = 0

    def __call__(self) -> T:
        count = len(self.targets)
        first = self._turn
        self._turn = (first + 1) % count
        return min((self.targets[(first + step) % count] for step in range(count)), key=self.in_flight)


@dataclass(frozen=True)
class AnswerOptions:
    """Per-question options; None leaves the server's default."""

    n_best_size: int | None = None
    max_answer_length: int | None = None
    allow_null: bool = False
    null_threshold: float | None = None
    timeout_ms: int | None = None

    def to_pb(self) -> qa_pb2.AnswerOptions:
        options = qa_pb2.AnswerOptions(allow_null=self.allow_null)
        if self.n_best_size is not None:
            options.n_best_size = self.n_best_size
        if self.max_answer_length is not None:
            options.max_answer_length = self.max_answer_length
        if self.null_threshold is not None:
            options.null_threshold = self.null_threshold
        if self.timeout_ms is not None:
            options.timeout_ms = self.timeout_ms
        return options


@dataclass(frozen=True)
class Question:
    """One question about a passage given as text or as a passage id from `put_passage`."""

    question: str
    passage: str | None = None
    passage_id: str | None = None
    request_id: str = ""  # tag echoed in the answer (matches answers on streams)
    model_id: str = ""
    options: AnswerOptions = field(default_factory=AnswerOptions)

    def to_pb(self) -> qa_pb2.AnswerRequest:
        request = qa_pb2.AnswerRequest(
            request_id=self.request_id, model_id=self.model_id, question=self.question, options=self.options.to_pb()
        )
        if self.passage_id is not None:
            request.passage_id = self.passage_id
        elif self.passage is not None:
            request.passage = self.passage
        return request


@dataclass(frozen=True)
class Answer:
    """The server's answer to one question."""

    request_id: str
    best: Span | None  # None when the model abstained
    nbest: list[Span]
    abstained: bool
    null_probability: float
    model_id: str
    engine: str
    passage_id: str
    timings: StageTimings

    @property
    def text(self) -> str:
        return self.best.text if self.best is not None else ""

    @classmethod
    def from_pb(cls, message: qa_pb2.AnswerResponse) -> Answer:
        timings = message.timings
        return cls(
            request_id=message.request_id,
            best=span_from_pb(message.answer) if message.HasField("answer") else None,
            nbest=[span_from_pb(span) for span in message.nbest],
            abstained=message.abstained,
            null_probability=message.null_probability,
            model_id=message.model_id,
            engine=message.engine,
            passage_id=message.passage_id,
            timings=StageTimings(
                queue_ns=timings.queue_ns,
                tokenize_ns=timings.tokenize_ns,
                infer_ns=timings.infer_ns,
                decode_ns=timings.decode_ns,
                total_ns=timings.total_ns,
            ),
        )


@dataclass(frozen=True)
class AnswerFailure:
    """A question on a stream that failed; the stream goes on."""

    request_id: str
    code: grpc.StatusCode
    message: str

    @classmethod
    def from_pb(cls, message: qa_pb2.AnswerResponse) -> AnswerFailure:
        return cls(message.request_id, status_code_of(message.error.code), message.error.message)


@dataclass(frozen=True)
class StoredPassage:
    passage_id: str
    num_tokens: int
    num_windows: int


@dataclass(frozen=True)
class ModelDescription:
    model_id: str
    is_default: bool
    ready: bool
    backend: str
    backend_version: str
    precision: str
    max_batch_size: int
    sequence_lengths: tuple[int, ...]
    max_seq_length: int
    doc_stride: int
    max_query_length: int
    model_card: str
    vocab_sha256: str
    engine_contexts: int

    @classmethod
    def from_pb(cls, message: qa_pb2.ModelInfo) -> ModelDescription:
        return cls(
            model_id=message.model_id,
            is_default=message.is_default,
            ready=message.ready,
            backend=message.backend,
            backend_version=message.backend_version,
            precision=message.precision,
            max_batch_size=message.max_batch_size,
            sequence_lengths=tuple(message.sequence_lengths),
            max_seq_length=message.max_seq_length,
            doc_stride=message.doc_stride,
            max_query_length=message.max_query_length,
            model_card=message.model_card,
            vocab_sha256=message.vocab_sha256,
            engine_contexts=message.engine_contexts,
        )


StreamResult = Answer | AnswerFailure


def span_from_pb(message: qa_pb2.Span) -> Span:
    return new_span(message.text, message.start, message.end, message.score, message.logit)


def status_code_of(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def result_from_pb(message: qa_pb2.AnswerResponse) -> StreamResult:
    return AnswerFailure.from_pb(message) if message.HasField("error") else Answer.from_pb(message)


class QAClient:
    """One channel (or `ClientConfig.connections` channels) to a QA server; safe to share between tasks."""

    def __init__(self, target: str | Sequence[str], config: ClientConfig | None = None) -> None:
        self.target = channel_target(target)
        self.config = config = config or ClientConfig()
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", config.retry.service_config(config.load_balancing)),
        ]
        if config.own_connection or config.connections > 1:
            options.append(("grpc.use_local_subchannel_pool", 1))
        opened = [open_channel(self.target, config, options) for _ in range(config.connections)]
        self.channels = [channel for channel, _ in opened]
        self.channel = self.channels[0]
        self._auth_metadata = opened[0][1]
        self._stubs = [qa_pb2_grpc.QuestionAnsweringStub(channel) for channel in self.channels]
        self._health = [health_pb2_grpc.HealthStub(channel) for channel in self.channels]
        self.in_flight = [0] * len(self.channels)  # calls and open streams per connection
        self._least_busy = LeastBusy(range(len(self.channels)), self.in_flight.__getitem__)

    async def __aenter__(self) -> QAClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    # -- unary -------------------------------------------------------------------------------------

    async def answer(
        self,
        question: str | Question,
        passage: str | None = None,
        *,
        passage_id: str | None = None,
        model_id: str = "",
        options: AnswerOptions | None = None,
        timeout_s: float | None = -1.0,
        request_id: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Answer:
        """Answer one question (a `Question`, or its fields as arguments).

        `timeout_s` bounds the call, retries included: -1 (default) uses `ClientConfig.timeout_s`,
        None means no deadline. `request_id` is sent as `x-request-id` (a new one otherwise);
        `metadata` adds headers to this call (e.g. the chain's `x-trace-id`). Raises `QAClientError`
        with the final status code.
        """
        if not isinstance(question, Question):
            question = Question(question, passage, passage_id, model_id=model_id, options=options or AnswerOptions())
        message = question.to_pb()
        response: qa_pb2.AnswerResponse = await self._call("Answer", message, timeout_s, request_id, metadata)
        return Answer.from_pb(response)

    async def put_passage(self, passage: str, model_id: str = "", timeout_s: float | None = -1.0) -> StoredPassage:
        """Store (and tokenize) a passage once; ask about it by `passage_id` afterwards."""
        request = qa_pb2.PutPassageRequest(passage=passage, model_id=model_id)
        response: qa_pb2.PutPassageResponse = await self._call("PutPassage", request, timeout_s)
        return StoredPassage(response.passage_id, response.num_tokens, response.num_windows)

    async def list_models(self, timeout_s: float | None = -1.0) -> list[ModelDescription]:
        response: qa_pb2.ListModelsResponse = await self._call("ListModels", qa_pb2.ListModelsRequest(), timeout_s)
        return [ModelDescription.from_pb(model) for model in response.models]

    async def model_info(self, model_id: str = "", timeout_s: float | None = -1.0) -> ModelDescription:
        response: qa_pb2.ModelInfo = await self._call(
            "GetModelInfo", qa_pb2.GetModelInfoRequest(model_id=model_id), timeout_s
        )
        return ModelDescription.from_pb(response)

    async def health(self, service: str = SERVICE_NAME, timeout_s: float = 2.0, connection: int = 0) -> str:
        """The health status name of `service` ("SERVING", "NOT_SERVING", ...), asked over `connection`."""
        try:
            response = await self._health[connection].Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, metadata=self._auth_metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise QAClientError(exc.code(), exc.details() or "") from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def wait_ready(self, timeout_s: float = 60.0, service: str = SERVICE_NAME) -> None:
        """Wait until the server reports `service` SERVING on every connection (each may reach another worker of
        `qa-serve --workers`); QAClientError DEADLINE_EXCEEDED otherwise."""
        deadline = time.monotonic() + timeout_s
        for connection in range(len(self.channels)):
            await self._wait_serving(connection, service, deadline, timeout_s)

    async def _wait_serving(self, connection: int, service: str, deadline: float, timeout_s: float) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                remaining_s = max(0.05, min(2.0, deadline - time.monotonic()))
                if await self.health(service, remaining_s, connection) == "SERVING":
                    return
            except QAClientError as exc:
                if exc.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            if time.monotonic() >= deadline:
                raise QAClientError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.target} not SERVING in {timeout_s} s")
            await asyncio.sleep(min(self.config.retry.backoff_s(attempt) + 0.01, max(0.0, deadline - time.monotonic())))

    async def _call(
        self,
        method: str,
        request: Any,
        timeout_s: float | None = -1.0,
        request_id: str | None = None,
        extra_metadata: Sequence[tuple[str, str]] = (),
    ) -> T:
        """One unary call of `method` (its name), retried on the policy's codes all inside one deadline; each
        attempt goes on the least busy connection.

        gRPC retries each call up to `policy.grpc_attempts` times itself (while its retry throttle
        allows). Only a policy asking for more attempts than gRPC's limit of 5 repeats the call here: up
        to `max_attempts` calls, each one retried by gRPC again, all inside the deadline (waiting for a
        restarting server, say).
        """
        timeout = self.config.timeout_s if timeout_s == -1.0 else timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        request_id = request_id or uuid.uuid4().hex[:16]
        reserved = (REQUEST_ID_HEADER, AUTHORIZATION_HEADER)  # set here, never twice
        extra = tuple((key, value) for key, value in extra_metadata if key not in reserved)
        metadata = ((REQUEST_ID_HEADER, request_id), *extra, *self._auth_metadata)
        policy = self.config.retry
        attempt = 0
        while True:
            attempt += policy.grpc_attempts if policy.max_attempts <= GRPC_MAX_ATTEMPTS else 1
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise QAClientError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded (while retrying)", request_id)
            connection = self._least_busy()
            self.in_flight[connection] += 1
            try:
                call: Callable[..., Awaitable[T]] = getattr(self._stubs[connection], method)
                return await call(request, timeout=remaining, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in policy.retry_codes or attempt >= policy.max_attempts:
                    raise QAClientError(code, exc.details() or "", request_id) from None
                pause = policy.backoff_s(attempt)
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
            finally:
                self.in_flight[connection] -= 1
            await asyncio.sleep(pause)

    # -- streaming ---------------------------------------------------------------------------------

    async def answer_stream(
        self,
        questions: Iterable[Question] | AsyncIterable[Question],
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[StreamResult]:
        """Send every question over one stream; yield results as the server completes them.

        Questions without a request_id are tagged with their position ("0", "1", ...). Leaving the
        loop early cancels the stream (the server drops the remaining work).
        """
        call = self._open_stream(_tagged_requests(questions), timeout_s, request_id)
        try:
            async for response in call:
                yield result_from_pb(response)
        except grpc.aio.AioRpcError as exc:
            raise QAClientError(exc.code(), exc.details() or "") from None
        finally:
            call.cancel()

    def open_stream(self, timeout_s: float | None = None, request_id: str | None = None) -> QAStream:
        """A bidirectional stream to drive by hand: `send()` questions, `receive()` results, interleaved."""
        return QAStream(self._open_stream(None, timeout_s, request_id))

    def _open_stream(self, requests: Any, timeout_s: float | None, request_id: str | None) -> Any:
        """An AnswerStream call on the least busy connection, counted there until it ends."""
        connection = self._least_busy()
        metadata = ((REQUEST_ID_HEADER, request_id or uuid.uuid4().hex[:16]), *self._auth_metadata)
        arguments = () if requests is None else (requests,)
        call = self._stubs[connection].AnswerStream(*arguments, timeout=timeout_s, metadata=metadata)
        self.in_flight[connection] += 1
        call.add_done_callback(lambda _: self._stream_ended(connection))
        return call

    def _stream_ended(self, connection: int) -> None:
        self.in_flight[connection] -= 1


def open_channel(
    target: str, config: ClientConfig, options: Sequence[tuple[str, Any]] = ()
) -> tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]]:
    """A channel to `target` with `config`'s TLS, mutual TLS and token, and the metadata to send on each call.

    Over TLS the token travels as call credentials (the returned metadata is empty); over plaintext gRPC
    refuses call credentials, so the token is the `authorization` metadata returned here. Any gRPC
    service's stubs can use the channel (the chain's stage adapters do).
    """
    options = list(options)
    if config.tls_root_cert is None:
        metadata = ((AUTHORIZATION_HEADER, f"Bearer {config.token}"),) if config.token is not None else ()
        return grpc.aio.insecure_channel(target, options=options), metadata
    if config.tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.tls_server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=config.tls_root_cert.read_bytes(),
        private_key=config.tls_client_key.read_bytes() if config.tls_client_key else None,
        certificate_chain=config.tls_client_cert.read_bytes() if config.tls_client_cert else None,
    )
    if config.token is not None:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(config.token))
    return grpc.aio.secure_channel(target, credentials, options=options), ()


def channel_target(target: str | Sequence[str]) -> str:
    """A gRPC target for one address, a list of addresses, or a comma-separated list.

    One address (or a `dns:///name:port` target, whose every A record round_robin then uses) is
    returned as is; several become one `ipv4:` (or `ipv6:`) target listing IP literals.
    """
    addresses = [part.strip() for part in target.split(",")] if isinstance(target, str) else list(target)
    addresses = [address for address in addresses if address]
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        return addresses[0]
    hosts = []
    for address in addresses:
        host, sep, port = address.removeprefix("ipv4:").removeprefix("ipv6:").rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"{address!r} is not HOST:PORT")
        try:
            hosts.append((ipaddress.ip_address(host.strip("[]")), int(port)))
        except ValueError:
            raise ValueError(
                f"{address!r}: several addresses must be IP literals; for host names use one dns:///NAME:PORT target"
            ) from None
    versions = {ip.version for ip, _ in hosts}
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in hosts)
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in hosts)
    raise ValueError("several addresses must be all IPv4 or all IPv6")


async def _tagged_requests(
    questions: Iterable[Question] | AsyncIterable[Question],
) -> AsyncIterator[qa_pb2.AnswerRequest]:
    index = 0
    if isinstance(questions, AsyncIterable):
        async for question in questions:
            yield _tagged(question, index)
            index += 1
    else:
        for question in questions:
            yield _tagged(question, index)
            index += 1


def _tagged(question: Question, index: int) -> qa_pb2.AnswerRequest:
    message = question.to_pb()
    if not message.request_id:
        message.request_id = str(index)
    return message


class QAStream:
    """One open AnswerStream call: questions go out with `send`, results come back with `receive`."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def send(self, question: Question) -> None:
        try:
            await self._call.write(question.to_pb())
        except grpc.aio.AioRpcError as exc:
            raise QAClientError(exc.code(), exc.details() or "") from None

    async def done_sending(self) -> None:
        """Half-close: the server answers what it has, then ends the stream."""
        await self._call.done_writing()

    async def receive(self) -> StreamResult | None:
        """The next result, or None once the server has ended the stream."""
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise QAClientError(exc.code(), exc.details() or "") from None
        if response is grpc.aio.EOF:
            return None
        return result_from_pb(response)

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> QAStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __aiter__(self) -> AsyncIterator[StreamResult]:
        return self._results()

    async def _results(self) -> AsyncIterator[StreamResult]:
        while (result := await self.receive()) is not None:
            yield result
