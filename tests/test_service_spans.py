"""The service answers through the same engine path as `QuestionAnswerer`: the device span search where the
engine offers it (the torch engine, run here in fp32 on the CPU with the span search's plain-torch
reference), logits decoded on the CPU otherwise; batches never mix the two kinds of engine call."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from answers import assert_fp16_answers_agree, assert_same_best

pytest.importorskip("torch")

from counting_engine import CountingEngine, PolledEngine
from realtime_qa.pipeline.client import AnswerOptions, ClientConfig, QAClient, RetryPolicy
from realtime_qa.qacore.answerer import QuestionAnswerer
from realtime_qa.qacore.backends.torch_cuda import TorchCudaEngine
from realtime_qa.qacore.bundle import decoder_defaults, featurizer_config_of, featurizer_for_engine
from realtime_qa.qacore.decoding import DecoderConfig, Prediction, decode
from realtime_qa.qacore.features import Featurizer
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.qacore.window_results import (
    SpansTable,
    decode_results,
    span_search_length,
    span_search_shapes,
)
from realtime_qa.services.batcher import Batcher, BatcherConfig
from realtime_qa.services.config import ServerConfig
from realtime_qa.services.errors import NotServingError
from realtime_qa.services.models import ModelRuntime
from realtime_qa.services.server import QAServer

SEQ_LEN = 128  # short windows: SQuAD paragraphs take several, so answers are searched across windows
NO_RETRY = ClientConfig(retry=RetryPolicy(max_attempts=1))


@pytest.fixture(scope="module")
def squad_pairs(squad_dir: Path) -> list[tuple[str, str]]:
    dataset = read_dataset(squad_dir / "dev-v1.1.json.gz")
    return [(question.question, paragraph.context) for paragraph, question in dataset.questions(limit=12)]


def short_featurizer(engine: TorchCudaEngine, engine_dir: Path) -> Featurizer:
    return featurizer_for_engine(engine, engine_dir, featurizer_config_of(engine.meta, SEQ_LEN))


def cpu_decoded(engine: TorchCudaEngine, featurizer: Featurizer, question: str, passage: str) -> Prediction:
    """The answer from the engine's logits through the vectorized CPU decoder (the path without spans)."""
    features = featurizer.featurize(question, passage)
    outputs = engine.infer(featurizer.batch(features.windows))
    return decode(features, outputs.start_logits, outputs.end_logits, decoder_defaults(engine.meta))


def same_best(got: Prediction, want: Prediction) -> None:
    assert got.best is not None and want.best is not None
    assert (got.best.text, got.best.start, got.best.end) == (want.best.text, want.best.start, want.best.end)
    assert got.best.score == pytest.approx(want.best.score, abs=1e-4)


async def test_batcher_spans_decode_to_the_answerers_answers(
    torch_fp32_engine_dir: Path, squad_pairs: list[tuple[str, str]]
) -> None:
    engine = CountingEngine(torch_fp32_engine_dir)
    featurizer = short_featurizer(engine, torch_fp32_engine_dir)
    config = decoder_defaults(engine.meta)
    length = span_search_length(engine, config)
    assert length == config.max_answer_length  # the torch engine searches spans for the default options
    answerer = QuestionAnswerer(engine, featurizer, config)  # qa-eval's and qa-assistant's path
    expected = [result.prediction for result in answerer.answer_many(squad_pairs)]
    assert engine.rows["logits"] == 0 and engine.rows[f"spans{length}"] > len(squad_pairs)  # several windows each
    batcher = Batcher([engine], featurizer, BatcherConfig(max_batch_size=8))
    batcher.start()
    try:
        features = [featurizer.featurize(question, passage) for question, passage in squad_pairs]
        results = await asyncio.gather(*(batcher.run(f.windows, span_length=length) for f in features))
        logits = await asyncio.gather(*(batcher.run(f.windows) for f in features))
    finally:
        await batcher.close()
    for feature, result, logit_result, want in zip(features, results, logits, expected, strict=True):
        assert isinstance(result.table, SpansTable)
        same_best(decode_results(feature, result.table, config), want)
        same_best(decode_results(feature, logit_result.table, config), want)
        with pytest.raises(TypeError):
            result.start_logits  # noqa: B018 - spans requests have no logits to hand out


