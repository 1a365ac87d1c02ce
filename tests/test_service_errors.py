"""Every bad input, overload, deadline and cancellation gets the documented gRPC status from a real server."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from realtime_qa.pipeline.client import (
    Answer,
    AnswerFailure,
    AnswerOptions,
    ClientConfig,
    QAClient,
    QAClientError,
    Question,
    RetryPolicy,
)
from realtime_qa.qacore.decoding import DecoderConfig
from realtime_qa.qacore.errors import EngineError, InvalidInputError
from realtime_qa.services.batcher import Batcher, BatcherConfig
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.convert import request_from_pb
from realtime_qa.services.errors import BatchFailedError, QueueFullError, status_of
from realtime_qa.services.server import QAServer
from waiting import wait_until

from realtime_qa.qa.v1 import qa_pb2, qa_pb2_grpc

PASSAGE = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway."
)
LONG_PASSAGE = " ".join([PASSAGE] * 40)  # about 16 windows
NO_RETRY = ClientConfig(retry=RetryPolicy(max_attempts=1), timeout_s=60)
Code = grpc.StatusCode


def make_config(engine_dir: Path, **changes: object) -> ServerConfig:
    return ServerConfig(port=0, engines=(EngineSpec(engine_dir),), grace_s=5.0, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def server(engine_dir: Path) -> AsyncIterator[QAServer]:
    async with QAServer(make_config(engine_dir, max_message_bytes=64 * 1024)) as server:
        yield server


@pytest.fixture
async def client(server: QAServer) -> AsyncIterator[QAClient]:
    async with QAClient(server.target, NO_RETRY) as client:
        yield client


def batcher_of(server: QAServer) -> Batcher:
    return next(iter(server.models)).batcher


async def wait_idle(batcher: Batcher) -> None:
    await wait_until(lambda: batcher.depth == 0 and batcher.busy_contexts == 0, 10)


async def status_of_call(client: QAClient, question: Question) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(QAClientError) as failure:
        await client.answer(question)
    return failure.value.code, failure.value.message


@pytest.mark.parametrize(
    ("question", "message"),
    [
        (Question("", PASSAGE), "question is empty"),
        (Question("   ", PASSAGE), "question is empty"),
        (Question("x" * 4097, PASSAGE), "question has 4,097 characters"),
        (Question("Who?", ""), "passage is empty"),
        (Question("Who?"), "neither passage nor passage_id"),
        (Question("Who?", passage_id=""), "passage_id is empty"),
        (Question("Who?", PASSAGE, model_id="m" * 129), "model_id has 129 characters; the limit is 128"),
        (Question("Who?", passage_id="p" * 129), "passage_id has 129 characters; the limit is 128"),
        (Question("Who?", PASSAGE, request_id="r" * 129), "request_id has 129 characters"),
        (Question("Who?", "x" * 40_000 + " y" * 20_000), "exceeds the limit of 65,536"),
        (Question("Who?", PASSAGE, options=AnswerOptions(n_best_size=0)), "n_best_size must be in [1, 100]"),
        (Question("Who?", PASSAGE, options=AnswerOptions(n_best_size=101)), "n_best_size must be in [1, 100]"),
        (Question("Who?", PASSAGE, options=AnswerOptions(max_answer_length=0)), "max_answer_length must be in"),
        (Question("Who?", PASSAGE, options=AnswerOptions(max_answer_length=513)), "max_answer_length must be in"),
        (Question("Who?", PASSAGE, options=AnswerOptions(null_threshold=math.nan)), "null_threshold must be"),
        (Question("Who?", PASSAGE, options=AnswerOptions(null_threshold=math.inf)), "null_threshold must be"),
        (Question("Who?", PASSAGE, options=AnswerOptions(timeout_ms=0)), "timeout_ms must be in [1, 600000]"),
        (Question("Who?", PASSAGE, options=AnswerOptions(timeout_ms=600_001)), "timeout_ms must be in"),
    ],
)
async def test_bad_input_is_invalid_argument(client: QAClient, question: Question, message: str) -> None:
    code, details = await status_of_call(client, question)
    assert code == Code.INVALID_ARGUMENT
    assert message in details


async def test_bad_input_on_a_stream_fails_only_that_question(client: QAClient) -> None:
    questions = [
        Question("Who?", PASSAGE, options=AnswerOptions(n_best_size=0)),
        Question("Who were the Normans?", PASSAGE),
        Question("Who?", passage_id="p-unknown"),
    ]
    results = {result.request_id: result async for result in client.answer_stream(questions)}
    assert isinstance(results["0"], AnswerFailure) and results["0"].code == Code.INVALID_ARGUMENT
    assert isinstance(results["1"], Answer) and results["1"].text
    assert isinstance(results["2"], AnswerFailure) and results["2"].code == Code.NOT_FOUND


async def test_passage_over_the_character_limit_is_invalid_argument(engine_dir: Path) -> None:
    async with QAServer(make_config(engine_dir)) as server, QAClient(server.target, NO_RETRY) as client:
        code, details = await status_of_call(client, Question("Who?", "a " * 500_001))
    assert code == Code.INVALID_ARGUMENT
    assert "limit is 1,000,000" in details


async def test_message_beyond_the_transport_limit_is_resource_exhausted(client: QAClient) -> None:
    # Up to twice the configured limit the service answers INVALID_ARGUMENT itself (above); gRPC
    # refuses anything larger before it reaches the service (documented in qa.proto as the transport's
    # cut-off: do not retry).
    code, _ = await status_of_call(client, Question("Who?", "x" * 200_000))
    assert code == Code.RESOURCE_EXHAUSTED


async def test_unknown_passage_id_is_not_found(client: QAClient) -> None:
    code, details = await status_of_call(client, Question("Who?", passage_id="p-0123456789abcdef"))
    assert code == Code.NOT_FOUND
    assert "p-0123456789abcdef" in details


async def test_evicted_passage_is_not_found(engine_dir: Path) -> None:
    config = make_config(engine_dir, passage_cache_chars=len(PASSAGE) + 10)
    async with QAServer(config) as server, QAClient(server.target, NO_RETRY) as client:
        first = await client.put_passage(PASSAGE)
        await client.put_passage(PASSAGE.upper())  # evicts the first
        code, _ = await status_of_call(client, Question("Who?", passage_id=first.passage_id))
    assert code == Code.NOT_FOUND


async def test_other_calls_report_their_errors(client: QAClient) -> None:
    with pytest.raises(QAClientError) as unknown_model:
        await client.model_info("no-such-model")
    assert unknown_model.value.code == Code.NOT_FOUND
    with pytest.raises(QAClientError) as empty_passage:
        await client.put_passage("  ")
    assert empty_passage.value.code == Code.INVALID_ARGUMENT
    with pytest.raises(QAClientError) as put_unknown_model:
        await client.put_passage(PASSAGE, model_id="nope")
    assert put_unknown_model.value.code == Code.NOT_FOUND


async def test_unknown_model_is_not_found_on_every_rpc(client: QAClient) -> None:
    """One rule (qa.proto): a model_id the server has not loaded is NOT_FOUND, in Answer, AnswerStream,
    PutPassage and GetModelInfo alike."""
    code, details = await status_of_call(client, Question("Who?", PASSAGE, model_id="no-such-model"))
    assert code == Code.NOT_FOUND and "unknown model 'no-such-model'" in details
    results = [result async for result in client.answer_stream([Question("Who?", PASSAGE, model_id="no-such")])]
    assert isinstance(results[0], AnswerFailure) and results[0].code == Code.NOT_FOUND
    for call in (client.put_passage(PASSAGE, model_id="no-such"), client.model_info("no-such")):
        with pytest.raises(QAClientError) as unknown:
            await call
        assert unknown.value.code == Code.NOT_FOUND


async def test_huge_ids_are_refused_without_being_echoed(client: QAClient) -> None:
    """A 200 kB model_id or passage_id is INVALID_ARGUMENT; the details name the length, not the id."""
    for question in (Question("Who?", PASSAGE, model_id="m" * 20_000), Question("Who?", passage_id="p" * 20_000)):
        code, details = await status_of_call(client, question)
        assert code == Code.INVALID_ARGUMENT
        assert "20,000 characters" in details and len(details) < 200


async def test_grpc_deadline_is_deadline_exceeded_and_frees_the_work(engine_dir: Path) -> None:
    config = make_config(engine_dir, batcher=BatcherConfig(max_batch_size=2))
    async with QAServer(config) as server, QAClient(server.target, NO_RETRY) as client:
        with pytest.raises(QAClientError) as late:
            await client.answer("Who?", LONG_PASSAGE, timeout_s=0.05)
        batcher = batcher_of(server)
        await wait_idle(batcher)
    assert late.value.code == Code.DEADLINE_EXCEEDED
    assert batcher.stats.dropped_windows > 0
    assert batcher.stats.run_windows < batcher.stats.submitted_windows


async def test_expired_work_is_dropped_before_it_runs(server: QAServer, client: QAClient) -> None:
    batcher = batcher_of(server)
    stored = await client.put_passage(LONG_PASSAGE)
    busy = asyncio.create_task(client.answer("Who?", passage_id=stored.passage_id))
    await wait_until(lambda: batcher.busy_contexts > 0)  # the long request is in the engine
    # Queued behind the long request (16 windows of 384 tokens: a few hundred ms on the CPU engine), this one
    # cannot start within 50 ms; 50 ms (not less) so that it reaches the queue before it expires, even on a
    # loaded machine, and is dropped there rather than refused on arrival.
    code, details = await status_of_call(
        client, Question("Who were the Normans?", PASSAGE, options=AnswerOptions(timeout_ms=50))
    )
    assert code == Code.DEADLINE_EXCEEDED
    assert "deadline" in details
    assert (await busy).text
    await wait_idle(batcher)
    assert batcher.stats.dropped_windows == 1  # the late question's one window never ran
    assert batcher.stats.run_windows == batcher.stats.submitted_windows - 1


async def test_per_question_timeout_on_a_stream(client: QAClient) -> None:
    questions = [
        Question("Who?", LONG_PASSAGE, options=AnswerOptions(timeout_ms=1)),
        Question("Who were the Normans?", PASSAGE),
    ]
    results = {result.request_id: result async for result in client.answer_stream(questions)}
    assert isinstance(results["0"], AnswerFailure) and results["0"].code == Code.DEADLINE_EXCEEDED
    assert isinstance(results["1"], Answer)


async def test_queue_overflow_is_resource_exhausted(engine_dir: Path) -> None:
    config = make_config(engine_dir, batcher=BatcherConfig(max_batch_size=2, max_queue_windows=4))
    async with QAServer(config) as server, QAClient(server.target, NO_RETRY) as client:
        outcomes = await asyncio.gather(
            *(client.answer(f"Who was number {i}?", PASSAGE) for i in range(40)), return_exceptions=True
        )
    refused = [o for o in outcomes if isinstance(o, QAClientError)]
    answered = [o for o in outcomes if isinstance(o, Answer)]
    assert len(refused) + len(answered) == 40
    assert answered and refused
    assert {error.code for error in refused} == {Code.RESOURCE_EXHAUSTED}
    assert "overloaded" in refused[0].message


async def test_cancelled_stream_frees_its_work(server: QAServer, client: QAClient) -> None:
    batcher = batcher_of(server)
    stored = await client.put_passage(LONG_PASSAGE)
    stream = client.open_stream()
    for index in range(8):
        await stream.send(Question(f"Question {index}?", passage_id=stored.passage_id))
    await wait_until(lambda: batcher.stats.submitted_windows >= 8 * stored.num_windows)
    stream.cancel()  # the client goes away mid-stream
    await wait_idle(batcher)
    assert batcher.stats.dropped_windows > 0
    assert batcher.stats.run_windows < batcher.stats.submitted_windows
    assert (await client.answer("Who were the Normans?", PASSAGE)).text  # the server is fine


async def test_cancelled_unary_call_frees_its_work(engine_dir: Path) -> None:
    config = make_config(engine_dir, batcher=BatcherConfig(max_batch_size=2))
    async with QAServer(config) as server, QAClient(server.target, NO_RETRY) as client:
        batcher = batcher_of(server)
        call = asyncio.create_task(client.answer("Who?", LONG_PASSAGE))
        await wait_until(lambda: batcher.stats.submitted_windows > 0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_idle(batcher)
        assert batcher.stats.dropped_windows > 0
        assert (await client.answer("Who were the Normans?", PASSAGE)).text


async def test_requests_without_the_client_library_get_the_same_statuses(server: QAServer) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = qa_pb2_grpc.QuestionAnsweringStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Answer(qa_pb2.AnswerRequest(question="", passage=PASSAGE))
        assert bad.value.code() == Code.INVALID_ARGUMENT
        call = stub.Answer(qa_pb2.AnswerRequest(question="Who?", passage=PASSAGE), metadata=(("x-request-id", "abc"),))
        await call
        assert ("x-request-id", "abc") in tuple(await call.trailing_metadata())


def test_errors_map_to_status_codes_in_one_place() -> None:
    assert status_of(InvalidInputError("question is empty")) == (Code.INVALID_ARGUMENT, "question is empty")
    assert status_of(QueueFullError("full"))[0] == Code.RESOURCE_EXHAUSTED
    assert status_of(BatchFailedError("inference failed"))[0] == Code.INTERNAL
    assert status_of(EngineError("bad engine"))[0] == Code.INTERNAL
    code, message = status_of(RuntimeError("secret detail"))
    assert code == Code.INTERNAL and "secret" not in message and "RuntimeError" in message


def test_decoder_options_are_validated_only_when_a_request_sets_them() -> None:
    """A request without options answers with the model's decoder config itself (no per-question copy); any
    option, and allow_null differing from the model's default, makes a validated copy."""
    base = DecoderConfig(null_threshold=1.5)
    plain = request_from_pb(qa_pb2.AnswerRequest(question="Who?", passage=PASSAGE))
    assert plain.decoder_config(base) is base
    assert plain.decoder_config(replace(base, allow_null=True)) == base  # the request's allow_null (False) wins
    for options, changed in (
        (qa_pb2.AnswerOptions(n_best_size=3), {"n_best_size": 3}),
        (qa_pb2.AnswerOptions(max_answer_length=7), {"max_answer_length": 7}),
        (qa_pb2.AnswerOptions(allow_null=True), {"allow_null": True}),
        (qa_pb2.AnswerOptions(null_threshold=0.0), {"null_threshold": 0.0}),
    ):
        query = request_from_pb(qa_pb2.AnswerRequest(question="Who?", passage=PASSAGE, options=options))
        assert query.decoder_config(base) == replace(base, **changed)
    huge = request_from_pb(qa_pb2.AnswerRequest(question="Who?", passage=PASSAGE, options={"n_best_size": 1000}))
    with pytest.raises(InvalidInputError, match="n_best_size"):
        huge.decoder_config(base)


