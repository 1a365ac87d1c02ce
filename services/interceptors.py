"""Cross-cutting RPC concerns as grpc.aio server interceptors, so no RPC method can forget one.

Every server of the project builds its chain with `server_interceptors(...)`; from the outside in:

1. `RequestContextInterceptor`: the caller's `x-request-id` (bounded, escaped; a new id when absent)
   goes into every log line of the call and back to the caller (initial metadata on streams, trailing
   metadata on unary calls).
2. `StatusInterceptor`: error mapping and metrics. An exception leaving an RPC becomes its documented
   status (`services.errors.status_of`): expected failures are logged in one line, unexpected ones with
   a traceback and INTERNAL for the client, streams included. Unary calls are counted by method and
   code; streaming calls when they fail (their servicer counts what they stream).
3. `extra`: interceptors of other concerns (authentication) run here: with request ids in their log
   lines and their refusals counted.
4. `CallTrackingInterceptor`: counts calls in flight; once the server drains, new calls get UNAVAILABLE
   before they do any work (health checks excepted, so probes can watch the shutdown).
5. `MessageInterceptor`: innermost, it deserializes requests itself, so a malformed message (garbage
   bytes, invalid UTF-8 in a string field) or one above `max_message_bytes` is INVALID_ARGUMENT with a
   plain message instead of UNKNOWN with a traceback. On a request stream, a bad message becomes an
   `InvalidMessage` item that the servicer answers in-band, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError
from realtime_qa.services.errors import InvalidRequestError, NotServingError, is_expected, status_of
from realtime_qa.services.logctx import REQUEST_ID_HEADER, escape_log_text, new_request_id, request_context

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."
Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


class CountsRequests(Protocol):
    """What the status interceptor needs of a metrics object (`services.metrics.ServiceMetrics` has it)."""

    def count_request(self, method: str, code_name: str) -> None: ...


@dataclass(frozen=True)
class InvalidMessage:
    """A request on a stream that could not be read; the servicer answers it in-band with `message`."""

    message: str


def method_name(full_method: str) -> str:
    """'/qa.v1.QuestionAnswering/Answer' -> 'Answer'."""
    return full_method.rpartition("/")[2] or full_method


def request_id_from(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The caller's `x-request-id`, cut to MAX_REQUEST_ID_CHARS and escaped for logs; a new id when absent."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and value:
            return escape_log_text(value[:MAX_REQUEST_ID_CHARS])
    return new_request_id()


async def _run_behavior(behavior: Behavior, request: Any, context: grpc.aio.ServicerContext) -> Any:
    """Await a behavior of any shape: a coroutine, or an async generator (its items written to the call)."""
    result = behavior(request, context)
    if inspect.isasyncgen(result):
        async for item in result:
            await context.write(item)
        return None
    if inspect.isawaitable(result):
        return await result
    return result


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Behavior, bool, bool], Behavior],
    request_deserializer: Any = ...,
) -> grpc.RpcMethodHandler:
    """The same handler with its behavior replaced by `wrap(behavior, request_streaming, response_streaming)`."""
    deserializer = handler.request_deserializer if request_deserializer is ... else request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False, False), deserializer, serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, False, True), deserializer, serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, True, False), deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True, True), deserializer, serializer)


class _BehaviorInterceptor(grpc.aio.ServerInterceptor):
    """Base: wraps each call's behavior in `around` (an async context manager per call)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata

        def wrap(behavior: Behavior, request_streaming: bool, response_streaming: bool) -> Behavior:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with self.around(method, metadata, context, response_streaming):
                    return await _run_behavior(behavior, request, context)

            return wrapped

        return wrap_handler(handler, wrap)

    def around(
        self, method: str, metadata: Any, context: grpc.aio.ServicerContext, response_streaming: bool
    ) -> contextlib.AbstractAsyncContextManager[None]:
        raise NotImplementedError


class RequestContextInterceptor(_BehaviorInterceptor):
    """Request ids: read from `x-request-id` (or made up), put in the log context, sent back to the caller."""

    @contextlib.asynccontextmanager
    async def around(
        self, method: str, metadata: Any, context: grpc.aio.ServicerContext, response_streaming: bool
    ) -> AsyncIterator[None]:
        request_id = request_id_from(metadata)
        with request_context(request_id):
            if response_streaming:
                await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
            else:
                context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
            yield


