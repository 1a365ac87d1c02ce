"""Health checking, reflection, readiness and the Prometheus endpoint of a real server."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from realtime_qa.pipeline.client import ClientConfig, QAClient, QAClientError, RetryPolicy
from realtime_qa.qacore.latency import StageTimings
from realtime_qa.services.config import EngineSpec, ServerConfig
from realtime_qa.services.metrics import ServiceMetrics
from realtime_qa.services.server import QAServer, model_health_name
from waiting import wait_until

PASSAGE = "The Normans gave their name to Normandy, a region in France. Their leader was Rollo."
SERVICE = "qa.v1.QuestionAnswering"
NO_RETRY = ClientConfig(retry=RetryPolicy(max_attempts=1))


def config_for(engine_dir: Path, **changes: object) -> ServerConfig:
    return ServerConfig(port=0, engines=(EngineSpec(engine_dir),), grace_s=30.0, **changes)  # type: ignore[arg-type]


async def test_health_is_serving_only_after_warm_up_and_not_serving_on_shutdown(engine_dir: Path) -> None:
    server = QAServer(config_for(engine_dir))
    await server.listen()
    try:
        async with QAClient(server.target, NO_RETRY) as client:
            assert await client.health("") == "NOT_SERVING"
            assert await client.health(SERVICE) == "NOT_SERVING"
            with pytest.raises(QAClientError) as not_ready:
                await client.answer("Who led them?", PASSAGE)
            assert not_ready.value.code == grpc.StatusCode.UNAVAILABLE

            await server.load_models()
            model_id = next(iter(server.models)).model_id
            for name in ("", SERVICE, model_health_name(model_id)):
                assert await client.health(name) == "SERVING"
            assert (await client.answer("Who led them?", PASSAGE)).text

            # A watcher sees the change to NOT_SERVING as soon as shutdown starts, while an in-flight
            # request still finishes within the grace period.
            watch = health_pb2_grpc.HealthStub(client.channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            in_flight = asyncio.create_task(client.answer("Who led them?", " ".join([PASSAGE] * 30)))
            await wait_until(lambda: server.calls.in_flight > 0)  # the request is in the server
            stopping = asyncio.create_task(server.stop())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # a watch never ends by itself: it would hold the shutdown for the whole grace period
            assert (await in_flight).text
            await stopping
    finally:
        await server.stop()


async def test_client_retries_unavailable_until_the_server_is_ready(engine_dir: Path) -> None:
    server = QAServer(config_for(engine_dir))
    await server.listen()
    try:
        retrying = ClientConfig(retry=RetryPolicy(max_attempts=100, initial_backoff_s=0.02, max_backoff_s=0.1))
        async with QAClient(server.target, retrying) as client:
            pending = asyncio.create_task(client.answer("Who led them?", PASSAGE, timeout_s=60))
            refusals = {"method": "Answer", "code": "UNAVAILABLE"}
            await wait_until(
                lambda: (server.metrics.registry.get_sample_value("qa_requests_total", refusals) or 0) >= 2
            )
            assert not pending.done()  # still retrying: the model is not loaded
            await server.load_models()
            assert (await pending).text
    finally:
        await server.stop()


async def test_reflection_lists_the_services(engine_dir: Path) -> None:
    async with QAServer(config_for(engine_dir)) as server:

        def list_services() -> tuple[list[str], list[str]]:
            with grpc.insecure_channel(server.target) as channel:
                database = ProtoReflectionDescriptorDatabase(channel)
                services = list(database.get_services())
                descriptor = database.FindFileContainingSymbol(SERVICE)
                return services, [service.name for service in descriptor.service]

        services, described = await asyncio.to_thread(list_services)
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= set(services)
    assert described == ["QuestionAnswering"]


async def list_services_v1(target: str) -> list[str] | grpc.StatusCode:
    """ListServices through `grpc.reflection.v1` (what grpcurl and current tools ask first)."""
    from grpc_reflection.v1alpha import reflection_pb2  # the v1 messages are the same on the wire

    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )()
        try:
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await call.done_writing()
            response = await call.read()
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return [service.name for service in response.list_services_response.service]


async def test_reflection_v1_is_served_and_can_be_turned_off(engine_dir: Path) -> None:
    server = QAServer(config_for(engine_dir))
    await server.listen()
    try:
        listed = await list_services_v1(server.target)
    finally:
        await server.stop()
    assert isinstance(listed, list) and SERVICE in listed
    server = QAServer(config_for(engine_dir, reflection=False))
    await server.listen()
    try:
        assert await list_services_v1(server.target) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop()


async def test_metrics_endpoint_exposes_stages_batches_and_budget(engine_dir: Path) -> None:
    async with QAServer(config_for(engine_dir, metrics_port=0, budget_ns=1)) as server:
        assert server.metrics_port
        async with QAClient(server.target, NO_RETRY) as client:
            await asyncio.gather(*(client.answer("Who led them?", PASSAGE) for _ in range(4)))
            with pytest.raises(QAClientError):
                await client.answer("", PASSAGE)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    model_id = next(iter(server.models)).model_id
    for stage in ("queue", "tokenize", "infer", "decode", "end_to_end"):
        assert f'qa_stage_latency_seconds_count{{model="{model_id}",stage="{stage}"}} 4.0' in text
    assert f'qa_batch_size_windows_count{{model="{model_id}"}}' in text
    assert f'qa_queue_depth_windows{{model="{model_id}"}} 0.0' in text
    assert 'qa_requests_total{code="OK",method="Answer"} 4.0' in text
    assert 'qa_requests_total{code="INVALID_ARGUMENT",method="Answer"} 1.0' in text
    assert 'qa_latency_budget_seconds{stage="language_model"} 1e-09' in text
    # With a 1 ns budget every answered question is over it.
    assert f'qa_requests_over_budget_total{{model="{model_id}"}} 4.0' in text
    assert f'qa_stage_over_budget_total{{model="{model_id}",stage="end_to_end"}} 4.0' in text


async def test_unknown_engine_directory_fails_start_up_with_a_clear_error(tmp_path: Path) -> None:
    server = QAServer(config_for(tmp_path / "missing"))
    with pytest.raises(Exception, match="engine directory not found"):
        await server.start()
    await server.stop()


def test_answer_metrics_record_each_stage_of_each_model() -> None:
    """`observe_answer` and `count_request` (children looked up once per model, method and code) record what the
    timings say, per model; the over-budget series appear only once a question is over."""
    metrics = ServiceMetrics(budget_ns=3_000_000)
    value = metrics.registry.get_sample_value
    metrics.observe_answer("a", StageTimings(1_000, 2_000, 3_000, 4_000, total_ns=2_000_000))
    assert value("qa_requests_over_budget_total", {"model": "a"}) is None
    metrics.observe_answer("a", StageTimings(10_000, 20_000, 30_000, 40_000, total_ns=5_000_000))
    metrics.observe_answer("b", StageTimings(5_000, 0, 0, 0, total_ns=6_000))
    for stage, seconds in (("queue", 11e-6), ("tokenize", 22e-6), ("infer", 33e-6), ("decode", 44e-6)):
        assert value("qa_stage_latency_seconds_sum", {"model": "a", "stage": stage}) == pytest.approx(seconds)
        assert value("qa_stage_latency_seconds_count", {"model": "a", "stage": stage}) == 2
    assert value("qa_stage_latency_seconds_sum", {"model": "a", "stage": "end_to_end"}) == pytest.approx(7e-3)
    assert value("qa_stage_latency_seconds_sum", {"model": "b", "stage": "queue"}) == pytest.approx(5e-6)
    assert value("qa_stage_latency_seconds_count", {"model": "b", "stage": "end_to_end"}) == 1
    assert value("qa_requests_over_budget_total", {"model": "a"}) == 1
    assert value("qa_stage_over_budget_total", {"model": "a", "stage": "end_to_end"}) == 1
    assert value("qa_requests_over_budget_total", {"model": "b"}) is None
    for code in ("OK", "OK", "NOT_FOUND"):
        metrics.count_request("AnswerStream", code)
    assert value("qa_requests_total", {"method": "AnswerStream", "code": "OK"}) == 2
    assert value("qa_requests_total", {"method": "AnswerStream", "code": "NOT_FOUND"}) == 1
