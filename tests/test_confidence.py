"""The returned confidence (qacore.confidence): threshold-shifted, Platt-calibrated, carried from the model's
config.json through the engine's meta.json to every decoder, and what a qa.v1 caller sees as the answer's score."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from realtime_qa.pipeline.client import AnswerOptions, ClientConfig, QAClient, RetryPolicy
from realtime_qa.qacore.bundle import open_bundle
from realtime_qa.qacore.confidence import (
    CALIBRATION_KEY,
    ConfidenceCalibration,
    returned_confidence,
    shifted_probability,
)
from realtime_qa.qacore.decoding import DecoderConfig, decode
from realtime_qa.qacore.engine import EngineMeta
from realtime_qa.qacore.errors import CheckpointError, EngineError
from realtime_qa.qacore.features import Features, Featurizer
from realtime_qa.qacore.tokenization import load_tokenizer
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.server import QAServer
from tiny_models import TF_TINY, build_tiny_engine

PASSAGE = "Super Bowl 50 was played at Levi's Stadium in Santa Clara, California, on February 7, 2016."
SHIPPED = ConfidenceCalibration(a=0.10118432684132163, b=0.14133918416184532)  # an earlier shipped fit: known values
NORMANS = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
    "their leader Rollo, agreed to swear fealty to King Charles III of West Francia."
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def featurizer(shipped_model_dir: Path) -> Featurizer:
    return Featurizer(load_tokenizer(shipped_model_dir))


def one_span_logits(features: Features, text: str, span_logit: float, null_logit: float) -> tuple[np.ndarray, ...]:
    """Logits where `text` scores `span_logit` (start + end), [CLS] `null_logit`, and every other pair is far
    below (-60 and under), so that the softmax is, to float precision, over these two answers alone."""
    (window,) = features.windows
    start = np.full((1, window.seq_len), -30.0, np.float32)
    end = np.full_like(start, -30.0)
    start[0, 0] = end[0, 0] = null_logit / 2
    begin = features.passage.text.index(text)
    offsets = features.passage.offsets
    tokens = np.nonzero((offsets[:, 1] > begin) & (offsets[:, 0] < begin + len(text)))[0]
    start[0, int(tokens[0]) - window.passage_start + window.context_offset] = span_logit / 2
    end[0, int(tokens[-1]) - window.passage_start + window.context_offset] = span_logit / 2
    return start, end


def test_the_calibrated_confidence_of_a_known_logit_pair(featurizer: Featurizer) -> None:
    features = featurizer.featurize("Where was Super Bowl 50 played?", PASSAGE)
    start, end = one_span_logits(features, "Levi's Stadium", span_logit=8.0, null_logit=2.0)
    # Threshold -5: margin 2 - 8 = -6 <= -5, so it answers. Shifted softmax: e^8 / (e^8 + e^(2 + 5)) = sigmoid(1).
    answered = decode(features, start, end, DecoderConfig(allow_null=True, null_threshold=-5.0, calibration=SHIPPED))
    assert answered.best is not None and answered.text == "Levi's Stadium"
    shifted = sigmoid(1.0)  # 0.7311, where the unshifted softmax says e^8 / (e^8 + e^2) = 0.9975
    assert answered.nbest[0].score == pytest.approx(sigmoid(6.0), abs=1e-6)
    assert answered.null_probability == pytest.approx(1 - sigmoid(6.0), abs=1e-6)
    calibrated = sigmoid(0.10118432684132163 * 1.0 + 0.14133918416184532)  # logit(shifted) = 1
    assert calibrated == pytest.approx(0.5603, abs=1e-4)
    assert answered.confidence == pytest.approx(calibrated, abs=1e-6)
    assert answered.best.score == answered.confidence  # what callers see as the answer's score
    # Threshold -7: margin -6 > -7, it abstains; the abstention's shifted probability is e^9 / (e^8 + e^9).
    abstained = decode(features, start, end, DecoderConfig(allow_null=True, null_threshold=-7.0, calibration=SHIPPED))
    assert abstained.abstained and abstained.confidence == pytest.approx(calibrated, abs=1e-6)
    # No calibration shipped: the confidence is the shifted probability itself.
    plain = decode(features, start, end, DecoderConfig(allow_null=True, null_threshold=-5.0))
    assert plain.best is not None and plain.best.score == pytest.approx(shifted, abs=1e-6)
    # Without allow_null the score is the span's probability among the n-best spans, as before (no null, no Platt).
    v1 = decode(features, start, end, DecoderConfig(calibration=SHIPPED))
    assert v1.best is not None and v1.best.score == v1.nbest[0].score == v1.confidence == pytest.approx(1.0)


def test_the_shifted_probability_is_the_softmax_with_the_null_logit_shifted() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        spans = np.sort(rng.normal(0, 4, size=5))[::-1]
        null, threshold = float(rng.normal(0, 6)), float(rng.normal(0, 6))
        probabilities = np.exp(np.append(spans, null) - max(spans.max(), null))
        probabilities /= probabilities.sum()
        shifted = np.exp(np.append(spans, null - threshold) - max(spans.max(), null - threshold))
        shifted /= shifted.sum()
        abstains = null - spans[0] > threshold
        got = shifted_probability(float(probabilities[0]), float(probabilities[-1]), abstains, threshold)
        assert got == pytest.approx(float(shifted[-1] if abstains else shifted[0]), rel=1e-9, abs=1e-12)
    # any finite threshold (a request may send one) gives a probability, never an overflow
    for threshold in (-1e6, -800.0, 800.0, 1e6):
        for abstains in (False, True):
            assert 0.0 <= shifted_probability(0.6, 0.3, abstains, threshold) <= 1.0
    assert shifted_probability(0.0, 1.0, True, 2.0) == 1.0  # no span at all: the null answer is all there is
    assert returned_confidence(0.6, 0.3, False, 0.0, None) == pytest.approx(0.6)


def test_training_uses_the_one_definition() -> None:
    from realtime_qa.training.calibration import QuestionScore, reliability_table
    from realtime_qa.training.calibration import returned_confidence as training_confidence

    score = QuestionScore("Rollo", -7.5, 0.7, 0.001)
    abstains, confidence = training_confidence(score, -6.609375)
    assert not abstains and confidence == shifted_probability(0.7, 0.001, False, -6.609375)
    # the reliability table's Platt-mapped confidence is the decoder's calibrated one
    from realtime_qa.qacore.squad import SquadDataset

    context = "Rollo swore fealty in 911 to King Charles."
    qas = [{"id": "q1", "question": "Who?", "answers": [{"text": "Rollo", "answer_start": 0}], "is_impossible": False}]
    paragraphs = [{"context": context, "qas": qas}]
    dataset = SquadDataset.from_json_obj({"version": "v2.0", "data": [{"title": "a", "paragraphs": paragraphs}]})
    scores = {"q1": score}
    (row,) = [row for row in reliability_table(dataset, scores, -6.609375, (SHIPPED.a, SHIPPED.b)) if row["questions"]]
    assert row["mean_confidence"] == pytest.approx(returned_confidence(0.7, 0.001, False, -6.609375, SHIPPED))


@pytest.mark.parametrize(
    "raw",
    [
        {"method": "isotonic", "a": 1.0, "b": 0.0},
        {"method": "platt", "a": "steep", "b": 0.0},
        {"method": "platt", "a": float("nan"), "b": 0.0},
        {"method": "platt", "a": True, "b": 0.0},
        {"method": "platt", "a": 1.0},
        [1.0, 0.0],
    ],
)
def test_a_malformed_calibration_is_refused_where_it_is_read(raw: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ConfidenceCalibration.from_dict(raw)
    model = tmp_path / "model"
    shutil.copytree(TF_TINY, model)
    config = json.loads((model / "bert_config.json").read_text())
    (model / "bert_config.json").write_text(json.dumps({**config, CALIBRATION_KEY: raw}))
    from realtime_qa.builder.checkpoint import load_checkpoint

    with pytest.raises(CheckpointError, match=CALIBRATION_KEY):
        load_checkpoint(model / "model.ckpt-3")


@pytest.fixture(scope="module")
def tiny_calibrated_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose config carries a threshold and a calibration, built as `qa-build` builds any model."""
    calibration = {"method": "platt", "a": 0.5, "b": -0.25}
    return build_tiny_engine(tmp_path_factory, qa_null_threshold=1.5, **{CALIBRATION_KEY: calibration})


