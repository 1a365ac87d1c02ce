"""`qa-serve --workers N --engine-process`: one process holds each model's engine; the workers send it batches.

Several server processes on one GPU each hold a CUDA context of their own, and the GPU time-slices between
contexts: on the H200 at concurrency 256, `--workers 8` (eight contexts) left the GPU about 30 % busy while
each engine call waited ~9 ms (benchmarks/results/profile_h200.md). With `--engine-process` the supervisor
starts one *engine process* per engine directory before the workers. It loads and warms the engine once
(one context), and each worker's batcher reaches it through a `RemoteEngine`: the same `Engine` interface,
where one call is one message each way over a local socket (`multiprocessing.connection`, AF_UNIX, in a
directory only this user can enter, authenticated with a random key that travels to the workers with
their configuration, never on a command line). Batches from all workers share that one context; the
workers keep what needs many cores: gRPC, tokenization, decoding.

The engine process holds `--engine-contexts` engine instances (each with its own CUDA stream and graphs) and
runs that many calls at once, each on a free instance. With one, a call's host work (unpickling, padding,
the copy in, the launch, the copy out, pickling the reply) leaves the GPU idle; with two, the next batch is
prepared while the previous one runs. Measured on the H200 at concurrency 256, two instances gave no more
answers/s than one: the two calls share the GPU and each takes longer (benchmarks/results/serve_h200_contexts.md).

If the engine process dies, every call on it fails (`EngineError`: the batcher fails the batch, the
client sees INTERNAL) and the supervisor stops the whole unit (exit 1), as when a worker dies.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener, answer_challenge, deliver_challenge
from typing import Any

import numpy as np
from realtime_qa.qacore.bundle import EngineBundle, decoder_defaults, featurizer_for_engine
from realtime_qa.qacore.engine import Engine, EngineMeta, EngineOutputs, EngineSpans
from realtime_qa.qacore.errors import EngineError, EngineFaultError, InvalidInputError, QAError
from realtime_qa.qacore.factory import EngineOptions, load_engine
from realtime_qa.qacore.features import EngineInputs
from realtime_qa.qacore.window_results import warm_span_search
from realtime_qa.services.config import EngineAddress

log = logging.getLogger("qa-serve")

# Errors that cross the socket keep their class, so the batcher and the status mapping see what a local
# engine would have raised; anything else arrives as EngineError.
_ERRORS: dict[str, type[QAError]] = {cls.__name__: cls for cls in (EngineError, EngineFaultError, InvalidInputError)}


@dataclass(frozen=True)
class EngineHostConfig:
    address: EngineAddress
    options: EngineOptions
    warm_span_answer_length: int | None  # capture the device span search's graphs at start (None: no search)
    contexts: int = 1  # engine instances, so this many calls run at once


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
        "engine process serving %s (%s %s, %d context(s))", address.engine_dir, meta.backend, meta.precision,
        len(engines),
    )  # fmt: skip
    free: queue.SimpleQueue[Engine] = queue.SimpleQueue()  # a call takes a free instance and gives it back
    for engine in engines:
        free.put(engine)
    greeting = (meta.to_json(), engines[0].span_search_limits())
    while True:
        try:
            connection = listener.accept()
        except OSError as exc:
            log.warning("engine process could not accept a connection: %s", exc)
            continue
        threading.Thread(target=_serve, args=(connection, address.authkey, free, greeting), daemon=True).start()


def _serve(connection: Connection, authkey: bytes, free: queue.SimpleQueue[Engine], greeting: tuple[str, Any]) -> None:
    """Answer one worker connection's calls until it closes. The connection proves it holds the key first
    (both ways, as `Listener(authkey=...)` does, but here, so a client that never answers the challenge holds
    up only its own thread); nothing it sends is unpickled before that. `greeting` (the engine's meta.json and
    span search limits) goes first; each call runs on an instance taken from `free` and given back after."""
    try:
        deliver_challenge(connection, authkey)
        answer_challenge(connection, authkey)
    except (OSError, EOFError, AuthenticationError) as exc:
        log.warning("engine process refused a connection: %s", exc or type(exc).__name__)
        connection.close()
        return
    try:
        connection.send(greeting)
        while True:
            try:
                operation, arguments = connection.recv()
            except EOFError:
                return
            engine = free.get()
            try:
                if operation == "infer":
                    result: Any = engine.infer(*arguments)
                elif operation == "spans":
                    result = engine.infer_spans(*arguments)
                else:
                    raise EngineError(f"unknown engine call {operation!r}")
                reply: tuple[Any, ...] = ("ok", result)
            except QAError as exc:
                reply = ("error", type(exc).__name__, str(exc))
            except Exception as exc:  # reported to the worker, which fails the batch
                log.exception("engine call failed")
                reply = ("error", "EngineError", f"{type(exc).__name__}: {exc}")
            finally:
                free.put(engine)
            connection.send(reply)
    except OSError:  # the worker went away mid-call
        return
    finally:
        connection.close()


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
        result: EngineOutputs = self._call("infer", (inputs,))
        return result

    def span_search_limits(self) -> tuple[int, int] | None:
        return self._limits

    def infer_spans(
        self, inputs: EngineInputs, may_start: np.ndarray, may_end: np.ndarray, max_answer_length: int
    ) -> EngineSpans:
        result: EngineSpans = self._call("spans", (inputs, may_start, may_end, max_answer_length))
        return result

    def _call(self, operation: str, arguments: tuple[Any, ...]) -> Any:
        with self._lock:
            try:
                self._connection.send((operation, arguments))
                reply = self._connection.recv()
            except (OSError, EOFError) as exc:
                raise EngineError(f"the engine process of {self.address.engine_dir} is gone: {exc}") from None
        if reply[0] == "ok":
            return reply[1]
        raise _ERRORS.get(reply[1], EngineError)(reply[2])

    def close(self) -> None:
        self._connection.close()
