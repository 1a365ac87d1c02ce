"""`qa-serve --workers N`: N server processes sharing one port, one merged metrics endpoint.

One Python process tops out far below what the engine can do (the event loop and the GIL serialize
request handling), so a host runs several. As in grpc's multiprocessing example, the parent reserves
the port with SO_REUSEPORT and each worker binds it again with `grpc.so_reuseport`; the kernel spreads
new connections over the workers. Each worker is a full `QAServer` (its own engine, batcher and health).

Metrics follow prometheus_client's multiprocess mode: the parent points PROMETHEUS_MULTIPROC_DIR at a
fresh directory before starting the workers, every worker writes its samples there, and the parent
alone serves /metrics through a `MultiProcessCollector` that merges them (counters and histograms
summed; gauges per worker `pid`).

SIGTERM or SIGINT to the parent is passed to every worker, each drains within the grace period (SIGHUP
is passed on too: every worker re-reads its token file); a
worker that exits on its own brings the others down too (exit 1), so the supervisor above (systemd,
compose, Kubernetes) restarts one coherent unit instead of a host quietly serving at partial strength.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from realtime_qa.services.config import EngineAddress, ServerConfig
from realtime_qa.services.server import MULTIPROC_ENV

log = logging.getLogger("qa-serve")

STOP_MARGIN_S = 5.0  # beyond the grace period, how long a worker gets before it is killed
EXIT_ENGINE = 3  # as qa-serve's: an engine that cannot be used


@contextlib.contextmanager
def reserved_port(host: str, port: int) -> Iterator[int]:
    """Hold `host:port` (port 0: a free one) with SO_REUSEPORT so workers can bind it too; yields the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0:
            raise OSError("SO_REUSEPORT is not available: --workers needs it")
        sock.bind((host or "0.0.0.0", port))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def worker_config(config: ServerConfig, port: int) -> ServerConfig:
    """One worker's settings: the shared port, SO_REUSEPORT, no metrics endpoint of its own; `--gpu-sync auto`
    blocks where several workers each hold the GPU (spinning there burnt a core per worker for the whole of
    the others' time slices: benchmarks/results/serve_h200_workers.md)."""
    gpu_sync = config.gpu_sync
    if gpu_sync == "auto":
        gpu_sync = "block" if config.workers > 1 and not config.engine_process else "spin"
    return dataclasses.replace(config, port=port, workers=1, reuse_port=True, metrics_port=None, gpu_sync=gpu_sync)


