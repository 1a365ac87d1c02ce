"""`qa-serve --event-loop {auto,asyncio,uvloop}`: the setting, a server answering on uvloop, and the one-line error
when uvloop is asked for but not installed."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from realtime_qa.pipeline.client import ClientConfig, QAClient, RetryPolicy
from realtime_qa.services.cli import event_loop_factory, main
from realtime_qa.services.config import EngineSpec, ServerConfig, config_from_args
from realtime_qa.services.server import QAServer

PASSAGE = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
    "their leader Rollo, agreed to swear fealty to King Charles III of West Francia."
)


def test_the_setting_defaults_to_auto_and_takes_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_from_args([], environ={}).event_loop == "auto"
    uvloop = pytest.importorskip("uvloop")  # a dependency wherever it exists
    assert event_loop_factory("auto") is uvloop.new_event_loop
    monkeypatch.setitem(sys.modules, "uvloop", None)  # not installed: auto falls back to asyncio's own loop
    assert event_loop_factory("auto") is None
    assert config_from_args(["--event-loop", "uvloop"], environ={}).event_loop == "uvloop"
    assert config_from_args([], environ={"QA_SERVE_EVENT_LOOP": "uvloop"}).event_loop == "uvloop"
    with pytest.raises(SystemExit) as exited:
        config_from_args(["--event-loop", "trio"], environ={})
    assert exited.value.code == 2
    assert event_loop_factory("asyncio") is None


def test_a_server_answers_on_uvloop(engine_dir: Path) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def ask() -> tuple[str, str]:
        config = ServerConfig(port=0, engines=(EngineSpec(engine_dir),), event_loop="uvloop")
        async with QAServer(config) as server, QAClient(server.target, ClientConfig(retry=RetryPolicy(1))) as client:
            answer = await client.answer("Who was the Norse leader?", PASSAGE)
        return type(asyncio.get_running_loop()).__module__, answer.text

    with asyncio.Runner(loop_factory=event_loop_factory("uvloop")) as runner:
        loop_module, text = runner.run(ask())
    assert loop_module == uvloop.Loop.__module__
    assert text == "Rollo"


def test_uvloop_missing_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError, as when not installed
    assert main(["--event-loop", "uvloop", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "qa-serve: --event-loop uvloop needs the uvloop package: pip install 'realtime-qa[uvloop]'"