async def test_batches_hold_one_kind_of_engine_call(
    torch_fp32_engine_dir: Path, squad_pairs: list[tuple[str, str]]
) -> None:
    engine = CountingEngine(torch_fp32_engine_dir)
    featurizer = short_featurizer(engine, torch_fp32_engine_dir)
    batcher = Batcher([engine], featurizer, BatcherConfig(max_batch_size=8, max_queue_delay_us=20_000))
    batcher.start()
    kinds = [None, 30, 12]
    try:
        features = [featurizer.featurize(question, passage) for question, passage in squad_pairs]
        requests = [(f, kinds[index % 3]) for index, f in enumerate(features)]
        results = await asyncio.gather(*(batcher.run(f.windows, span_length=kind) for f, kind in requests))
        with pytest.raises(ValueError, match="cannot search spans of up to 33 tokens"):
            batcher.submit(features[0].windows, span_length=33)  # beyond the engine's band of 32
    finally:
        await batcher.close()
    # Every request got its own kind of result, and the rows of each kind add up: no batch mixed kinds.
    for (_, kind), result in zip(requests, results, strict=True):
        assert isinstance(result.table, SpansTable) == (kind is not None)
        assert result.table.complete
    windows_of: Counter[str] = Counter()
    for feature, kind in requests:
        windows_of["logits" if kind is None else f"spans{kind}"] += len(feature.windows)
    assert engine.rows == windows_of
    assert max(rows for _, rows in engine.calls) > 1  # windows of different requests did share calls
    short = [result for (_, kind), result in zip(requests, results, strict=True) if kind == 12]
    for result in short:
        spans = result.table
        assert isinstance(spans, SpansTable)
        found = spans.starts >= 0
        assert found.any() and ((spans.ends - spans.starts + 1)[found] <= 12).all()


async def test_a_question_in_one_batch_or_split_over_several_gets_the_same_spans(
    torch_fp32_engine_dir: Path, squad_pairs: list[tuple[str, str]]
) -> None:
    """All of a question's windows in one batch (taken as the engine returned them) or spread over batches and
    among another caller's windows (copied row by row into its table): the same rows (up to the float rounding of
    other batch shapes), the same answer."""
    engine = CountingEngine(torch_fp32_engine_dir)
    featurizer = short_featurizer(engine, torch_fp32_engine_dir)
    config = decoder_defaults(engine.meta)
    length = span_search_length(engine, config)
    features = [featurizer.featurize(question, passage) for question, passage in squad_pairs[:2]]
    assert len(features[0].windows) >= 2
    tables = []
    for batch_size, together in ((8, False), (1, False), (8, True)):
        batcher = Batcher([engine], featurizer, BatcherConfig(max_batch_size=batch_size, max_queue_delay_us=20_000))
        batcher.start()
        try:
            asked = [batcher.run(f.windows, span_length=length) for f in (features if together else features[:1])]
            results = await asyncio.gather(*asked)
        finally:
            await batcher.close()
        table = results[0].table
        assert isinstance(table, SpansTable) and table.complete
        tables.append(table)
    assert engine.calls[0] == (f"spans{length}", len(features[0].windows))  # the first question took one batch
    answers = [decode_results(features[0], table, config) for table in tables]
    for table, answer in zip(tables[1:], answers[1:], strict=True):  # other batch shapes: float rounding differs
        np.testing.assert_allclose(table.logits, tables[0].logits, atol=1e-4)
        np.testing.assert_allclose(table.null_logits, tables[0].null_logits, atol=1e-4)
        same_best(answer, answers[0])


async def test_light_batches_are_launched_from_the_event_loop_and_polled(
    torch_fp32_engine_dir: Path, squad_pairs: list[tuple[str, str]]
) -> None:
    """An engine that launches its span search without waiting (the torch engine on a GPU): the batcher launches
    each batch from the event loop and polls until it is done, and reads exactly the rows the thread path reads."""
    engine = PolledEngine(torch_fp32_engine_dir, polls_needed=4)
    threaded = CountingEngine(torch_fp32_engine_dir)
    featurizer = short_featurizer(engine, torch_fp32_engine_dir)
    length = span_search_length(engine, decoder_defaults(engine.meta))
    features = [featurizer.featurize(question, passage) for question, passage in squad_pairs[:6]]
    tables = []
    for each in (engine, threaded):
        batcher = Batcher([each], featurizer, BatcherConfig(max_batch_size=4))
        batcher.start()
        try:
            results = await asyncio.gather(*(batcher.run(f.windows, span_length=length) for f in features))
        finally:
            await batcher.close()
        tables.append([result.table for result in results])
        if each is engine:
            stats = batcher.stats
    assert engine.launches == stats.polled_batches == stats.batches > 1
    assert engine.polls >= 4 * engine.launches and engine.open == 0  # every result taken, after its polls
    assert threaded.calls and not hasattr(threaded, "launches")
    for polled, thread in zip(*tables, strict=True):
        assert isinstance(polled, SpansTable) and isinstance(thread, SpansTable)
        np.testing.assert_allclose(polled.logits, thread.logits, atol=1e-4)
        np.testing.assert_array_equal(polled.starts >= 0, thread.starts >= 0)


