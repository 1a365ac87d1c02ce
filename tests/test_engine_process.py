"""`qa-serve --workers N --engine-process`: the workers answer through one engine process (services/engine_host.py).

The engine process is real (spawned), the engine real (ONNX Runtime on this CPU; the GPU host runs the torch
engine the same way), and answers are compared with the in-process prediction of the same engine."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import shutil
import signal
import socket
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from answers import assert_same_best
from deploy_support import BIN, LISTENING, spawn, wait_for
from realtime_qa.pipeline.client import Answer, ClientConfig, QAClient, QAClientError, RetryPolicy
from realtime_qa.qacore.answerer import QuestionAnswerer
from realtime_qa.qacore.engine import EngineMeta
from realtime_qa.qacore.errors import EngineError
from realtime_qa.qacore.factory import EngineOptions, load_engine
from realtime_qa.services.config import EngineAddress
from realtime_qa.services.engine_host import EngineHostConfig, RemoteEngine, host_main

PASSAGE = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region "
    "in France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway."
)
QUESTIONS = ["In what country is Normandy located?", "From which countries did the Norse originate?"]
ENGINE_HOST = re.compile(r"engine process qa-serve-engine-0 \(pid (\d+)\)")
METRICS = re.compile(r"metrics on http://\S+:(\d+)/metrics")


@pytest.fixture
def host(engine_dir: Path, tmp_path: Path) -> Iterator[EngineAddress]:
    """An engine process serving `engine_dir` on a socket under tmp_path; yields its address."""
    context = multiprocessing.get_context("spawn")
    address = EngineAddress(engine_dir, str(tmp_path / "engine.sock"), os.urandom(32))
    ready, ready_child = context.Pipe(duplex=False)
    process = context.Process(
        target=host_main, args=(EngineHostConfig(address, EngineOptions(intra_op_threads=1), None), ready_child)
    )
    process.start()
    ready_child.close()
    try:
        assert ready.poll(120), "the engine process did not report within 120 s"
        assert ready.recv() == "ok"
        yield address
    finally:
        process.kill()
        process.join(10)


def test_a_remote_engine_returns_what_the_engine_returns_and_refuses_a_wrong_key(
    host: EngineAddress, engine_dir: Path
) -> None:
    with QuestionAnswerer.from_engine_dir(engine_dir) as answerer:
        inputs = answerer.featurizer.batch(answerer.featurizer.featurize(QUESTIONS[0], PASSAGE).windows)
    local = load_engine(engine_dir, EngineOptions(intra_op_threads=1))
    try:
        expected = local.infer(inputs)
    finally:
        local.close()
    stranger = EngineAddress(host.engine_dir, host.socket_path, b"not the key")
    with pytest.raises(EngineError, match="cannot reach the engine process"):
        RemoteEngine(stranger)
    silent = socket.socket(socket.AF_UNIX)  # connects and never answers the key challenge
    silent.connect(host.socket_path)
    # The process still serves: after the stranger, and beside the silent one (bounded: a wrong design hangs here).
    pool = ThreadPoolExecutor(1)
    try:
        remote = pool.submit(RemoteEngine, host).result(timeout=60)
    finally:
        pool.shutdown(wait=False)
    with silent, remote:
        assert remote.meta == EngineMeta.read(engine_dir)
        got = remote.infer(inputs)
        np.testing.assert_allclose(got.start_logits, expected.start_logits, atol=1e-4)
        np.testing.assert_allclose(got.end_logits, expected.end_logits, atol=1e-4)
        bad = type(inputs)(inputs.input_ids[:, :0], inputs.segment_ids[:, :0], inputs.input_mask[:, :0])
        with pytest.raises(EngineError):  # the engine's own refusal crosses the socket as an EngineError
            remote.infer(bad)
        assert remote.infer(inputs).start_logits.shape == expected.start_logits.shape  # and the connection lives
        mask = inputs.segment_ids == 1
        with pytest.raises(EngineError, match=r"^cannot send the engine call"):  # refused in the worker, not sent
            remote.infer_spans(inputs, mask, mask, -1)
        assert remote.infer(inputs).start_logits.shape == expected.start_logits.shape


@pytest.mark.slow
async def test_workers_answer_through_one_engine_process_and_stop_when_it_dies(
    engine_dir: Path, tmp_path: Path
) -> None:
    argv = [str(BIN / "qa-serve"), "--workers", "2", "--engine-process", "--port", "0", "--engine", str(engine_dir),
            "--intra-op-threads", "1", "--grace-s", "2", "--metrics-port", "0"]  # fmt: skip
    server = spawn("qa-engine-process", argv, tmp_path)
    try:
        host_pid = int(server.wait_log(ENGINE_HOST, 120).group(1))
        wait_for(lambda: len(re.findall(r"serving .* after", server.log_text())) >= 2, 120, "both workers")
        log = server.log_text()
        assert log.count("in the engine process") == 2  # each worker's model runs on the engine process
        assert len(re.findall(r"loading onnxruntime \S+ engine", log)) == 1  # the engine was loaded once
        (port,) = {int(match.group(2)) for match in LISTENING.finditer(log)}
        with QuestionAnswerer.from_engine_dir(engine_dir) as answerer:
            expected = [answerer.answer(question, PASSAGE).prediction for question in QUESTIONS]
        config = ClientConfig(retry=RetryPolicy(max_attempts=1), timeout_s=30)
        clients = [QAClient(f"127.0.0.1:{port}", config) for _ in range(6)]  # connections spread over workers
        try:
            replies = await asyncio.gather(
                *(client.answer(QUESTIONS[index % 2], PASSAGE) for index, client in enumerate(clients))
            )
            for index, reply in enumerate(replies):
                assert isinstance(reply, Answer)
                assert_same_best(reply, expected[index % 2], PASSAGE)
            # The engine process's batches are in the parent's merged /metrics: one window from each worker's
            # warm-up per sequence length and one per question; the workers' batchers may have grouped the questions
            # into fewer calls. A batch is counted just after its replies are sent, so the scrape waits for it.
            metrics_port = int(server.wait_log(METRICS, 10).group(1))
            meta = EngineMeta.read(engine_dir)
            warm_ups = 2 * len(meta.sequence_lengths)

            def scraped(name: str) -> float:
                text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
                found = re.search(rf'^{name}{{model="{meta.model_id}"}} (\S+)$', text, re.MULTILINE)
                return float(found.group(1)) if found else 0.0

            windows = warm_ups + 6
            wait_for(lambda: scraped("qa_engine_process_batch_windows_sum") == windows, 30, "windows in /metrics")
            assert warm_ups < scraped("qa_engine_process_calls_per_batch_sum") <= windows
            os.kill(host_pid, signal.SIGKILL)
            # The unit stops as a whole (exit 1), like when a worker dies; a call meanwhile fails, never hangs.
            with pytest.raises(QAClientError):
                for _ in range(100):
                    await clients[0].answer(QUESTIONS[0], PASSAGE)
            wait_for(lambda: server.popen.poll() is not None, 60, "the server to stop after its engine process died")
        finally:
            for client in clients:
                await client.close()
    finally:
        code = server.stop(signal.SIGTERM, timeout_s=30)
    assert code == 1
    assert "qa-serve-engine-0" in server.log_text() and "stopping all workers" in server.log_text()


def test_an_engine_the_engine_process_cannot_load_is_one_line_and_exit_3(engine_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "engine"
    shutil.copytree(engine_dir, broken)
    engine_file = broken / EngineMeta.read(broken).engine_file
    engine_file.write_bytes(engine_file.read_bytes()[:-64] + b"\0" * 64)  # corrupted: its SHA-256 no longer matches
    argv = [str(BIN / "qa-serve"), "--workers", "2", "--engine-process", "--port", "0", "--engine", str(broken)]
    server = spawn("qa-broken-engine", argv, tmp_path)
    try:
        code = server.popen.wait(120)
    finally:
        server.stop()
    assert code == 3
    errors = [line for line in server.log_text().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot load the engine" in errors[0], server.log_text()[-2000:]
    assert "qa-serve: 2 workers" not in server.log_text()  # no worker was started
