"""A port that cannot be bound is a one-line start-up error, not a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from services.config import EngineSpec, ServerConfig
from services.server import QAServer


async def test_port_in_use_is_an_os_error_naming_the_address(engine_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = QAServer(ServerConfig(port=port, engines=(EngineSpec(engine_dir),)))
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await server.start()
        await server.stop(0)