async def test_a_backlogs_batches_run_on_the_thread_and_a_cancelled_launch_is_still_collected(
    torch_fp32_engine_dir: Path, squad_pairs: list[tuple[str, str]]
) -> None:
    """A caller with a backlog keeps the thread (its batches run at a lower CPU priority there); a request
    cancelled while its batch is on the device still has the launch's result taken (a GPU engine's lock freed),
    and the next request is answered."""
    engine = PolledEngine(torch_fp32_engine_dir, polls_needed=2)
    featurizer = short_featurizer(engine, torch_fp32_engine_dir)
    length = span_search_length(engine, decoder_defaults(engine.meta))
    question, passage = squad_pairs[0]
    long = featurizer.featurize(question, " ".join([passage] * 4))
    assert len(long.windows) > 4  # more than BACKLOG_MIN_WINDOWS and than a batch of 2: a backlog
    batcher = Batcher([engine], featurizer, BatcherConfig(max_batch_size=2))
    batcher.start()
    try:
        result = await batcher.run(long.windows, span_length=length)
        assert result.table.complete
        assert batcher.stats.batches > batcher.stats.polled_batches == engine.launches >= 1  # the first batch only
        launches = engine.launches
        engine.polls_needed = 10**9  # the next launch never finishes on its own
        short = featurizer.featurize(*squad_pairs[1])
        stuck = asyncio.ensure_future(batcher.run(short.windows, span_length=length))
        async with asyncio.timeout(30):
            while engine.launches == launches:
                await asyncio.sleep(0)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        assert engine.open == 1  # still on the device: the worker polls on
        engine.polls_needed = 0
        again = await asyncio.wait_for(batcher.run(short.windows, span_length=length), 30)
        assert again.table.complete and engine.open == 0
        # Shutdown past its timeout cancels the worker mid-poll: it still takes the launch's result.
        engine.polls_needed = 10**9
        abandoned = asyncio.ensure_future(batcher.run(short.windows, span_length=length))
        async with asyncio.timeout(30):
            while engine.open == 0:
                await asyncio.sleep(0)
        assert await batcher.close(timeout_s=0.05) is False
        with pytest.raises(NotServingError):
            await abandoned
        async with asyncio.timeout(30):  # the cancelled worker takes the result as it unwinds
            while engine.open:
                await asyncio.sleep(0)
    finally:
        await batcher.close()


def test_span_search_shapes_cover_the_torch_engines_buckets(torch_fp32_engine_dir: Path) -> None:
    from realtime_qa.qacore.backends.torch_cuda import batch_buckets, sequence_buckets

    engine = CountingEngine(torch_fp32_engine_dir)
    meta = engine.meta
    shapes = span_search_shapes(engine)
    assert set(shapes) == {
        (b, s) for b in batch_buckets(meta.max_batch_size) for s in sequence_buckets(meta.sequence_lengths)
    }


