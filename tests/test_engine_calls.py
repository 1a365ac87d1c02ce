"""The engine process runs calls that wait together as one batch (services/engine_calls.py, services/engine_host.py):
each caller gets what its call alone would have returned, a bad call fails alone, and nothing waits forever.

Real engines: ONNX Runtime fp32 for logits, the torch engine in fp32 on the CPU for the span search."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from answers import assert_fp16_answers_agree
from realtime_qa.qacore.answerer import QuestionAnswerer
from realtime_qa.qacore.bundle import decoder_defaults, featurizer_for_engine
from realtime_qa.qacore.decoding import decode_spans, span_masks
from realtime_qa.qacore.engine import Engine, EngineOutputs, EngineSpans
from realtime_qa.qacore.errors import EngineError, EngineFaultError, InvalidInputError
from realtime_qa.qacore.factory import EngineOptions
from realtime_qa.qacore.features import EngineInputs, Featurizer
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.services.engine_calls import (
    INFER,
    SPANS,
    CallResult,
    EngineCall,
    merge,
    reply_to_bytes,
    result_of_reply,
    split,
    take_batch,
)
from realtime_qa.services.engine_host import CallHub, _Caller, run_batch, run_calls
from realtime_qa.services.engine_wire import pack

PASSAGES = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France.",
    "Tesla was born on 10 July 1856 into a Serb family in the village of Smiljan, Austrian Empire, in modern Croatia. "
    "His father, Milutin Tesla, was an Eastern Orthodox priest. Tesla's mother, Đuka Tesla, had a talent for "
    "making home craft tools and memorized numerous Serbian epic poems.",
]
QUESTIONS = ["In what country is Normandy located?", "Where was Tesla born?"]
REPLY_TIMEOUT_S = 60
ZEROS = EngineInputs(*(np.zeros((1, 4), np.int32) for _ in range(3)))


def call_of(featurizer: Featurizer, index: int, spans_length: int | None = None) -> EngineCall:
    """The engine call of question `index` (inputs padded to its own length: the two differ)."""
    features = featurizer.featurize(QUESTIONS[index], PASSAGES[index])
    inputs = featurizer.batch(features.windows)
    if spans_length is None:
        return EngineCall(INFER, inputs)
    mask = inputs.segment_ids.astype(bool)  # any passage token may start or end a span
    return EngineCall(SPANS, inputs, mask, mask.copy(), spans_length)


@pytest.fixture(scope="module")
def onnx_engine(engine_dir: Path) -> Iterator[tuple[Engine, Featurizer]]:
    with QuestionAnswerer.from_engine_dir(engine_dir, engine_options=EngineOptions(intra_op_threads=1)) as answerer:
        yield answerer.engine, answerer.featurizer


def assert_same_logits(got: EngineOutputs, want: EngineOutputs) -> None:
    assert got.start_logits.shape == want.start_logits.shape
    np.testing.assert_allclose(got.start_logits, want.start_logits, atol=1e-4)
    np.testing.assert_allclose(got.end_logits, want.end_logits, atol=1e-4)


def test_merged_calls_return_each_callers_own_logits(onnx_engine: tuple[Engine, Featurizer]) -> None:
    engine, featurizer = onnx_engine
    calls = [call_of(featurizer, 0), call_of(featurizer, 1), call_of(featurizer, 0)]
    assert calls[0].inputs.seq_len != calls[1].inputs.seq_len  # the merge pads the shorter one
    merged = merge(calls)
    assert merged.inputs.input_ids.shape == (3, calls[1].inputs.seq_len)
    for got, call in zip(split(merged.run(engine), calls), calls, strict=True):
        assert isinstance(got, EngineOutputs)
        assert_same_logits(got, engine.infer(call.inputs))


def test_merged_span_searches_return_each_callers_own_spans(torch_fp32_engine_dir: Path) -> None:
    pytest.importorskip("torch")
    from counting_engine import CountingEngine

    with CountingEngine(torch_fp32_engine_dir) as engine:
        featurizer = featurizer_for_engine(engine, torch_fp32_engine_dir)
        length = decoder_defaults(engine.meta).max_answer_length
        calls = [call_of(featurizer, 1, length), call_of(featurizer, 0, length)]
        merged = merge(calls)
        got_all = split(merged.run(engine), calls)
        assert engine.calls == [(f"spans{length}", sum(call.rows for call in calls))]  # one engine call
        for got, call in zip(got_all, calls, strict=True):
            want = call.run(engine)
            assert isinstance(got, EngineSpans) and isinstance(want, EngineSpans)
            np.testing.assert_array_equal(got.starts, want.starts)
            np.testing.assert_array_equal(got.ends, want.ends)
            np.testing.assert_allclose(got.logits, want.logits, atol=1e-4)
            np.testing.assert_allclose(got.null_logits, want.null_logits, atol=1e-4)


def test_a_batch_takes_the_oldest_call_then_later_ones_that_fit_and_share_its_kind(
    onnx_engine: tuple[Engine, Featurizer],
) -> None:
    _, featurizer = onnx_engine
    logits, spans30, spans20 = call_of(featurizer, 0), call_of(featurizer, 0, 30), call_of(featurizer, 0, 20)
    big = EngineCall(INFER, EngineInputs(*(np.ones((7, 16), np.int32) for _ in range(3))))
    waiting = [("a", spans30), ("b", logits), ("c", spans20), ("d", spans30), ("e", big), ("f", logits)]
    batch = take_batch(waiting, lambda item: item[1], max_rows=8)
    assert [name for name, _ in batch] == ["a", "d"]  # same operation and answer length only
    assert [name for name, _ in waiting] == ["b", "c", "e", "f"]  # the rest keep their order
    assert [name for name, _ in take_batch(waiting, lambda item: item[1], max_rows=8)] == ["b", "e"]
    assert [name for name, _ in take_batch(waiting, lambda item: item[1], max_rows=8)] == ["c"]
    assert [name for name, _ in take_batch(waiting, lambda item: item[1], max_rows=1)] == ["f"]
    assert waiting == []


INFER_BYTES = EngineCall(INFER, ZEROS).to_bytes()


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (pack(b"T"), "unknown engine call kind 'T'"),
        (b"infer", "malformed engine call: message of 5 bytes is shorter than its headers"),
        (INFER_BYTES[:-1], "malformed engine call: message of .* bytes is shorter than its arrays"),
        (INFER_BYTES + b"\0", "malformed engine call: message has 1 bytes after its arrays"),
        (pack(b"I", [np.zeros((1, 4), np.int32)] * 2), "malformed engine call: 2 arrays for infer"),
        (pack(b"I", [np.zeros((1, 4), np.float32)] * 3), "not three 2-D integer arrays of one shape"),
        (pack(b"I", [np.zeros((1, 4), np.int32)] * 2 + [np.zeros((1, 5), np.int32)]), "of one shape"),
        (pack(b"S", [*ZEROS.__dict__.values(), np.zeros((1, 3), bool), np.zeros((1, 4), bool)], 30),
         r"span masks must have the inputs' shape \(1, 4\)"),
    ],
)  # fmt: skip
def test_a_malformed_call_is_refused_by_name(message: bytes, error: str) -> None:
    with pytest.raises(EngineError, match=error):
        EngineCall.from_bytes(message)


def test_calls_and_replies_cross_the_wire_unchanged(onnx_engine: tuple[Engine, Featurizer]) -> None:
    engine, featurizer = onnx_engine
    inputs = call_of(featurizer, 1).inputs
    call = EngineCall(SPANS, inputs, inputs.segment_ids == 1, inputs.input_mask == 1, 30)
    got = EngineCall.from_bytes(call.to_bytes())
    assert (got.operation, got.max_answer_length) == (SPANS, 30)
    for name in ("input_ids", "segment_ids", "input_mask"):
        np.testing.assert_array_equal(getattr(got.inputs, name), getattr(inputs, name))
    np.testing.assert_array_equal(got.may_start, call.may_start)
    np.testing.assert_array_equal(got.may_end, call.may_end)
    logits = engine.infer(inputs)
    back = result_of_reply(bytearray(reply_to_bytes(("ok", logits))))
    assert isinstance(back, EngineOutputs)
    np.testing.assert_array_equal(back.start_logits, logits.start_logits)
    np.testing.assert_array_equal(back.end_logits, logits.end_logits)
    back.start_logits[0, 0] = 0.0  # writable, as a local engine's result
    spans = EngineSpans(np.array([[3, -1]], np.int32), np.array([[5, -1]], np.int32),
                        np.array([[2.5, -np.inf]], np.float32), np.array([-1.0], np.float32))  # fmt: skip
    back_spans = result_of_reply(reply_to_bytes(("ok", spans)))
    assert isinstance(back_spans, EngineSpans)
    for name in ("starts", "ends", "logits", "null_logits"):
        np.testing.assert_array_equal(getattr(back_spans, name), getattr(spans, name))


@pytest.mark.parametrize("error", [EngineError, EngineFaultError, InvalidInputError])
def test_an_error_reply_raises_its_own_class_and_message(error: type[Exception]) -> None:
    with pytest.raises(error, match=r"^sequence of 513 exceeds ✓$") as raised:
        result_of_reply(reply_to_bytes(("error", error.__name__, "sequence of 513 exceeds ✓")))
    assert type(raised.value) is error


def test_a_result_the_framing_cannot_hold_fails_its_call_not_the_engine_thread() -> None:
    ours, theirs = Pipe()
    caller = _Caller(theirs)
    odd = EngineOutputs(np.zeros((1, 2), np.uint8), np.zeros((1, 2), np.uint8))
    caller.reply(("ok", odd))  # returns: the engine thread goes on
    with pytest.raises(EngineError, match=r"^the engine's result cannot be sent: cannot frame a 2-D uint8 array$"):
        result_of_reply(ours.recv_bytes())


def test_a_garbled_reply_is_an_engine_error() -> None:
    with pytest.raises(EngineError, match="malformed reply from the engine process"):
        result_of_reply(reply_to_bytes(("ok", EngineOutputs(np.zeros((1, 2), np.float32), np.zeros((1, 2)))))[:-3])


def test_a_call_the_engine_refuses_fails_alone(onnx_engine: tuple[Engine, Featurizer]) -> None:
    engine, featurizer = onnx_engine
    good = call_of(featurizer, 1)
    too_long = EngineCall(INFER, EngineInputs(*(np.zeros((1, engine.meta.max_seq_length + 1), np.int32),) * 3))
    replies = run_batch(engine, [too_long, good])
    assert replies[0] == ("error", "EngineError", f"sequence of {engine.meta.max_seq_length + 1} exceeds the "
                          f"engine's max {engine.meta.max_seq_length}")  # fmt: skip
    assert replies[1][0] == "ok"
    assert_same_logits(replies[1][1], engine.infer(good.inputs))


class RecordingEngine(Engine):
    """A real engine that records the batch size of each call and can be held before running one."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine.meta)
        self.engine = engine
        self.batches: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def infer(self, inputs: EngineInputs) -> EngineOutputs:
        self.entered.set()
        assert self.release.wait(REPLY_TIMEOUT_S)
        self.batches.append(inputs.batch_size)
        return self.engine.infer(inputs)


