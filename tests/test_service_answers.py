"""The QA service answers over unary calls and bidirectional streams, as a direct QuestionAnswerer would."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from answers import assert_same_best
from realtime_qa.pipeline.client import (
    Answer,
    AnswerFailure,
    AnswerOptions,
    ClientConfig,
    QAClient,
    Question,
    RetryPolicy,
)
from realtime_qa.qacore.answerer import QuestionAnswerer
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.logctx import RequestIdFilter
from realtime_qa.services.server import QAServer

PASSAGE = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
    "their leader Rollo, agreed to swear fealty to King Charles III of West Francia."
)
NO_RETRY = ClientConfig(retry=RetryPolicy(max_attempts=1))

pytestmark = pytest.mark.asyncio(loop_scope="module")  # the loop of the module's shared server


@pytest.fixture(scope="module")
def reference(engine_dir: Path) -> Iterator[QuestionAnswerer]:
    with QuestionAnswerer.from_engine_dir(engine_dir) as answerer:
        yield answerer


AROUND_ANSWER_CHARS = 150


@pytest.fixture(scope="module")
def squad_questions(squad_dir: Path) -> list[tuple[str, str]]:
    """The first 200 dev questions, each with the part of its paragraph around the answer (whole words,
    ~300 characters): a real question and passage each, at half the engine time of whole paragraphs."""
    dataset = read_dataset(squad_dir / "dev-v1.1.json.gz")
    pairs = []
    for paragraph, question in dataset.questions(limit=200):
        context, answer = paragraph.context, question.answers[0]
        end = answer.answer_start + len(answer.text)
        low = context.rfind(" ", 0, max(0, answer.answer_start - AROUND_ANSWER_CHARS)) + 1
        high = context.find(" ", end + AROUND_ANSWER_CHARS)
        pairs.append((question.question, context[low : high if high >= 0 else len(context)]))
    return pairs


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(engine_dir: Path) -> AsyncIterator[QAServer]:
    """One server for the module's tests (each reads only its own answers, and the batcher's counters are
    compared before and after): starting one per test cost more than most of the tests."""
    async with QAServer(ServerConfig(port=0, engines=(EngineSpec(engine_dir),), grace_s=2.0)) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def client(server: QAServer) -> AsyncIterator[QAClient]:
    async with QAClient(server.target, NO_RETRY) as client:
        yield client


def assert_same_answer(served: Answer, question: str, passage: str, reference: QuestionAnswerer) -> None:
    assert_same_best(served, reference.answer(question, passage).prediction, passage)


async def test_unary_answer_matches_the_direct_answerer(client: QAClient, reference: QuestionAnswerer) -> None:
    question = "Who was the Norse leader?"
    answer = await client.answer(question, PASSAGE)
    assert_same_answer(answer, question, PASSAGE, reference)
    assert answer.model_id == reference.engine.meta.model_id
    assert answer.engine == f"{reference.engine.meta.backend}-{reference.engine.meta.precision}"
    assert len(answer.nbest) == reference.decoder_config.n_best_size
    assert answer.nbest[0] == answer.best
    assert not answer.abstained
    timings = answer.timings
    assert timings.infer_ns > 0 and timings.tokenize_ns > 0 and timings.decode_ns > 0
    assert timings.total_ns >= timings.queue_ns + timings.tokenize_ns + timings.infer_ns + timings.decode_ns


async def test_options_change_the_search(client: QAClient) -> None:
    answer = await client.answer("Who was the Norse leader?", PASSAGE, options=AnswerOptions(n_best_size=3))
    assert len(answer.nbest) == 3
    short = await client.answer("Who was the Norse leader?", PASSAGE, options=AnswerOptions(max_answer_length=3))
    assert short.nbest and all(len(span.text.split()) <= 3 for span in short.nbest)
    abstaining = await client.answer(
        "Who was the Norse leader?", PASSAGE, options=AnswerOptions(allow_null=True, null_threshold=-1e6)
    )
    assert abstaining.abstained and abstaining.best is None and abstaining.text == ""
    assert 0.0 < abstaining.null_probability <= 1.0


async def test_a_stored_passage_is_answered_by_id(client: QAClient, reference: QuestionAnswerer) -> None:
    stored = await client.put_passage(PASSAGE)
    assert stored.num_tokens == len(reference.featurizer.encode_passage(PASSAGE))
    assert stored.num_windows == 1
    question = "To whom did the Norse swear fealty?"
    answer = await client.answer(question, passage_id=stored.passage_id)
    assert_same_answer(answer, question, PASSAGE, reference)
    assert answer.passage_id == stored.passage_id
    # A passage sent inline is kept too: its id comes back and works for the next question.
    inline = await client.answer("Who was the Norse leader?", PASSAGE + " Rollo died in 930.")
    again = await client.answer("When did Rollo die?", passage_id=inline.passage_id)
    assert again.passage_id == inline.passage_id


async def test_long_passage_is_answered_across_windows(client: QAClient, reference: QuestionAnswerer) -> None:
    filler = " ".join(f"Sentence number {i} says nothing of interest about anyone." for i in range(40))
    passage = f"{filler} {PASSAGE} {filler}"
    stored = await client.put_passage(passage)
    assert stored.num_windows > 3
    question = "Who was the Norse leader?"
    assert_same_answer(await client.answer(question, passage_id=stored.passage_id), question, passage, reference)


async def test_stream_answers_interleaved_questions(client: QAClient, reference: QuestionAnswerer) -> None:
    other = "Rollo's descendants ruled Normandy for centuries. William the Conqueror invaded England in 1066."
    async with client.open_stream(timeout_s=30) as stream:
        await stream.send(Question("Who was the Norse leader?", PASSAGE, request_id="a"))
        await stream.send(Question("Who invaded England?", other, request_id="b"))
        first, second = await stream.receive(), await stream.receive()
        assert first is not None and second is not None  # the server has not ended the stream
        assert {first.request_id, second.request_id} == {"a", "b"}
        # The stream stays open across questions: ask more after the first answers came back.
        await stream.send(Question("When did the invasion happen?", other, request_id="c"))
        await stream.send(Question("", other, request_id="bad"))
        await stream.send(Question("What region took the Normans' name?", PASSAGE, request_id="d"))
        await stream.done_sending()
        rest = [result async for result in stream]
    by_tag = {result.request_id: result for result in rest}
    assert set(by_tag) == {"c", "bad", "d"}
    failure = by_tag["bad"]
    assert isinstance(failure, AnswerFailure) and failure.code.name == "INVALID_ARGUMENT"
    for tag, question, passage in (
        ("c", "When did the invasion happen?", other),
        ("d", "What region took the Normans' name?", PASSAGE),
    ):
        answer = by_tag[tag]
        assert isinstance(answer, Answer)
        assert_same_answer(answer, question, passage, reference)


async def test_answer_stream_over_an_iterable(client: QAClient, reference: QuestionAnswerer) -> None:
    questions = ["Who was the Norse leader?", "Where is Normandy?", "Who were the Normans descended from?"]
    results = [result async for result in client.answer_stream(Question(q, PASSAGE) for q in questions)]
    assert sorted(result.request_id for result in results) == ["0", "1", "2"]
    for result in results:
        assert isinstance(result, Answer)
        question = questions[int(result.request_id)]
        assert_same_answer(result, question, PASSAGE, reference)


@pytest.mark.slow
async def test_200_concurrent_clients_get_the_direct_answers(
    server: QAServer, reference: QuestionAnswerer, squad_questions: list[tuple[str, str]]
) -> None:
    expected = reference.answer_many(squad_questions)
    batcher = next(iter(server.models)).batcher
    batches_before, windows_before = batcher.stats.batches, batcher.stats.run_windows
    clients = [QAClient(server.target, NO_RETRY) for _ in squad_questions]
    try:
        answers = await asyncio.gather(
            *(
                client.answer(question, passage, timeout_s=120)
                for client, (question, passage) in zip(clients, squad_questions, strict=True)
            )
        )
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    mismatches = [
        (question, answer.text, result.prediction.text)
        for (question, _), answer, result in zip(squad_questions, answers, expected, strict=True)
        if result.prediction.best is None
        or answer.best is None
        or (answer.best.start, answer.best.end) != (result.prediction.best.start, result.prediction.best.end)
    ]
    assert not mismatches
    # The batcher combined windows of different clients into shared engine calls.
    assert batcher.stats.batches - batches_before < batcher.stats.run_windows - windows_before


async def test_models_are_listed_and_described(client: QAClient, reference: QuestionAnswerer) -> None:
    models = await client.list_models()
    assert len(models) == 1
    model = models[0]
    meta = reference.engine.meta
    assert model.is_default and model.ready
    assert (model.model_id, model.backend, model.precision) == (meta.model_id, meta.backend, meta.precision)
    # What the server batches (the batcher's 16 by default), not the engine's own maximum (32).
    assert model.max_batch_size == min(meta.max_batch_size, 16)
    assert model.sequence_lengths == meta.sequence_lengths
    assert model.max_seq_length == reference.featurizer.config.max_seq_length
    assert model.model_card == meta.model_card
    assert await client.model_info(model.model_id) == model
    assert await client.model_info() == model


async def test_two_models_are_served_side_by_side(engine_dir: Path) -> None:
    config = ServerConfig(port=0, engines=(EngineSpec(engine_dir, "first"), EngineSpec(engine_dir, "second")))
    async with QAServer(config) as server, QAClient(server.target, NO_RETRY) as client:
        assert [model.model_id for model in await client.list_models()] == ["first", "second"]
        assert [m.is_default for m in await client.list_models()] == [True, False]
        default = await client.answer("Who was the Norse leader?", PASSAGE)
        second = await client.answer("Who was the Norse leader?", PASSAGE, model_id="second")
        assert (default.model_id, second.model_id) == ("first", "second")
        assert default.text == second.text


class RecordingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_request_id_from_metadata_is_in_every_log_line(server: QAServer) -> None:
    handler = RecordingHandler()
    logger = logging.getLogger("realtime_qa.services")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        async with QAClient(server.target, NO_RETRY) as client:
            await client.answer("Who was the Norse leader?", PASSAGE, request_id="trace-me-42")
            with pytest.raises(Exception, match="question is empty"):
                await client.answer("", PASSAGE, request_id="trace-me-43")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    request_ids = {record.request_id for record in handler.records}  # type: ignore[attr-defined]
    assert {"trace-me-42", "trace-me-43"} <= request_ids
    failure = [r for r in handler.records if "question is empty" in r.getMessage()]
    assert failure and all(record.request_id == "trace-me-43" for record in failure)  # type: ignore[attr-defined]