def test_the_engine_meta_carries_the_calibration_to_every_decoder(tiny_calibrated_engine: Path, tmp_path: Path) -> None:
    import asyncio

    from realtime_qa.pipeline.assistant_cli import open_answerer, parse_config
    from realtime_qa.qacore.factory import EngineOptions
    from realtime_qa.services.config import BatcherConfig
    from realtime_qa.services.models import ModelRuntime, load_model

    expected = ConfidenceCalibration(a=0.5, b=-0.25)
    raw = json.loads((tiny_calibrated_engine / "meta.json").read_text())
    assert raw["confidence_calibration"] == {"method": "platt", "a": 0.5, "b": -0.25}
    assert raw["null_threshold"] == 1.5
    assert EngineMeta.read(tiny_calibrated_engine).confidence_calibration == expected
    with open_bundle(tiny_calibrated_engine) as bundle:
        assert bundle.decoder_defaults.calibration == expected
        assert bundle.decoder(allow_null=True, null_threshold=0.25).calibration == expected
    base = ["-e", str(tiny_calibrated_engine), "-p", "a b c", "-q", "a", "--allow-null"]
    with open_answerer(parse_config(base)) as answerer:
        assert answerer.decoder_config.calibration == expected

    async def load_and_close() -> ModelRuntime:
        model = await load_model(EngineSpec(tiny_calibrated_engine), EngineOptions(), 1, BatcherConfig())
        await model.close()
        return model

    assert asyncio.run(load_and_close()).decoder_config.calibration == expected  # the service's decoder
    # an engine whose meta.json names a broken calibration is refused when it is read
    broken = tmp_path / "engine"
    shutil.copytree(tiny_calibrated_engine, broken)
    (broken / "meta.json").write_text(json.dumps({**raw, "confidence_calibration": {"method": "platt", "a": 1}}))
    with pytest.raises(EngineError, match="confidence_calibration"):
        EngineMeta.read(broken)
    # an engine built before calibration existed (no key) decodes with the shifted probability
    del raw["confidence_calibration"]
    (broken / "meta.json").write_text(json.dumps(raw))
    assert EngineMeta.read(broken).confidence_calibration is None