def engine_process(
    engines: list[RecordingEngine],
    workers: int,
    observed: list[tuple[int, int]] | None = None,
    max_message_bytes: int | None = None,
) -> list[Connection]:
    """The engine process's hub and engine threads, in this process; the workers' ends of their connections.
    Each batch's (calls, windows) is appended to `observed`, as the engine process tells its metrics."""
    hub = CallHub(engines[0].meta.max_batch_size, max_message_bytes)
    ends: list[Connection] = []
    for _ in range(workers):
        ours, theirs = Pipe()
        hub.add(theirs)
        ends.append(ours)
    observe = (lambda calls, windows: observed.append((calls, windows))) if observed is not None else None
    for engine in engines:
        threading.Thread(target=run_calls, args=(engine, hub, observe), daemon=True).start()
    return ends


def test_calls_that_arrive_while_the_engine_runs_are_answered_as_one_batch(
    onnx_engine: tuple[Engine, Featurizer],
) -> None:
    engine, featurizer = onnx_engine
    recording = RecordingEngine(engine)
    observed: list[tuple[int, int]] = []
    workers = engine_process([recording], workers=4, observed=observed)
    calls = [call_of(featurizer, index % 2) for index in range(4)]
    workers[0].send_bytes(calls[0].to_bytes())
    assert recording.entered.wait(REPLY_TIMEOUT_S)  # the engine holds the first call...
    for worker, call in zip(workers[1:], calls[1:], strict=True):
        worker.send_bytes(call.to_bytes())  # ...while three more arrive
    workers[1].send_bytes(pack(b"T"))  # and worker 1 sends a second, malformed, message
    recording.release.set()
    for index, worker in enumerate(workers):
        assert worker.poll(REPLY_TIMEOUT_S), f"worker {index} got no reply"
        result = result_of_reply(worker.recv_bytes())
        assert isinstance(result, EngineOutputs)
        assert_same_logits(result, engine.infer(calls[index].inputs))
    assert workers[1].poll(REPLY_TIMEOUT_S)
    with pytest.raises(EngineError, match=r"^unknown engine call kind 'T'$"):
        result_of_reply(workers[1].recv_bytes())
    assert recording.batches == [calls[0].rows, sum(call.rows for call in calls[1:])]
    assert observed[:2] == [(1, calls[0].rows), (3, sum(call.rows for call in calls[1:]))]  # what its metrics see
    workers[3].close()  # a worker that leaves is dropped; the others are still served
    workers[2].send_bytes(calls[2].to_bytes())
    assert workers[2].poll(REPLY_TIMEOUT_S)
    assert isinstance(result_of_reply(workers[2].recv_bytes()), EngineOutputs)
    assert recording.batches[-1] == calls[2].rows


