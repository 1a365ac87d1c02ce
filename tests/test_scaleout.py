"""Scale-out with real processes on loopback: three `qa-serve` replicas sharing a Redis passage store behind
Debian's nginx running the repo's configuration (deploy/nginx/), load from the project's load generator,
one replica killed mid-run; and `qa-serve --workers 2` on one port with merged metrics."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from deploy_support import (
    BIN,
    LISTENING,
    METRICS,
    Process,
    sample_sum,
    scrape,
    spawn,
    start_nginx,
    start_redis,
    start_replica,
    wait_for,
    wait_serving,
)
from realtime_qa.benchmarks.serve_bench import DEFAULT_SQUAD, ServeBenchConfig, closed_loop, load_questions, sender
from realtime_qa.pipeline.client import (
    Answer,
    AnswerFailure,
    ClientConfig,
    QAClient,
    QAClientError,
    Question,
    RetryPolicy,
)
from waiting import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("nginx") is None or shutil.which("redis-server") is None,
        reason="needs Debian's nginx and redis-server",
    ),
]

REPLICAS = 3
SPREAD_LOAD_S = 1.5  # closed-loop load through nginx, 6 callers: dozens of calls at least, spread over 3 replicas
# The second run: the victim is frozen once calls flow, killed once a call is stuck on it (about 1.5 s in),
# and the run goes on after that; calls stuck on it past the run's end are still awaited (and fail).
KILL_LOAD_S = 3.0
NO_RETRY = ClientConfig(retry=RetryPolicy(max_attempts=1), timeout_s=30)
CALL_TIMEOUT_S = 30.0


def answered(replica: Process) -> float:
    assert replica.metrics_port is not None
    return sample_sum(scrape(replica.metrics_port), "qa_stage_latency_seconds_count", stage="end_to_end")


@pytest.fixture
def cluster(engine_dir: Path, tmp_path: Path) -> Iterator[tuple[list[Process], Process, Process]]:
    """(replicas, nginx, redis), all stopped afterwards."""
    started: list[Process] = []
    try:
        redis = start_redis(tmp_path / "redis")
        started.append(redis)
        store = f"redis://127.0.0.1:{redis.port}/0"
        replicas = []
        for index in range(REPLICAS):
            replica = start_replica(f"qa-{index}", tmp_path / f"qa-{index}", engine_dir, "--passage-store", store,
                                    "--intra-op-threads", "1")  # fmt: skip
            started.append(replica)
            replicas.append(replica)
        wait_serving(replicas)
        nginx = start_nginx(tmp_path / "nginx", [f"127.0.0.1:{replica.port}" for replica in replicas])
        started.append(nginx)
        yield replicas, nginx, redis
    finally:
        for process in reversed(started):
            process.stop(timeout_s=20)


def squad_questions(count: int) -> list[Question]:
    if not DEFAULT_SQUAD.is_file():
        pytest.skip(f"SQuAD dev set missing at {DEFAULT_SQUAD}")
    return [Question(question, passage) for question, passage in load_questions(DEFAULT_SQUAD, count)]


async def test_load_spreads_a_killed_replica_fails_only_its_calls_and_passages_work_everywhere(
    cluster: tuple[list[Process], Process, Process],
) -> None:
    replicas, nginx, _redis = cluster
    through_nginx = f"127.0.0.1:{nginx.port}"
    questions = squad_questions(60)
    async with QAClient(through_nginx, NO_RETRY) as client:
        await client.wait_ready(60)

        # 1. Load through nginx with the project's load generator spreads over every replica.
        before = [answered(replica) for replica in replicas]
        load = ServeBenchConfig(duration_s=SPREAD_LOAD_S, warmup_s=0.0, timeout_s=CALL_TIMEOUT_S)
        async with sender(client, "unary", 1, CALL_TIMEOUT_S) as send:
            samples = await asyncio.wait_for(closed_loop(send, questions, 6, load), 60)
        assert set(samples.codes) == {"OK"}, samples.codes
        spread = [answered(replica) - count for replica, count in zip(replicas, before, strict=True)]
        assert all(count > 0 for count in spread), f"answers per replica: {spread}"

        # 2. PutPassage then Answer(passage_id), both through nginx, whichever replicas they reach ...
        passages = {question.passage for question in questions if question.passage}
        for passage in sorted(passages)[:6]:
            stored = await client.put_passage(passage)
            for _ in range(3):
                reply = await client.answer("What is this about?", passage_id=stored.passage_id)
                assert reply.passage_id == stored.passage_id
        # ... and on each replica directly: the shared store holds it, not the replica that took the PutPassage.
        for replica in replicas:
            async with QAClient(f"127.0.0.1:{replica.port}", NO_RETRY) as direct:
                assert (await direct.answer("What is this about?", passage_id=stored.passage_id)).passage_id
        unknown = "p-" + "0" * 32
        with pytest.raises(QAClientError) as missing:
            await client.answer("What?", passage_id=unknown)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND

        # 3. Kill one replica mid-run: its calls in flight fail with UNAVAILABLE, none hang, later calls succeed.
        victim = replicas[0]
        outstanding: dict[int, float] = {}
        finished = 0

        async with sender(client, "unary", 1, CALL_TIMEOUT_S) as send:

            async def tracked(question: Question) -> Answer | AnswerFailure:
                nonlocal finished
                key = id(asyncio.current_task())
                outstanding[key] = time.monotonic()
                try:
                    return await send(question)
                finally:
                    outstanding.pop(key, None)
                    finished += 1

            run = asyncio.create_task(
                closed_loop(tracked, questions, 6, ServeBenchConfig(duration_s=KILL_LOAD_S, warmup_s=0.0))
            )
            # The run is under way: a first round of calls came back (nginx spreads them over the replicas).
            await wait_until(lambda: finished >= 2 * REPLICAS, 30, "the first calls of the run")
            victim.popen.send_signal(signal.SIGSTOP)  # frozen: calls nginx sends it now stay in flight there

            def stuck() -> bool:
                now = time.monotonic()
                return any(now - started > 1.0 for started in outstanding.values())

            await asyncio.to_thread(wait_for, stuck, 20, "a call in flight on the frozen replica")
            victim.popen.kill()
            victim.popen.wait(10)
            samples = await asyncio.wait_for(run, 6.0 + CALL_TIMEOUT_S + 10)  # none hangs
        assert set(samples.codes) <= {"OK", "UNAVAILABLE"}, samples.codes
        assert samples.codes["UNAVAILABLE"] >= 1, samples.codes  # the calls in flight on the killed replica
        assert samples.codes["OK"] > samples.codes["UNAVAILABLE"]
        for question in questions[:10]:  # retries off: nginx itself moves unsent calls off the dead replica
            assert isinstance(await client.answer(question), Answer)
        stored = await client.put_passage(sorted(passages)[0])
        assert (await client.answer("What is this about?", passage_id=stored.passage_id)).passage_id


async def test_workers_share_one_port_and_merge_their_metrics(engine_dir: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("worker-token-1\n", encoding="utf-8")
    argv = [str(BIN / "qa-serve"), "--workers", "2", "--port", "0", "--metrics-port", "0", "--engine",
            str(engine_dir), "--max-batch-size", "1", "--intra-op-threads", "1", "--grace-s", "2",
            "--auth-token-file", str(token_file)]  # fmt: skip
    server = spawn("qa-workers", argv, tmp_path)
    try:
        metrics_port = int(server.wait_log(METRICS, 60).group(2))
        wait_for(lambda: len(re.findall(r"serving .* after", server.log_text())) >= 2, 120, "both workers")
        ports = {int(match.group(2)) for match in LISTENING.finditer(server.log_text())}
        assert len(ports) == 1, ports  # every worker bound the one reserved port
        (port,) = ports
        questions = squad_questions(20)
        # Several connections: the kernel spreads connections (not calls) over the workers.
        with_token = ClientConfig(retry=RetryPolicy(max_attempts=1), timeout_s=30, token="worker-token-1")
        clients = [QAClient(f"127.0.0.1:{port}", with_token) for _ in range(8)]
        try:
            for round_ in range(3):
                replies = await asyncio.gather(
                    *(client.answer(questions[(index + round_) % len(questions)]) for index, client in
                      enumerate(clients))
                )  # fmt: skip
                assert all(isinstance(reply, Answer) for reply in replies)
        finally:
            for client in clients:
                await client.close()
        text = scrape(metrics_port)
        assert sample_sum(text, "qa_stage_latency_seconds_count", stage="end_to_end") == 24  # merged over workers
        pids = set(re.findall(r'qa_latency_budget_seconds\{[^}]*pid="(\d+)"', text))
        assert len(pids) == 2, text[:2000]  # gauges are kept per worker
        # SIGHUP to the parent reaches every worker: each re-reads the token file.
        server.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: server.log_text().count("bearer tokens reloaded") == 2, 30, "both workers' token reload")
        depth_pids = set(re.findall(r'qa_queue_depth_windows\{[^}]*pid="(\d+)"', text))
        assert depth_pids == pids  # queue depths are copied into the shared files by each worker
    finally:
        code = server.stop(signal.SIGTERM, timeout_s=30)
    assert code == 0
    assert "stopping 2 workers" in server.log_text()
    assert server.log_text().count("stopped after") == 2  # each worker drained and stopped