def test_the_shipped_model_ships_its_calibration(shipped_model_dir: Path, engine_dir: Path) -> None:
    from realtime_qa.training.model_card import SHIPPED_ABSTAIN_RUN, SHIPPED_RESULTS

    # the Platt fit of the shipped run on the first half of v2.0 dev (training/calibration.py), as committed
    fitted = json.loads((SHIPPED_RESULTS / SHIPPED_ABSTAIN_RUN / "calibration.json").read_text())
    shipped = ConfidenceCalibration(*fitted["platt_first_half"])
    config = json.loads((shipped_model_dir / "config.json").read_text())
    assert ConfidenceCalibration.from_dict(config[CALIBRATION_KEY]) == shipped
    assert config["qa_null_threshold"] == fitted["null_threshold"]
    assert EngineMeta.read(engine_dir).confidence_calibration == shipped


@pytest.fixture
async def client(engine_dir: Path) -> AsyncIterator[QAClient]:
    config = ServerConfig(port=0, engines=(EngineSpec(engine_dir),), grace_s=2.0)
    no_retry = ClientConfig(retry=RetryPolicy(max_attempts=1))
    async with QAServer(config) as server, QAClient(server.target, no_retry) as client:
        yield client


async def test_a_qa_v1_caller_sees_the_calibrated_confidence_as_the_answer_score(
    client: QAClient, shipped_model_dir: Path
) -> None:
    config = json.loads((shipped_model_dir / "config.json").read_text())
    shipped, threshold = ConfidenceCalibration.from_dict(config[CALIBRATION_KEY]), config["qa_null_threshold"]
    question = "Which king did they swear fealty to?"
    answer = await client.answer(question, NORMANS, options=AnswerOptions(allow_null=True))
    assert answer.best is not None and "Charles III" in answer.best.text and not answer.abstained
    top = answer.nbest[0]
    assert (top.text, top.start, top.end) == (answer.best.text, answer.best.start, answer.best.end)
    # the shipped threshold and calibration, applied to the raw probabilities the same response carries
    expected = shipped.apply(shifted_probability(top.score, answer.null_probability, False, threshold))
    assert answer.best.score == pytest.approx(expected, abs=1e-5)
    assert answer.best.score != pytest.approx(top.score, abs=1e-2)  # not the raw n-best probability
    # a request's own threshold shifts the null logit by that threshold instead
    # (a threshold above the shipped one abstains less readily, so the answer it still gives is more certain)
    lenient = await client.answer(question, NORMANS, options=AnswerOptions(allow_null=True, null_threshold=-2.0))
    assert lenient.best is not None and lenient.best.text == answer.best.text
    shifted = shifted_probability(lenient.nbest[0].score, lenient.null_probability, False, -2.0)
    assert lenient.best.score == pytest.approx(shipped.apply(shifted), abs=1e-5)
    assert lenient.best.score > answer.best.score
    # without allow_null: the span's probability among the n-best spans, as before
    plain = await client.answer(question, NORMANS)
    assert plain.best is not None and plain.best.score == plain.nbest[0].score and plain.null_probability == 0.0


async def test_the_response_stage_hedges_an_answer_more_likely_wrong_than_right() -> None:
    from realtime_qa.services.response_service import Outcome, ReplyKind, ReplyMaker, ReplyRequest, ResponderConfig

    maker = ReplyMaker(ResponderConfig(speech=False))
    hedged = await maker.respond(ReplyRequest(Outcome.ANSWERED, "Who?", "Rollo", 0.49))
    assert (hedged.kind, hedged.text) == (ReplyKind.LOW_CONFIDENCE, "I think it is Rollo, but I'm not sure.")
    confident = await maker.respond(ReplyRequest(Outcome.ANSWERED, "Who?", "Rollo", 0.5))
    assert (confident.kind, confident.text) == (ReplyKind.ANSWER, "Rollo.")