def test_a_message_over_the_limit_drops_its_connection_and_the_others_are_served(
    onnx_engine: tuple[Engine, Featurizer],
) -> None:
    engine, featurizer = onnx_engine
    recording = RecordingEngine(engine)
    recording.release.set()
    call = call_of(featurizer, 0)
    workers = engine_process([recording], workers=2, max_message_bytes=len(call.to_bytes()))
    workers[0].send_bytes(call.to_bytes() + bytes(1))  # one byte too many
    assert workers[0].poll(REPLY_TIMEOUT_S)
    with pytest.raises((EOFError, ConnectionResetError)):  # dropped: closed (with our bytes unread), no reply
        workers[0].recv_bytes()
    workers[1].send_bytes(call.to_bytes())
    assert workers[1].poll(REPLY_TIMEOUT_S)
    assert isinstance(result_of_reply(workers[1].recv_bytes()), EngineOutputs)


def test_with_two_contexts_a_call_runs_while_the_other_instance_is_busy(
    onnx_engine: tuple[Engine, Featurizer],
) -> None:
    """`--engine-process --engine-contexts 2`: one engine thread per instance; while one holds a call, the
    other gathers and runs the next (with one instance that call would wait, as the previous test shows)."""
    engine, featurizer = onnx_engine
    instances = [RecordingEngine(engine), RecordingEngine(engine)]
    workers = engine_process(instances, workers=2)
    call = call_of(featurizer, 0)
    workers[0].send_bytes(call.to_bytes())
    held = wait_until_one_entered(instances)
    other = instances[1 - instances.index(held)]
    other.release.set()
    workers[1].send_bytes(call.to_bytes())
    assert workers[1].poll(REPLY_TIMEOUT_S), "a call waited for the busy instance"
    assert isinstance(result_of_reply(workers[1].recv_bytes()), EngineOutputs)
    assert not workers[0].poll(0) and held.batches == []  # still held
    held.release.set()
    assert workers[0].poll(REPLY_TIMEOUT_S)
    assert isinstance(result_of_reply(workers[0].recv_bytes()), EngineOutputs)
    assert (held.batches, other.batches) == ([call.rows], [call.rows])


