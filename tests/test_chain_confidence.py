"""The response stage hedges on the QA answer's calibrated confidence, end to end through the real chain.

The model is the shipped one with a cautious confidence calibration in its config.json (Platt a = 1, b = -2:
the shifted odds divided by e^2), built into an engine as `qa-build` builds any model: so the calibration
travels config.json -> meta.json -> decoder -> qa.v1 answer score -> chain -> response.v1 score, and the
response stage's default rule (hedge below 0.5) decides the reply. The shipped calibration (a = 0.10) keeps
answers of these questions between 0.5 and 0.65, so it could not show a hedge; the carry is what is tested.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from realtime_qa.builder.build import BuildConfig, build_engine
from realtime_qa.pipeline.launcher import RunningChain, start_chain
from realtime_qa.qacore.answerer import QuestionAnswerer
from realtime_qa.qacore.bundle import open_bundle
from realtime_qa.qacore.confidence import CALIBRATION_KEY, ConfidenceCalibration, shifted_probability
from test_chain_integration import EVENT_TIMEOUT_S, PASSAGE, Conversation, chain_config, session_config, text_turn

from realtime_qa.assistant.v1 import assistant_pb2, assistant_pb2_grpc
from realtime_qa.response.v1 import response_pb2

pytestmark = pytest.mark.asyncio(loop_scope="module")

CAUTIOUS = ConfidenceCalibration(a=1.0, b=-2.0)
UNSURE = "Which king did they swear fealty to?"  # n-best spread over "King Charles III (of West Francia)"
SURE = "What region did the Normans give their name to?"


@pytest.fixture(scope="module")
def cautious_engine_dir(shipped_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("cautious-model")
    for path in shipped_model_dir.iterdir():
        if path.is_file():
            shutil.copy(path, model / path.name)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, CALIBRATION_KEY: CAUTIOUS.to_dict()}))
    out = tmp_path_factory.mktemp("cautious-engine") / "engine"
    return build_engine(BuildConfig(checkpoint=model, output=out, backend="onnxruntime"))


@pytest.fixture(scope="module")
def expected_confidence(cautious_engine_dir: Path) -> dict[str, float]:
    """The confidence of each question's answer, decoded directly on the engine with abstention allowed."""
    with open_bundle(cautious_engine_dir) as bundle:
        answerer = QuestionAnswerer.from_bundle(bundle, bundle.decoder(allow_null=True))
        confidence = {}
        for question in (UNSURE, SURE):
            prediction = answerer.answer(question, PASSAGE).prediction
            assert not prediction.abstained
            top = prediction.nbest[0]
            threshold = bundle.meta.null_threshold
            assert threshold is not None
            shifted = shifted_probability(top.score, prediction.null_probability, False, threshold)
            assert prediction.confidence == pytest.approx(CAUTIOUS.apply(shifted))
            confidence[question] = prediction.confidence
    assert confidence[UNSURE] < 0.4 and confidence[SURE] > 0.6, confidence  # far from the 0.5 line either way
    return confidence


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["one-process", "split"])
async def chain(request: pytest.FixtureRequest, cautious_engine_dir: Path) -> AsyncIterator[RunningChain]:
    async with start_chain(chain_config(request.param == "split", cautious_engine_dir)) as running:
        yield running


async def test_a_low_calibrated_confidence_is_hedged_by_the_response_stage(
    chain: RunningChain, expected_confidence: dict[str, float]
) -> None:
    config = session_config()
    config.qa_options.allow_null = True
    async with grpc.aio.insecure_channel(chain.assistant_target) as channel:
        call = assistant_pb2_grpc.AssistantStub(channel).Converse(metadata=(("x-trace-id", "hedge"),))
        conversation = Conversation(call)
        await call.write(assistant_pb2.ConverseRequest(config=config))
        assert (await conversation.read()).WhichOneof("event") == "started"
        unsure = await conversation.turn(text_turn(UNSURE), 1)
        (answer,) = unsure.of("answer")
        assert "Charles III" in answer.text and not answer.abstained
        assert answer.score == pytest.approx(expected_confidence[UNSURE], abs=1e-5)  # the calibrated confidence
        (reply,) = unsure.of("reply")
        assert reply.kind == response_pb2.REPLY_LOW_CONFIDENCE
        assert reply.text == f"I think it is {answer.text}, but I'm not sure."
        sure = await conversation.turn(text_turn(SURE), 2)
        (answer,) = sure.of("answer")
        assert answer.text == "Normandy" and answer.score == pytest.approx(expected_confidence[SURE], abs=1e-5)
        (reply,) = sure.of("reply")
        assert reply.kind == response_pb2.REPLY_ANSWER and reply.text == "Normandy."
        await call.done_writing()
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            assert await call.read() is grpc.aio.EOF