def _worker_main(config: ServerConfig) -> None:
    """A worker process (spawned: PROMETHEUS_MULTIPROC_DIR is set before prometheus_client is imported)."""
    from realtime_qa.services.cli import run_server
    from realtime_qa.services.logctx import configure_logging

    configure_logging(config.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into one SIGTERM per worker
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the server handles it (token reload), not fatal
    try:
        code = run_server(config)
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


def serve_merged_metrics(host: str, port: int, directory: Path) -> tuple[Any, int]:
    """Serve the workers' merged samples at http://host:port/metrics; returns (server, bound port)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_address[1])


def run_workers(config: ServerConfig) -> int:
    """Run `config.workers` worker processes until SIGTERM/SIGINT; returns the exit code."""
    from realtime_qa.services.server import default_engine_specs

    if not config.engines:  # resolve (and build, once) the default engine before the workers race for it
        config = dataclasses.replace(config, engines=default_engine_specs(config.precision))
    own_dir = MULTIPROC_ENV not in os.environ
    directory = Path(os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="qa-serve-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):  # samples of an earlier run would be merged in otherwise
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    metrics_server = None
    workers: list[Any] = []
    engine_hosts: list[Any] = []  # --engine-process: one process per engine directory, started before the workers
    socket_dir: Path | None = None
    signal.signal(signal.SIGHUP, lambda *_: _signal_all(workers, signal.SIGHUP))  # each re-reads its token file
    try:
        with reserved_port(config.host, config.port) as port:
            if config.metrics_port is not None:
                metrics_server, metrics_port = serve_merged_metrics(config.metrics_host, config.metrics_port, directory)
                log.info("metrics on http://%s:%d/metrics (merged over %d workers)", config.metrics_host,
                         metrics_port, config.workers)  # fmt: skip
            context = multiprocessing.get_context("spawn")
            if config.engine_process:
                socket_dir = Path(tempfile.mkdtemp(prefix="qa-serve-engines-"))  # mode 0700
                addresses = start_engine_hosts(context, config, engine_hosts, socket_dir, stop)
                config = dataclasses.replace(config, remote_engines=addresses)
            for index in range(config.workers):
                worker = context.Process(
                    target=_worker_main, args=(worker_config(config, port),), name=f"qa-serve-worker-{index}"
                )
                worker.start()
                workers.append(worker)
            log.info("qa-serve: %d workers sharing port %d", config.workers, port)
            code = _supervise([*workers, *engine_hosts], stop)
    except StoppedDuringStart:
        log.info("signal received while the engine processes were loading: stopping")
        code = 0
    except EngineHostError as exc:
        log.error("cannot serve: %s", exc)
        code = EXIT_ENGINE
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        code = 1
    finally:
        _stop_all(workers, config.grace_s + STOP_MARGIN_S)
        _stop_engine_hosts(engine_hosts)
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
    return code


class EngineHostError(Exception):
    """An engine process could not load its engine or open its socket (the message is the one line)."""


class StoppedDuringStart(Exception):  # noqa: N818 - reads as what happened
    """SIGTERM or SIGINT arrived while the engine processes were loading."""


def start_engine_hosts(
    context: Any, config: ServerConfig, hosts: list[Any], socket_dir: Path, stop: threading.Event
) -> tuple[EngineAddress, ...]:
    """Start one engine process per engine directory (appended to `hosts` as they start; sockets in
    `socket_dir`, which only this user may enter) and wait until each has loaded and warmed its engine;
    returns the addresses the workers connect to."""
    from realtime_qa.qacore.bundle import decoder_defaults
    from realtime_qa.qacore.engine import EngineMeta
    from realtime_qa.services.engine_host import EngineHostConfig, host_main
    from realtime_qa.services.server import engine_options

    options = engine_options(config)  # "auto" spins here: the engine process is the GPU's only user
    addresses = []
    for index, spec in enumerate(config.engines):
        address = EngineAddress(spec.engine_dir, str(socket_dir / f"engine-{index}.sock"), os.urandom(32))
        answer_length = None
        if config.span_search:
            answer_length = decoder_defaults(EngineMeta.read(spec.engine_dir)).max_answer_length
        ready, ready_child = context.Pipe(duplex=False)
        host_config = EngineHostConfig(address, options, answer_length, config.engine_contexts, spec.model_id)
        host = context.Process(
            target=host_main,
            args=(host_config, ready_child),
            name=f"qa-serve-engine-{index}",
        )
        host.start()
        ready_child.close()
        hosts.append(host)
        while not ready.poll(0.2):  # loading can take minutes (a GPU engine captures its graphs): stay stoppable
            if stop.is_set():
                raise StoppedDuringStart
        try:
            status = ready.recv()
        except EOFError:  # it died before reporting (killed, out of memory, a crash in native code)
            host.join(5)
            status = f"the engine process exited with {host.exitcode}"
        if status != "ok":
            raise EngineHostError(f"{spec.engine_dir}: {status}")
        addresses.append(address)
        log.info("engine process %s (pid %s) holds %s", host.name, host.pid, spec.engine_dir)
    return tuple(addresses)


def _stop_engine_hosts(hosts: list[Any]) -> None:
    """After the workers: they drained through the engine processes, which hold no state of their own."""
    for host in hosts:
        if host.is_alive():
            host.terminate()
        host.join(STOP_MARGIN_S)
        if host.is_alive():
            host.kill()
            host.join()


def _supervise(workers: list[Any], stop: threading.Event) -> int:
    """Wait for a stop signal (0) or for a worker (or an engine process) to exit on its own (1)."""
    while not stop.is_set():
        ended = wait([worker.sentinel for worker in workers], timeout=0.2)
        if ended:
            for worker in workers:
                if worker.sentinel in ended:
                    worker.join(5)  # its sentinel closes a moment before its exit status can be read
                    log.error("%s (pid %s) exited with %s: stopping all workers", worker.name, worker.pid,
                              worker.exitcode)  # fmt: skip
            return 1
    log.info("signal received: stopping %d workers", len(workers))
    return 0


def _signal_all(workers: list[Any], signum: int) -> None:
    for worker in workers:
        if worker.is_alive() and worker.pid is not None:
            os.kill(worker.pid, signum)


def _stop_all(workers: list[Any], timeout_s: float) -> None:
    from prometheus_client import multiprocess

    _signal_all(workers, signal.SIGTERM)
    for worker in workers:
        worker.join(timeout_s)
        if worker.is_alive():
            log.warning("worker %s did not stop within %.0f s: killing it", worker.name, timeout_s)
            worker.kill()
            worker.join()
        if worker.pid is not None:
            multiprocess.mark_process_dead(worker.pid)
