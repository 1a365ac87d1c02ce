"""`qa-serve --workers N --engine-process`: one process holds each model's engine; the workers send it batches.

Several server processes on one GPU each hold a CUDA context of their own, and the GPU time-slices between
contexts: on the H200 at concurrency 256, `--workers 8` (eight contexts) left the GPU about 30 % busy while
each engine call waited ~9 ms (benchmarks/results/profile_h200.md). With `--engine-process` the supervisor
starts one *engine process* per engine directory before the workers. It loads and warms the engine once
(one context), and each worker's batcher reaches it through a `RemoteEngine`: the same `Engine` interface,
where one call is one message each way (framed bytes, not pickles: `services.engine_wire`) over a local
socket (`multiprocessing.connection`, AF_UNIX, in a directory only this user can enter, authenticated with a
random key that travels to the workers with their configuration, never on a command line). Batches from all
workers share that one context; the workers keep what needs many cores: gRPC, tokenization, decoding.

Calls that wait at the same moment run as one engine batch (`services.engine_calls`): under load, the
process ran each worker's small batch alone, one after another, and that queue held throughput
(benchmarks/results/serve_h200_contexts.md); merged, +41 to +68 % answers/s (serve_h200_merge.md). The
process holds `--engine-contexts` engine instances (each with its own CUDA stream and graphs), each run by
one thread, so that many batches can run at once; one is the default, as two gave no more answers/s on the
H200, before merging or after (the batches shared the GPU rather than filling its idle time).

If the engine process dies, every call on it fails (`EngineError`: the batcher fails the batch, the
client sees INTERNAL) and the supervisor stops the whole unit (exit 1), as when a worker dies.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener, Pipe, answer_challenge, deliver_challenge, wait
from typing import Any

import numpy as np
from realtime_qa.qacore.bundle import EngineBundle, decoder_defaults, featurizer_for_engine
from realtime_qa.qacore.engine import Engine, EngineMeta, EngineOutputs, EngineSpans
from realtime_qa.qacore.errors import EngineError, QAError
from realtime_qa.qacore.factory import EngineOptions, load_engine
from realtime_qa.qacore.features import EngineInputs
from realtime_qa.qacore.window_results import warm_span_search
from realtime_qa.services.config import EngineAddress
from realtime_qa.services.engine_calls import (
    INFER,
    SPANS,
    EngineCall,
    merge,
    reply_to_bytes,
    result_of_reply,
    split,
    take_batch,
)
from realtime_qa.services.metrics import EngineProcessMetrics

log = logging.getLogger("qa-serve")

CALL_BYTES_PER_CELL = 3 * 8 + 2  # a call's largest message per window token: three int64 inputs, two bool masks


@dataclass(frozen=True)
class EngineHostConfig:
    address: EngineAddress
    options: EngineOptions
    warm_span_answer_length: int | None  # capture the device span search's graphs at start (None: no search)
    contexts: int = 1  # engine instances, so this many batches run at once
    model_id: str | None = None  # the `model` label of its metrics (None: the engine's meta.json model id)


def host_main(config: EngineHostConfig, ready: Connection) -> None:
    """The engine process (spawned): load and warm the engine, report on `ready` ("ok" or the one-line
    error), then answer calls from every connection until killed."""
    from realtime_qa.services.logctx import configure_logging

    configure_logging("INFO")
    address = config.address
    engines: list[Engine] = []
    try:
        for _ in range(config.contexts):
            engine = load_engine(address.engine_dir, config.options)
            engines.append(engine)
            engine.warmup()
            if config.warm_span_answer_length is not None:
                warm_span_search(engine, config.warm_span_answer_length)
        listener = Listener(address.socket_path, "AF_UNIX")  # authenticated per connection, in its thread
    except QAError as exc:
        ready.send(f"cannot load the engine: {exc}")
        return
    except OSError as exc:
        ready.send(f"cannot open the engine socket: {exc}")
        return
    ready.send("ok")
    ready.close()
    meta = engines[0].meta
    log.info(
        "engine process serving %s (%s %s, %d context(s)); calls waiting together run as one batch of up to %d",
        address.engine_dir, meta.backend, meta.precision, len(engines), meta.max_batch_size,
    )  # fmt: skip
    hub = CallHub(meta.max_batch_size, meta.max_batch_size * meta.max_seq_length * CALL_BYTES_PER_CELL + 65536)
    metrics = EngineProcessMetrics(config.model_id or meta.model_id)
    for engine in engines:
        threading.Thread(target=run_calls, args=(engine, hub, metrics.observe_batch), daemon=True).start()
    greeting = (meta.to_json(), engines[0].span_search_limits())
    while True:
        try:
            connection = listener.accept()
        except OSError as exc:
            log.warning("engine process could not accept a connection: %s", exc)
            continue
        threading.Thread(target=admit, args=(connection, address.authkey, greeting, hub), daemon=True).start()


def admit(connection: Connection, authkey: bytes, greeting: tuple[str, Any], hub: CallHub) -> None:
    """Let one worker connection in: it proves it holds the key first (both ways, as `Listener(authkey=...)`
    does, but here, in its own thread, so a client that never answers the challenge holds up only that
    thread); nothing it sends is read before that, and its calls are framed bytes, never unpickled. Then
    `greeting` (the engine's meta.json and span search limits), and its calls go to `hub`."""
    try:
        deliver_challenge(connection, authkey)
        answer_challenge(connection, authkey)
        connection.send(greeting)
    except (OSError, EOFError, AuthenticationError) as exc:
        log.warning("engine process refused a connection: %s", exc or type(exc).__name__)
        connection.close()
        return
    hub.add(connection)


@dataclass(eq=False)
class _Waiting:
    """A call received and not yet answered, and the connection its reply goes to."""

    caller: _Caller
    call: EngineCall


class _Caller:
    """A worker's connection. Replies are sent under a lock: a worker has one call in flight (`RemoteEngine`),
    but if one sent two, two engine threads could answer at once, and their messages must not interleave."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._send_lock = threading.Lock()

    def reply(self, message: tuple[Any, ...]) -> None:
        try:
            data = reply_to_bytes(message)
        except ValueError as exc:  # a result the framing cannot hold: fail the call, not the engine thread
            data = reply_to_bytes(("error", "EngineError", f"the engine's result cannot be sent: {exc}"))
        try:
            with self._send_lock:
                self.connection.send_bytes(data)
        except OSError:  # the worker went away mid-call; its connection is dropped when read
            pass


class CallHub:
    """The workers' connections and the calls they sent that wait for an engine.

    Each engine thread asks for its next batch (`next_batch`); one of them at a time gathers: it reads every
    call that has arrived (waiting on all connections, and on a pipe that announces new ones, while there is
    none) and takes a batch of those waiting (`engine_calls.take_batch`). The thread that read a call runs
    it, so a call at low load meets no thread hand-off; under load, whatever arrived while an engine ran is
    the next batch.

    The gatherer reads a whole message from each connection that has data, so the peers are trusted to send
    whole messages: only this server's workers hold the key (`admit`), and each sends one call at a time. A
    message longer than `max_message_bytes` (None: any) drops its connection.
    """

    def __init__(self, max_rows: int, max_message_bytes: int | None = None) -> None:
        self.max_rows = max_rows
        self.max_message_bytes = max_message_bytes
        self._callers: dict[Connection, _Caller] = {}
        self._waiting: list[_Waiting] = []
        self._gather = threading.Lock()  # one gatherer at a time; it alone touches _callers and _waiting
        self._admitted: list[Connection] = []
        self._admitted_lock = threading.Lock()
        self._doorbell, self._ring = Pipe(duplex=False)

    def add(self, connection: Connection) -> None:
        """A new worker connection, read from the next gathering on (safe from any thread)."""
        with self._admitted_lock:
            self._admitted.append(connection)
            self._ring.send_bytes(b"")

    def next_batch(self) -> list[_Waiting]:
        """Block until a call has arrived; return the calls to run as one batch."""
        with self._gather:
            while True:
                self._receive(block=not self._waiting)
                if self._waiting:
                    return take_batch(self._waiting, _call_of, self.max_rows)

    def _receive(self, block: bool) -> None:
        ready = wait([*self._callers, self._doorbell], timeout=None if block else 0)
        for connection in ready:
            if connection is self._doorbell:
                self._admit()
                continue
            caller = self._callers[connection]  # type: ignore[index]
            try:
                message = caller.connection.recv_bytes(self.max_message_bytes)
            except (OSError, EOFError) as exc:  # the worker closed its connection (or died), or sent too much
                if isinstance(exc, OSError):  # e.g. "bad message length": over max_message_bytes
                    log.warning("engine process dropped a worker connection: %s", exc)
                del self._callers[caller.connection]
                caller.connection.close()
                continue
            try:
                self._waiting.append(_Waiting(caller, EngineCall.from_bytes(message)))
            except EngineError as exc:
                caller.reply(_error_reply(exc))
            except Exception as exc:  # not expected (from_bytes checks what it reads): fail the call, not the gatherer
                log.exception("engine process could not read a call")
                caller.reply(("error", "EngineError", f"malformed engine call: {type(exc).__name__}"))

    def _admit(self) -> None:
        with self._admitted_lock:
            while self._doorbell.poll():
                self._doorbell.recv_bytes()
            admitted, self._admitted = self._admitted, []
        for connection in admitted:
            self._callers[connection] = _Caller(connection)


def _call_of(waiting: _Waiting) -> EngineCall:
    return waiting.call


def run_calls(engine: Engine, hub: CallHub, observe: Callable[[int, int], None] | None = None) -> None:
    """An engine thread: run batches from `hub` on `engine` and answer each call, forever; `observe(calls,
    windows)` is told each batch's size."""
    while True:
        batch = hub.next_batch()
        calls = [waiting.call for waiting in batch]
        for waiting, reply in zip(batch, run_batch(engine, calls), strict=True):
            waiting.caller.reply(reply)
        if observe is not None:
            observe(len(calls), sum(call.rows for call in calls))


def run_batch(engine: Engine, calls: list[EngineCall]) -> list[tuple[Any, ...]]:
    """Each call's reply, ("ok", result) or ("error", class name, message): the calls `engine` accepts run as
    one merged call; one it refuses gets its own error, and an error of the merged call is every call's."""
    replies: list[tuple[Any, ...] | None] = [None] * len(calls)
    accepted = []
    for index, call in enumerate(calls):
        try:
            call.check(engine)
            accepted.append(index)
        except QAError as exc:
            replies[index] = _error_reply(exc)
    if accepted:
        merged = [calls[index] for index in accepted]
        try:
            results: list[Any] = split(merge(merged).run(engine), merged)
            for index, result in zip(accepted, results, strict=True):
                replies[index] = ("ok", result)
        except QAError as exc:
            for index in accepted:
                replies[index] = _error_reply(exc)
        except Exception as exc:  # reported to the workers, which fail their batches
            log.exception("engine call failed")
            for index in accepted:
                replies[index] = ("error", "EngineError", f"{type(exc).__name__}: {exc}")
    return [reply for reply in replies if reply is not None]


def _error_reply(exc: QAError) -> tuple[str, str, str]:
    return "error", type(exc).__name__, str(exc)


def remote_bundle(address: EngineAddress) -> EngineBundle:
    """A worker's bundle of a model served by the engine process: a `RemoteEngine`, and the featurizer and
    decoder defaults read from the engine directory as `open_bundle` reads them."""
    engine = RemoteEngine(address)
    try:
        featurizer = featurizer_for_engine(engine, address.engine_dir)
        return EngineBundle(address.engine_dir, engine, featurizer, decoder_defaults(engine.meta))
    except BaseException:
        engine.close()
        raise


class RemoteEngine(Engine):
    """An engine that lives in the engine process: each call is one message each way over its connection.

    One connection per `RemoteEngine` (one batcher context); calls on it are serialized by a lock, so it is
    as thread-safe as the batcher needs.
    """

    def __init__(self, address: EngineAddress) -> None:
        try:
            self._connection = Client(address.socket_path, "AF_UNIX", authkey=address.authkey)
            meta_json, limits = self._connection.recv()
        except (OSError, EOFError, AuthenticationError) as exc:
            raise EngineError(f"cannot reach the engine process of {address.engine_dir}: {exc}") from None
        super().__init__(EngineMeta.from_json(meta_json))
        self._limits: tuple[int, int] | None = (int(limits[0]), int(limits[1])) if limits is not None else None
        self._lock = threading.Lock()
        self.address = address

    def infer(self, inputs: EngineInputs) -> EngineOutputs:
        result: EngineOutputs = self._call(EngineCall(INFER, inputs))
        return result

    def span_search_limits(self) -> tuple[int, int] | None:
        return self._limits

    def infer_spans(
        self, inputs: EngineInputs, may_start: np.ndarray, may_end: np.ndarray, max_answer_length: int
    ) -> EngineSpans:
        result: EngineSpans = self._call(EngineCall(SPANS, inputs, may_start, may_end, max_answer_length))
        return result

    def _call(self, call: EngineCall) -> Any:
        try:
            message = call.to_bytes()
        except ValueError as exc:  # e.g. a negative max_answer_length (a local engine refuses it too)
            raise EngineError(f"cannot send the engine call: {exc}") from None
        with self._lock:
            try:
                self._connection.send_bytes(message)
                reply = self._connection.recv_bytes()
            except (OSError, EOFError) as exc:
                raise EngineError(f"the engine process of {self.address.engine_dir} is gone: {exc}") from None
        return result_of_reply(bytearray(reply))  # a bytearray: the result's arrays are writable, as a local engine's

    def close(self) -> None:
        self._connection.close()