def wait_until_one_entered(instances: list[RecordingEngine]) -> RecordingEngine:
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while time.monotonic() < deadline:
        for instance in instances:
            if instance.entered.wait(0.01):
                return instance
    raise AssertionError("no engine thread took the call")


def answers_alone_and_merged(
    engine: Engine, featurizer: Featurizer, dataset: Any
) -> tuple[dict[str, str], dict[str, str]]:
    """Each question of `dataset` as its own span-search call, run alone, and merged as the engine process merges
    waiting calls (consecutive ones up to the engine's max batch), each call and reply crossing the wire as bytes;
    the decoded answers of both, by question id."""
    length = decoder_defaults(engine.meta).max_answer_length
    asked, calls = [], []
    for paragraph, question in dataset.questions():
        features = featurizer.featurize(question.question, paragraph.context)
        inputs = featurizer.batch(features.windows)
        may_start, may_end = span_masks(features.windows, inputs.seq_len)
        asked.append((question.id, features))
        calls.append(EngineCall(SPANS, inputs, may_start, may_end, length))
    alone = [call.run(engine) for call in calls]
    merged: list[CallResult] = []
    waiting = [EngineCall.from_bytes(call.to_bytes()) for call in calls]
    while waiting:
        batch = take_batch(waiting, lambda call: call, engine.meta.max_batch_size)
        merged += [result_of_reply(reply_to_bytes(("ok", result))) for result in split(merge(batch).run(engine), batch)]
    decoded: list[dict[str, str]] = [{}, {}]
    for answers, results in zip(decoded, (alone, merged), strict=True):
        for (qid, features), spans in zip(asked, results, strict=True):
            assert isinstance(spans, EngineSpans)
            answers[qid] = decode_spans(features, spans).text
    return decoded[0], decoded[1]