@pytest.fixture
async def torch_server(torch_fp32_engine_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[QAServer]:
    """A real server around the CPU torch engine (qa-serve loads torch engines on CUDA only), span search on
    or off as the test's parameter says, "polled": launched from the event loop as a GPU engine's is."""
    span_search = request.param in ("span-search", "polled")
    server = QAServer(ServerConfig(port=0, grace_s=2.0, span_search=span_search))
    await server.listen()
    engine = PolledEngine(torch_fp32_engine_dir) if request.param == "polled" else CountingEngine(torch_fp32_engine_dir)
    featurizer = short_featurizer(engine, torch_fp32_engine_dir)
    batcher = Batcher([engine], featurizer, server.config.batcher)
    batcher.start()
    runtime = ModelRuntime(
        engine.meta.model_id, torch_fp32_engine_dir, [engine], featurizer, decoder_defaults(engine.meta), batcher
    )
    runtime.ready = True
    server.models.add(runtime)
    try:
        yield server
    finally:
        await server.stop()


def engine_of(server: QAServer) -> Any:
    return next(iter(server.models)).engines[0]


@pytest.mark.parametrize("torch_server", ["span-search", "polled", "no-span-search"], indirect=True)
async def test_served_answers_are_the_answerers(
    torch_server: QAServer, torch_fp32_engine_dir: Path, squad_pairs: list[tuple[str, str]]
) -> None:
    engine = engine_of(torch_server)
    featurizer = next(iter(torch_server.models)).featurizer
    span_search = torch_server.config.span_search
    async with QAClient(torch_server.target, NO_RETRY) as client:
        answers = await asyncio.gather(*(client.answer(q, p, timeout_s=120) for q, p in squad_pairs[:6]))
        stored = await client.put_passage(squad_pairs[0][1])
        by_id = await client.answer(squad_pairs[0][0], passage_id=stored.passage_id, timeout_s=120)
        # Options beyond what the device keeps (n-best 30 > 40 / 2) fall back to logits, answered all the same.
        wide = await client.answer(*squad_pairs[1], options=AnswerOptions(n_best_size=30), timeout_s=120)
    calls = engine.rows.copy()
    reference = QuestionAnswerer(engine, featurizer, decoder_defaults(engine.meta))
    for (question, passage), answer in zip(squad_pairs[:6], answers, strict=True):
        want = reference.answer(question, passage).prediction if span_search else None
        want = want or cpu_decoded(engine, featurizer, question, passage)
        assert_same_best(answer, want, passage)
        assert len(answer.nbest) == len(want.nbest)
    assert by_id.best is not None and answers[0].best is not None
    assert (by_id.best.start, by_id.best.end) == (answers[0].best.start, answers[0].best.end)
    assert len(wide.nbest) == 30
    want_wide = cpu_decoded(engine, featurizer, *squad_pairs[1])
    assert wide.best is not None and want_wide.best is not None
    assert (wide.best.start, wide.best.end) == (want_wide.best.start, want_wide.best.end)
    if isinstance(engine, PolledEngine):
        assert engine.launches > 0 and engine.open == 0
    if span_search:
        assert calls[f"spans{DecoderConfig().max_answer_length}"] > 0 and calls["logits"] > 0  # the wide question
    else:
        assert set(calls) == {"logits"}


@pytest.mark.gpu
async def test_gpu_served_answers_through_polled_launches_are_the_answerers(
    gpu_fp16_engine_dir: Path, squad_dir: Path
) -> None:
    """The fp16 CUDA-graph engine as `qa-serve` loads it: every batch is launched from the event loop and polled, and
    300 SQuAD dev questions over a stream (8 at a time) get the answers `QuestionAnswerer` gives
    (`answers.assert_fp16_answers_agree`)."""
    from realtime_qa.pipeline.client import Answer, Question
    from realtime_qa.services.config import EngineSpec

    dataset = read_dataset(squad_dir / "dev-v1.1.json.gz").head(300)
    asked = [(question.id, question.question, paragraph.context) for paragraph, question in dataset.questions()]
    with QuestionAnswerer.from_engine_dir(gpu_fp16_engine_dir) as answerer:
        alone = {qid: answerer.answer(question, passage).prediction.text for qid, question, passage in asked}
    config = ServerConfig(port=0, engines=(EngineSpec(gpu_fp16_engine_dir),), grace_s=2.0)
    async with QAServer(config) as server, QAClient(server.target, NO_RETRY) as client:
        model = next(iter(server.models))
        assert model.engines[0].launches_spans()
        served: dict[str, str] = {}
        for first in range(0, len(asked), 8):
            chunk = asked[first : first + 8]
            questions = (Question(question, passage, request_id=qid) for qid, question, passage in chunk)
            async for result in client.answer_stream(questions):
                assert isinstance(result, Answer)
                served[result.request_id] = result.text
        stats = model.batcher.stats
    assert stats.polled_batches == stats.batches > 0
    assert_fp16_answers_agree(dataset, alone, served, "served")
