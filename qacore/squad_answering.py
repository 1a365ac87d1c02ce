"""Answering a whole SQuAD dataset with an engine: what `qa-eval` scores and `qa-assistant -sq` writes."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from realtime_qa.qacore.answerer import QuestionAnswerer
from realtime_qa.qacore.errors import InvalidInputError
from realtime_qa.qacore.features import EncodedPassage
from realtime_qa.qacore.squad import SquadDataset

log = logging.getLogger(__name__)


@dataclass
class EngineRun:
    """What an engine answered over a dataset, and how long each question took."""

    predictions: dict[str, str] = field(default_factory=dict)
    na_probs: dict[str, float] = field(default_factory=dict)
    latencies_ns: list[int] = field(default_factory=list)  # per question: tokenize + infer + decode, arrival to answer
    wall_ns: int = 0  # the whole answering loop, passage tokenization included

    @property
    def questions_per_second(self) -> float:
        return len(self.predictions) / (self.wall_ns / 1e9) if self.wall_ns else 0.0


def answer_dataset(
    answerer: QuestionAnswerer, dataset: SquadDataset, batch_size: int = 1, progress: bool = True
) -> EngineRun:
    """Answer every question of `dataset` in file order, `batch_size` questions per `answer_many` call.

    Each passage is tokenized once and reused for all its questions. A question the featurizer refuses
    (e.g. no tokens) is answered "" with no-answer probability 1 and a warning, so one bad row does not
    end a run over thousands.
    """
    from tqdm import tqdm

    run = EngineRun()
    pending: list[tuple[str, str, str | EncodedPassage]] = []
    last_context: str | None = None
    encoded: str | EncodedPassage | None = None
    begin = time.perf_counter_ns()
    with tqdm(total=dataset.num_questions, unit="q", file=sys.stderr, disable=not progress) as bar:
        for paragraph, question in dataset.questions():
            if paragraph.context is not last_context:
                last_context = paragraph.context
                encoded = _encode_or_text(answerer, paragraph.context)
            assert encoded is not None
            pending.append((question.id, question.question, encoded))
            if len(pending) == batch_size:
                _answer_batch(answerer, pending, run)
                bar.update(len(pending))
                pending = []
        if pending:
            _answer_batch(answerer, pending, run)
            bar.update(len(pending))
    run.wall_ns = time.perf_counter_ns() - begin
    return run


def _encode_or_text(answerer: QuestionAnswerer, context: str) -> str | EncodedPassage:
    try:
        return answerer.encode_passage(context)
    except InvalidInputError:
        return context  # each of its questions fails on its own below and is answered ""


def _answer_batch(
    answerer: QuestionAnswerer, batch: list[tuple[str, str, str | EncodedPassage]], run: EngineRun
) -> None:
    try:
        results = answerer.answer_many([(question, passage) for _, question, passage in batch])
    except InvalidInputError:
        if len(batch) > 1:
            for item in batch:
                _answer_batch(answerer, [item], run)
            return
        qid = batch[0][0]
        log.warning("question %s cannot be answered (%s); predicting no answer", qid, sys.exc_info()[1])
        run.predictions[qid] = ""
        run.na_probs[qid] = 1.0
        return
    for (qid, _, _), result in zip(batch, results, strict=True):
        run.predictions[qid] = result.prediction.text
        run.na_probs[qid] = result.prediction.null_probability
        run.latencies_ns.append(result.timings.total_ns)