def test_merged_span_searches_give_the_answers_of_calls_run_alone(torch_fp32_engine_dir: Path, squad_dir: Path) -> None:
    """40 SQuAD dev questions through the torch engine in fp32 on the CPU: every answer identical."""
    pytest.importorskip("torch")
    from counting_engine import CountingEngine

    with CountingEngine(torch_fp32_engine_dir) as engine:
        featurizer = featurizer_for_engine(engine, torch_fp32_engine_dir)
        alone, merged = answers_alone_and_merged(
            engine, featurizer, read_dataset(squad_dir / "dev-v1.1.json.gz").head(40)
        )
    assert len(engine.calls) < 2 * len(alone)  # some calls were merged
    assert merged == alone


@pytest.mark.gpu
def test_gpu_merged_span_searches_give_the_answers_of_calls_run_alone(
    gpu_fp16_engine_dir: Path, squad_dir: Path
) -> None:
    """The same on the fp16 CUDA-graph engine, 500 questions (`answers.assert_fp16_answers_agree`)."""
    dataset = read_dataset(squad_dir / "dev-v1.1.json.gz").head(500)
    with QuestionAnswerer.from_engine_dir(gpu_fp16_engine_dir) as answerer:
        alone, merged = answers_alone_and_merged(answerer.engine, answerer.featurizer, dataset)
    assert_fp16_answers_agree(dataset, alone, merged, "merged")
