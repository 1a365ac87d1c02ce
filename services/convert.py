"""Protobuf at the edge: qa.v1 messages to domain requests (validated) and domain answers to messages."""

from __future__ import annotations

from dataclasses import dataclass, replace

import grpc
from realtime_qa.qacore.decoding import DecoderConfig, Prediction, Span
from realtime_qa.qacore.latency import StageTimings
from realtime_qa.services.errors import InvalidRequestError
from realtime_qa.services.logctx import MAX_REQUEST_ID_CHARS
from realtime_qa.services.models import ModelRuntime

from realtime_qa.qa.v1 import qa_pb2

MAX_TIMEOUT_MS = 600_000
MAX_MODEL_ID_CHARS = 128  # ids longer than this are INVALID_ARGUMENT (never echoed whole in details or logs)
MAX_PASSAGE_ID_CHARS = 128  # server-made ids are ~40 characters


def check_model_id(model_id: str) -> None:
    """INVALID_ARGUMENT for a model id longer than MAX_MODEL_ID_CHARS (without echoing it)."""
    if len(model_id) > MAX_MODEL_ID_CHARS:
        raise InvalidRequestError(f"model_id has {len(model_id):,} characters; the limit is {MAX_MODEL_ID_CHARS}")


@dataclass(frozen=True)
class QuestionRequest:
    """One question as the service handles it (after from_pb)."""

    tag: str  # the client's request_id, echoed back
    model_id: str  # "" = default model
    question: str
    passage: str | None  # exactly one of passage / passage_id is set
    passage_id: str | None
    n_best_size: int | None = None
    max_answer_length: int | None = None
    allow_null: bool = False
    null_threshold: float | None = None
    timeout_ms: int | None = None

    def decoder_config(self, base: DecoderConfig) -> DecoderConfig:
        """The model's decoder defaults with this request's options (out-of-range values raise InvalidInputError)."""
        if self.uses_defaults(base):  # most questions: no copy (a `replace` re-validates every field, per question)
            return base
        return replace(
            base,
            n_best_size=base.n_best_size if self.n_best_size is None else self.n_best_size,
            max_answer_length=base.max_answer_length if self.max_answer_length is None else self.max_answer_length,
            allow_null=self.allow_null,
            null_threshold=base.null_threshold if self.null_threshold is None else self.null_threshold,
        )

    def uses_defaults(self, base: DecoderConfig) -> bool:
        """Whether this request leaves every decoder option of `base` as it is."""
        return (
            self.n_best_size is None
            and self.max_answer_length is None
            and self.null_threshold is None
            and self.allow_null == base.allow_null
        )


@dataclass(frozen=True)
class ServedAnswer:
    """A decoded answer with everything the response reports about how it was made."""

    tag: str
    prediction: Prediction
    model_id: str
    engine: str
    passage_id: str
    timings: StageTimings


def request_from_pb(message: qa_pb2.AnswerRequest) -> QuestionRequest:
    if len(message.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(
            f"request_id has {len(message.request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}"
        )
    check_model_id(message.model_id)
    source = message.WhichOneof("passage_source")
    if source is None:
        raise InvalidRequestError("request has neither passage nor passage_id")
    if source == "passage_id" and not message.passage_id:
        raise InvalidRequestError("passage_id is empty")
    if source == "passage_id" and len(message.passage_id) > MAX_PASSAGE_ID_CHARS:
        raise InvalidRequestError(
            f"passage_id has {len(message.passage_id):,} characters; the limit is {MAX_PASSAGE_ID_CHARS}"
        )
    options = message.options
    timeout_ms = options.timeout_ms if options.HasField("timeout_ms") else None
    if timeout_ms is not None and not 1 <= timeout_ms <= MAX_TIMEOUT_MS:
        raise InvalidRequestError(f"timeout_ms must be in [1, {MAX_TIMEOUT_MS}], got {timeout_ms}")
    return QuestionRequest(
        tag=message.request_id,
        model_id=message.model_id,
        question=message.question,
        passage=message.passage if source == "passage" else None,
        passage_id=message.passage_id if source == "passage_id" else None,
        n_best_size=options.n_best_size if options.HasField("n_best_size") else None,
        max_answer_length=options.max_answer_length if options.HasField("max_answer_length") else None,
        allow_null=options.allow_null,
        null_threshold=options.null_threshold if options.HasField("null_threshold") else None,
        timeout_ms=timeout_ms,
    )


def span_to_pb(span: Span) -> qa_pb2.Span:
    return qa_pb2.Span(text=span.text, start=span.start, end=span.end, score=span.score, logit=span.logit)


def timings_to_pb(timings: StageTimings) -> qa_pb2.StageTimings:
    return qa_pb2.StageTimings(
        queue_ns=timings.queue_ns,
        tokenize_ns=timings.tokenize_ns,
        infer_ns=timings.infer_ns,
        decode_ns=timings.decode_ns,
        total_ns=timings.total_ns,
    )


def answer_to_pb(answer: ServedAnswer) -> qa_pb2.AnswerResponse:
    prediction = answer.prediction
    response = qa_pb2.AnswerResponse(
        request_id=answer.tag,
        abstained=prediction.abstained,
        null_probability=prediction.null_probability,
        model_id=answer.model_id,
        engine=answer.engine,
        passage_id=answer.passage_id,
        timings=timings_to_pb(answer.timings),
    )
    add = response.nbest.add  # built in place: 40 % faster than copying in 20 separate Span messages
    for span in prediction.nbest:
        add(text=span.text, start=span.start, end=span.end, score=span.score, logit=span.logit)
    if prediction.best is not None:
        response.answer.CopyFrom(span_to_pb(prediction.best))
    return response


def error_to_pb(tag: str, code: grpc.StatusCode, message: str) -> qa_pb2.AnswerResponse:
    return qa_pb2.AnswerResponse(request_id=tag, error=qa_pb2.Error(code=code.value[0], message=message))


def model_info_to_pb(model: ModelRuntime, is_default: bool) -> qa_pb2.ModelInfo:
    meta = model.meta
    features = model.featurizer.config
    return qa_pb2.ModelInfo(
        model_id=model.model_id,
        is_default=is_default,
        ready=model.ready,
        backend=meta.backend,
        backend_version=meta.backend_version,
        precision=meta.precision,
        max_batch_size=model.batcher.max_batch_size,  # what the server batches: min(engine, --max-batch-size)
        sequence_lengths=list(meta.sequence_lengths),
        max_seq_length=features.max_seq_length,
        doc_stride=features.doc_stride,
        max_query_length=features.max_query_length,
        model_card=meta.model_card,
        vocab_sha256=meta.vocab_sha256,
        engine_contexts=len(model.engines),
    )
