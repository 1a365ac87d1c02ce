"""TensorRT plans built from the shipped model's ONNX graph with TensorRT-RTX, on a machine without a GPU.

What is checked is what can be read without a GPU: the parsed network's I/O tensors, the optimization
profiles the builder was given, the serialized plan (its format marker and the tensor names it
carries), the plan cache and meta.json. Deserializing or running a plan needs a GPU TensorRT supports;
the cuda-python plumbing of the runtime is exercised on a GPU by the last test.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
from realtime_qa.builder.build import BuildConfig, build_engine
from realtime_qa.builder.checkpoint import load_checkpoint
from realtime_qa.builder.onnx_graph import GraphOptions, save_graph
from realtime_qa.builder.tensorrt_build import (
    PLAN_FILE,
    ProfileShape,
    TensorRTBuildOptions,
    build_tensorrt_plan,
    profile_shapes,
)
from realtime_qa.qacore.backends.tensorrt import ProfileRange, choose_profile, plan_library
from realtime_qa.qacore.engine import EngineMeta
from realtime_qa.qacore.errors import EngineError
from realtime_qa.qacore.factory import load_engine

PROFILES = (ProfileShape(1, 128), ProfileShape(8, 384))
needs_builder = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None and importlib.util.find_spec("tensorrt") is None,
    reason="needs tensorrt_rtx (dev extras) or tensorrt",
)


@pytest.fixture(scope="module")
def fp16_onnx(shipped_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return save_graph(load_checkpoint(shipped_model_dir), path, GraphOptions(fp16=True))


def build(onnx: Path, out: Path, cache: Path, profiles: tuple[ProfileShape, ...] = PROFILES) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    built = build_tensorrt_plan(onnx, out, TensorRTBuildOptions(profiles, workspace_mib=1024, cache_dir=cache))
    assert built.engine_file == PLAN_FILE and built.backend_version.startswith("tensorrt")
    details: dict = built.details["tensorrt"]
    return details


@pytest.fixture(scope="module")
def first_plan(fp16_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """One plan of PROFILES built with an empty cache, shared by the tests below (a build takes seconds):
    its output folder, its cache folder and the build details."""
    root = tmp_path_factory.mktemp("plan")
    return root / "a", root / "cache", build(fp16_onnx, root / "a", root / "cache")


@needs_builder
def test_fp16_plan_has_the_engine_inputs_outputs_and_one_profile_per_pair(first_plan: tuple[Path, Path, dict]) -> None:
    out, _, details = first_plan
    tensors = {t["name"]: t for t in details["tensors"]}
    for name in ("input_ids", "segment_ids", "input_mask"):
        assert tensors[name]["is_input"] and tensors[name]["dtype"] == "INT32" and tensors[name]["shape"] == (-1, -1)
    for name in ("start_logits", "end_logits"):  # cast back to float32 inside the fp16 graph
        assert not tensors[name]["is_input"] and tensors[name]["dtype"] == "FLOAT"
    assert [(p["min"], p["opt"], p["max"]) for p in details["profiles"]] == [
        ([1, 1], [1, 128], [1, 128]),
        ([1, 1], [8, 384], [8, 384]),
    ]
    plan = (out / PLAN_FILE).read_bytes()
    assert len(plan) == details["plan_bytes"] and plan_library(plan) == details["library"] == "tensorrt_rtx"
    # fp16 weights: the 22.6M-parameter model takes about 45 MB, not the 90 MB of float32.
    assert 40e6 < len(plan) < 80e6
    for name in tensors:  # the plan names every I/O tensor, once per profile beyond the first
        assert name.encode() in plan and f"{name} [profile 1]".encode() in plan
    assert not details["cached"]


@needs_builder
def test_plan_cache_is_keyed_by_onnx_and_profiles(
    fp16_onnx: Path, first_plan: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    first_out, cache, first = first_plan
    began = time.perf_counter()
    again = build(fp16_onnx, tmp_path / "b", cache)
    assert again["cached"] and again["cache_key"] == first["cache_key"] and time.perf_counter() - began < 2
    assert (first_out / PLAN_FILE).read_bytes() == (tmp_path / "b" / PLAN_FILE).read_bytes()
    other = build(fp16_onnx, tmp_path / "c", cache, (ProfileShape(1, 128),))
    assert not other["cached"] and other["cache_key"] != first["cache_key"]


@needs_builder
def test_unparsable_onnx_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(EngineError, match=r"cannot parse model\.onnx"):
        build(bad, tmp_path / "out", tmp_path / "cache")


@needs_builder
def test_qa_build_tensorrt_writes_plan_meta_and_refuses_to_run_without_gpu(
    shipped_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QA_TENSORRT_CACHE", str(tmp_path / "cache"))
    out = build_engine(
        BuildConfig(
            checkpoint=shipped_model_dir,
            output=tmp_path / "engine",
            backend="tensorrt",
            fp16=True,
            batch_sizes=(1, 4),
            sequence_lengths=(64, 128),
            workspace_size_mib=512,
        )
    )
    meta = EngineMeta.read(out)
    assert (meta.backend, meta.precision, meta.engine_file) == ("tensorrt", "fp16", PLAN_FILE)
    assert (meta.max_batch_size, meta.sequence_lengths) == (4, (64, 128))
    record = json.loads((out / "meta.json").read_text())["builder_options"]["tensorrt"]
    assert record["profile_shapes"] == [[1, 64], [1, 128], [4, 64], [4, 128]]
    assert meta.backend_version.startswith("tensorrt_rtx ")
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:
        with pytest.raises(EngineError):
            load_engine(out)


def test_runtime_picks_the_smallest_profile_that_holds_the_batch() -> None:
    profiles = [ProfileRange(i, b, s) for i, (b, s) in enumerate([(1, 128), (1, 384), (8, 128), (8, 384)])]
    assert choose_profile(profiles, 1, 100).index == 0
    assert choose_profile(profiles, 1, 200).index == 1
    assert choose_profile(profiles, 5, 128).index == 2
    assert choose_profile(profiles, 8, 129).index == 3
    with pytest.raises(EngineError, match="no optimization profile"):
        choose_profile(profiles, 9, 10)
    assert profile_shapes((8, 1), (384, 128)) == [
        ProfileShape(1, 128),
        ProfileShape(1, 384),
        ProfileShape(8, 128),
        ProfileShape(8, 384),
    ]
    with pytest.raises(EngineError, match="not a TensorRT plan"):
        plan_library(b"\x00\x01\x02\x03rest")


@pytest.mark.gpu
def test_cuda_python_buffers_copy_and_replay_a_graph() -> None:
    """The runtime's cuda-python half (pinned memory, async copies, graph capture and replay), on a GPU."""
    pytest.importorskip("cuda.bindings")
    from cuda.bindings import runtime as cudart
    from realtime_qa.qacore.backends.tensorrt import CudaBuffers, CudaGraph, check

    if cudart.cudaGetDeviceCount()[0] != cudart.cudaError_t.cudaSuccess:
        pytest.skip("no CUDA device")
    buffers = CudaBuffers(capacity=64 * 128)
    stream = buffers.stream
    source, target = buffers.inputs["input_ids"], buffers.outputs["start_logits"]
    graph = CudaGraph(stream)
    graph.begin()  # a device-to-device copy stands in for the engine: input_ids -> start_logits bits
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    check(cudart.cudaMemcpyAsync(target.device_ptr, source.device_ptr, 4 * 3 * 50, kind, stream), "memcpy")
    graph.end()
    rng = np.random.default_rng(0)
    for _ in range(3):
        ids = rng.integers(0, 30000, size=(3, 50), dtype=np.int32)
        from realtime_qa.qacore.features import EngineInputs

        buffers.stage(EngineInputs(ids, ids, ids))
        target.host[:] = np.nan  # poisoned: every element must be written by the copies
        graph.launch()
        out = buffers.fetch(3, 50)
        np.testing.assert_array_equal(out.start_logits.view(np.int32), ids)
    graph.destroy()
    buffers.free()
