"""The latency-budget dashboard: an aiohttp server on the chain's own event loop.

Routes (all GET):

* `/`             the page (pipeline/static/: HTML, CSS and a small script that draws plain SVG; nothing
                  is fetched from outside the server)
* `/api/latency`  `LatencyBoard.snapshot()` as JSON
* `/api/events`   server-sent events: one `latency` event with the snapshot after new turns, at most
                  every `push_interval_s`; a comment line every `keepalive_s` while idle
* `/metrics`      the board's Prometheus registry (text exposition format)
* `/healthz`      `ok`

Every SSE client gets a small bounded queue. The broadcaster never waits for a client: when a client's
queue is full, its oldest snapshot is dropped (it only ever needs the newest); a client that stays
full for `stall_limit` pushes in a row, or whose connection fails, is dropped. At most `max_clients`
streams are open at once; more get 503.

    board = LatencyBoard()
    server = await start_dashboard(board, port=8080)
    print(server.url)
    ...
    await server.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from realtime_qa.pipeline.board import LatencyBoard

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True)
class DashboardConfig:
    push_interval_s: float = 0.25  # at most this often a snapshot is pushed to SSE clients
    keepalive_s: float = 15.0  # idle streams get a comment line this often (proxies, dead-peer detection)
    client_queue: int = 2  # snapshots waiting per SSE client
    stall_limit: int = 40  # pushes in a row that found a client's queue full before it is dropped
    max_clients: int = 32  # concurrent SSE streams


class _Client:
    """One SSE stream: its bounded queue and how often in a row it was found full."""

    def __init__(self, size: int, handler: asyncio.Task[object] | None) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=size)
        self.stalls = 0
        self.handler = handler  # cancelled to drop the client, even while it waits on a full socket

    def drop(self) -> None:
        if self.handler is not None:
            self.handler.cancel()

    def offer(self, message: bytes, stall_limit: int) -> None:
        if self.queue.full():
            self.stalls += 1
            if self.stalls >= stall_limit:
                log.info("dropping a stalled dashboard event stream")
                self.drop()
                return
            self.queue.get_nowait()  # the newest snapshot replaces the oldest
        else:
            self.stalls = 0
        self.queue.put_nowait(message)


class DashboardServer:
    """A running dashboard: `.port`, `.url`, `await stop()`."""

    def __init__(self, board: LatencyBoard, config: DashboardConfig | None = None) -> None:
        self.board = board
        self.config = config or DashboardConfig()
        self.port: int | None = None
        self.host = "127.0.0.1"
        self._clients: set[_Client] = set()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._cached: tuple[int, float, dict[str, Any]] | None = None  # (board version, monotonic time, snapshot)
        self._broadcaster: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("dashboard is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def clients(self) -> int:
        return len(self._clients)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/api/latency", self._latency)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
        return app

    async def start(self, host: str, port: int) -> None:
        # handler_cancellation: a client that disconnects cancels its handler, so dead streams leave at once.
        runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0, handler_cancellation=True
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}") from None
        self._runner = runner
        self.host = host
        self.port = int(runner.addresses[0][1])
        self.board.add_listener(self._changed.set)
        self._broadcaster = asyncio.create_task(self._broadcast(), name="dashboard-broadcast")
        log.info("latency dashboard on %s", self.url)

    async def stop(self) -> None:
        """Close every stream and the listener (idempotent)."""
        self.board.remove_listener(self._changed.set)
        for client in tuple(self._clients):
            client.drop()
        if self._broadcaster is not None:
            self._broadcaster.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._broadcaster
            self._broadcaster = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def snapshot(self) -> dict[str, Any]:
        """The board's snapshot, computed at most once per `push_interval_s` while no turn arrives, so a
        flood of page loads or polls costs the event loop little."""
        now = time.monotonic()
        cached = self._cached
        if cached is not None and cached[0] == self.board.version and now - cached[1] < self.config.push_interval_s:
            return cached[2]
        snapshot = self.board.snapshot()
        self._cached = (self.board.version, now, snapshot)
        return snapshot

    # -- routes --------------------------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _latency(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot(), headers={"Cache-Control": "no-store"})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.board.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if len(self._clients) >= self.config.max_clients:
            raise web.HTTPServiceUnavailable(text=f"at most {self.config.max_clients} event streams\n")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        client = _Client(self.config.client_queue, asyncio.current_task())
        self._clients.add(client)
        try:
            await response.write(b"retry: 2000\n" + _event(self.snapshot()))
            while True:
                message = await self._next(client)
                await response.write(message if message is not None else b": keepalive\n\n")
        except ConnectionError:
            pass  # the client went away mid-write (a clean disconnect cancels this handler instead)
        finally:
            self._clients.discard(client)
        return response

    async def _next(self, client: _Client) -> bytes | None:
        """The client's next snapshot, or None after `keepalive_s` without one."""
        try:
            async with asyncio.timeout(self.config.keepalive_s):
                return await client.queue.get()
        except TimeoutError:
            return None

    async def _broadcast(self) -> None:
        """Push the newest snapshot to every client after a change, at most every `push_interval_s`."""
        last = 0.0
        while True:
            await self._changed.wait()
            wait_s = last + self.config.push_interval_s - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)  # throttle: turns arriving meanwhile join this push
            self._changed.clear()
            last = time.monotonic()
            if not self._clients:
                continue
            try:
                message = _event(self.snapshot())
            except Exception:  # a bug here must not end the pushes for good
                log.exception("cannot build the dashboard snapshot")
                continue
            for client in tuple(self._clients):
                client.offer(message, self.config.stall_limit)


def _event(snapshot: dict[str, object]) -> bytes:
    data = json.dumps(snapshot, separators=(",", ":"), allow_nan=False)
    return f"event: latency\nid: {snapshot['version']}\ndata: {data}\n\n".encode()


async def start_dashboard(
    board: LatencyBoard, host: str = "127.0.0.1", port: int = 8080, config: DashboardConfig | None = None
) -> DashboardServer:
    """Serve the board's dashboard on host:port (port 0 picks a free one) on the running event loop."""
    server = DashboardServer(board, config)
    await server.start(host, port)
    return server