class StatusInterceptor(_BehaviorInterceptor):
    """Exceptions become documented status codes (traceback only for the unexpected); calls are counted."""

    def __init__(self, metrics: CountsRequests | None) -> None:
        self.metrics = metrics

    @contextlib.asynccontextmanager
    async def around(
        self, method: str, metadata: Any, context: grpc.aio.ServicerContext, response_streaming: bool
    ) -> AsyncIterator[None]:
        name = method_name(method)
        try:
            yield
        except asyncio.CancelledError:
            self._count(name, "CANCELLED")
            raise
        except grpc.aio.AbortError:  # the behavior aborted with a status of its own choosing
            code = context.code() if hasattr(context, "code") else None
            self._count(name, _code_name(code) or "UNKNOWN")
            raise
        except Exception as exc:
            code, message = status_of(exc)
            if is_expected(exc):
                log.info("%s failed: %s: %s", name, code.name, escape_log_text(message, 500))
            else:
                log.error("%s failed unexpectedly: %s", name, message, exc_info=exc)
            self._count(name, code.name)
            await context.abort(code, message)
        else:
            # A streaming call that ends well is not counted here: its servicer counts what it streamed
            # (AnswerStream: one count per question), so the counter reads "answered questions and failed calls".
            if not response_streaming:
                self._count(name, _code_name(context.code()) or "OK")

    def _count(self, method: str, code_name: str) -> None:
        if self.metrics is not None:
            self.metrics.count_request(method, code_name)


def _code_name(code: Any) -> str | None:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return None


class CallTracker:
    """Calls in flight, and the drain switch of a shutdown (shared by the interceptor and the server)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_listeners: list[Callable[[], None]] = []

    def on_drain(self, listener: Callable[[], None]) -> None:
        """Call `listener` when draining begins (e.g. to stop open streams reading)."""
        self._drain_listeners.append(listener)
        if self.draining:
            listener()

    def drain(self) -> None:
        """Shutdown begins: refuse new calls with UNAVAILABLE; calls in flight continue."""
        if self.draining:
            return
        self.draining = True
        for listener in list(self._drain_listeners):
            listener()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is in flight (True), or `timeout_s` passed (False)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Count a call as in flight; while draining, refuse it before it does any work."""
        if self.draining:
            raise NotServingError("server is shutting down; retry on another server or later")
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()


class CallTrackingInterceptor(_BehaviorInterceptor):
    """In-flight counting and drain refusal for every call except health checks and reflection."""

    def __init__(self, calls: CallTracker) -> None:
        self.calls = calls

    @contextlib.asynccontextmanager
    async def around(
        self, method: str, metadata: Any, context: grpc.aio.ServicerContext, response_streaming: bool
    ) -> AsyncIterator[None]:
        if method.startswith((HEALTH_PREFIX, REFLECTION_PREFIX)):
            yield
            return
        with self.calls.call():
            yield


class MessageInterceptor(grpc.aio.ServerInterceptor):
    """Deserializes requests inside the call, so malformed or oversize messages are INVALID_ARGUMENT."""

    def __init__(self, max_message_bytes: int | None = None) -> None:
        self.max_message_bytes = max_message_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        limit = self.max_message_bytes

        def read(raw: bytes) -> Any:
            if limit is not None and len(raw) > limit:
                raise InvalidRequestError(f"request of {len(raw):,} bytes exceeds the limit of {limit:,}")
            try:
                return deserialize(raw)
            except (DecodeError, UnicodeDecodeError, ValueError) as exc:
                raise InvalidRequestError(f"malformed request message: {_decode_problem(exc)}") from None

        def wrap(behavior: Behavior, request_streaming: bool, response_streaming: bool) -> Behavior:
            if request_streaming:

                async def stream_wrapped(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                    return await _run_behavior(behavior, _read_each(request_iterator, read), context)

                return stream_wrapped

            async def unary_wrapped(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                return await _run_behavior(behavior, read(raw), context)

            return unary_wrapped

        return wrap_handler(handler, wrap, request_deserializer=None)


async def _read_each(raw_iterator: Any, read: Callable[[bytes], Any]) -> AsyncIterator[Any]:
    async for raw in raw_iterator:
        try:
            yield read(raw)
        except InvalidRequestError as exc:
            yield InvalidMessage(str(exc))


def _decode_problem(exc: BaseException) -> str:
    """A plain one-line reason, without class names or byte dumps."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "utf-8" in text.lower() or isinstance(exc, UnicodeDecodeError):
        return "a string field is not valid UTF-8"
    return "not a valid protobuf message of this method's request type"


def server_interceptors(
    metrics: CountsRequests | None,
    extra: Sequence[grpc.aio.ServerInterceptor] = (),
    *,
    calls: CallTracker | None = None,
    max_message_bytes: int | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The standard interceptor chain of every server of the project, outermost first (see the module doc).

    `extra` (e.g. authentication) runs inside request ids and error mapping, outside call tracking.
    """
    chain: list[grpc.aio.ServerInterceptor] = [RequestContextInterceptor(), StatusInterceptor(metrics), *extra]
    if calls is not None:
        chain.append(CallTrackingInterceptor(calls))
    chain.append(MessageInterceptor(max_message_bytes))
    return chain