class _FailingWrites:
    """A stream's servicer context whose transport refuses every write (as a broken one would), for the session's
    own handling of it; everything before the write is the real service."""

    def __init__(self) -> None:
        self.writes = 0

    def time_remaining(self) -> None:
        return None

    async def write(self, message: qa_pb2.AnswerResponse) -> None:
        self.writes += 1
        raise RuntimeError("the transport refused the write")


async def test_a_failed_write_ends_the_stream_with_it_and_stops_reading(server: QAServer) -> None:
    from realtime_qa.services.qa_service import StreamSession

    read = 0
    blocked = asyncio.Event()

    async def questions() -> AsyncIterator[qa_pb2.AnswerRequest]:
        nonlocal read
        for index in range(3):
            read += 1
            yield qa_pb2.AnswerRequest(request_id=str(index), question="Where is Normandy?", passage=PASSAGE)
        blocked.set()
        await asyncio.Event().wait()  # a client that sends nothing more and never half-closes

    context = _FailingWrites()
    session = StreamSession(server.service, "failing-writes", context)
    with pytest.raises(RuntimeError, match="refused the write"):
        await asyncio.wait_for(session.run(questions()), 60)  # the read waiting on the silent client is interrupted
    assert read == 3 and blocked.is_set()
    assert context.writes == 1  # after the first failure no other answer is written
    assert session.written == 0 and session not in server.service.streams
    async with asyncio.timeout(30):  # the other questions' tasks were cancelled
        while session.pending:
            await asyncio.sleep(0.01)


async def test_stream_questions_start_eagerly_where_python_has_eager_tasks() -> None:
    """`start_task` runs a question's coroutine up to its first wait before returning on Python 3.12+ (`make test`
    runs the stream tests under 3.12 too), and one loop turn later on 3.11."""
    import sys

    from realtime_qa.services.qa_service import EAGER_TASKS, start_task

    assert (sys.version_info >= (3, 12)) == EAGER_TASKS
    steps: list[str] = []

    async def question() -> None:
        steps.append("tokenized and queued")
        await asyncio.sleep(0)
        steps.append("answered")

    task = start_task(question())
    steps.append("next read")
    await asyncio.wait_for(task, 10)
    first = ["tokenized and queued", "next read"] if EAGER_TASKS else ["next read", "tokenized and queued"]
    assert steps == [*first, "answered"]
