"""The PyTorch engine against the ONNX Runtime engine: fp32 on CPU here, fp16 with CUDA graphs on a GPU."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from realtime_qa.builder.build import BuildConfig, build_engine  # noqa: E402
from realtime_qa.qacore.backends.torch_cuda import (  # noqa: E402
    TorchCudaEngine,
    TorchEngineConfig,
    batch_buckets,
    load_weights,
    sequence_buckets,
)
from realtime_qa.qacore.backends.torch_fused import FusedBertForQA  # noqa: E402
from realtime_qa.qacore.backends.torch_network import BertForQA  # noqa: E402
from realtime_qa.qacore.config import ModelConfig  # noqa: E402
from realtime_qa.qacore.engine import Engine, EngineMeta  # noqa: E402
from realtime_qa.qacore.errors import EngineError  # noqa: E402
from realtime_qa.qacore.factory import EngineOptions, load_engine  # noqa: E402
from realtime_qa.qacore.features import EngineInputs, Featurizer  # noqa: E402
from realtime_qa.qacore.squad import read_dataset  # noqa: E402
from realtime_qa.qacore.tokenization import load_tokenizer  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def real_batches(shipped_model_dir: Path, squad_dir: Path) -> list[EngineInputs]:
    """Windows of real SQuAD dev questions, in batches of 1, 3 and 8 rows padded to their longest."""
    dataset = read_dataset(squad_dir / "dev-v1.1.json.gz")
    featurizer = Featurizer(load_tokenizer(shipped_model_dir))
    windows = []
    for paragraph, question in dataset.questions():
        windows += featurizer.featurize(question.question, paragraph.context).windows
        if len(windows) >= 12:
            break
    return [featurizer.batch(windows[:1]), featurizer.batch(windows[1:4]), featurizer.batch(windows[4:12])]


def cpu_engine(engine_dir: Path, fused: bool = True) -> TorchCudaEngine:
    meta = EngineMeta.read(engine_dir)
    return TorchCudaEngine(
        meta,
        load_weights(engine_dir / meta.engine_file),
        TorchEngineConfig(device="cpu", cuda_graphs=False, fused=fused),
    )


def assert_logits_close(engine: Engine, reference: Engine, batches: list[EngineInputs], atol: float) -> None:
    for batch in batches:
        got, want = engine.infer(batch), reference.infer(batch)
        assert got.start_logits.shape == batch.input_ids.shape and got.start_logits.dtype == np.float32
        valid = batch.input_mask.astype(bool)
        np.testing.assert_allclose(got.start_logits[valid], want.start_logits[valid], atol=atol, rtol=0)
        np.testing.assert_allclose(got.end_logits[valid], want.end_logits[valid], atol=atol, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "training-network"])
def test_cpu_fp32_engine_matches_onnxruntime(
    torch_fp32_engine_dir: Path, ort_fp32_engine_dir: Path, real_batches: list[EngineInputs], fused: bool
) -> None:
    with cpu_engine(torch_fp32_engine_dir, fused) as engine, load_engine(ort_fp32_engine_dir) as ort:
        assert_logits_close(engine, ort, real_batches, atol=2e-3)


def test_fused_network_loads_the_training_state_dict() -> None:
    config = ModelConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    torch.manual_seed(0)
    network = BertForQA(config).eval()
    fused = FusedBertForQA.from_state_dict(config, network.state_dict()).eval()
    ids = torch.randint(0, 300, (3, 21), dtype=torch.int32)
    segments = (torch.arange(21) > 9).int().expand(3, 21).contiguous()
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    with torch.inference_mode():
        start, end = network(ids, segments, mask)
        logits = fused(ids, segments, mask)
    torch.testing.assert_close(logits[..., 0], start, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[..., 1], end, atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match=r"qa_outputs\.weight"):
        FusedBertForQA.from_state_dict(config, {k: v for k, v in network.state_dict().items() if "qa_" not in k})


def test_buckets_pad_at_most_to_the_next_power_of_two_and_multiple_of_64() -> None:
    assert batch_buckets(128) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert batch_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert batch_buckets(1) == (1,)
    assert sequence_buckets((128, 384)) == (64, 128, 192, 256, 320, 384)
    assert sequence_buckets((100,)) == (64, 100)


def test_engine_refuses_what_it_cannot_run(torch_fp32_engine_dir: Path) -> None:
    meta = EngineMeta.read(torch_fp32_engine_dir)
    weights = load_weights(torch_fp32_engine_dir / meta.engine_file)
    with pytest.raises(EngineError, match="fp32 only"):
        TorchCudaEngine(meta, weights, TorchEngineConfig(device="cpu", cuda_graphs=False, precision="fp16"))
    with pytest.raises(EngineError, match="CUDA graphs need a CUDA device"):
        TorchEngineConfig(device="cpu", cuda_graphs=True)
    with pytest.raises(EngineError, match="do not fit"):
        TorchCudaEngine(
            meta, {k: v for k, v in weights.items() if "layer.0." not in k}, TorchEngineConfig("cpu", cuda_graphs=False)
        )
    engine = cpu_engine(torch_fp32_engine_dir)
    too_long = np.ones((1, meta.max_seq_length + 1), np.int32)
    with pytest.raises(EngineError, match="exceeds"):
        engine.infer(EngineInputs(too_long, too_long, too_long))
    with pytest.raises(EngineError, match="one \\[batch, seq\\] shape"):
        engine.infer(EngineInputs(np.ones((2, 8), np.int32), np.ones((2, 9), np.int32), np.ones((2, 8), np.int32)))


# -- GPU -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_engine_dir(shipped_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("torch16") / "engine"
    config = BuildConfig(checkpoint=shipped_model_dir, output=out, backend="torch", fp16=True, batch_sizes=(1, 8, 64))
    return build_engine(config)


@pytest.mark.gpu
@needs_cuda
def test_gpu_fp16_graphs_match_onnxruntime(
    fp16_engine_dir: Path, ort_fp32_engine_dir: Path, real_batches: list[EngineInputs]
) -> None:
    with (
        load_engine(fp16_engine_dir, EngineOptions(use_cuda_graphs=True)) as engine,
        load_engine(ort_fp32_engine_dir) as ort,
    ):
        assert isinstance(engine, TorchCudaEngine) and engine.precision == "fp16"
        assert_logits_close(engine, ort, real_batches, atol=0.05)


@pytest.mark.gpu
@needs_cuda
def test_gpu_blocking_sync_waits_for_the_same_results(fp16_engine_dir: Path, real_batches: list[EngineInputs]) -> None:
    """`EngineOptions(gpu_blocking_sync=True)` (qa-serve --gpu-sync block): the thread sleeps on an event instead
    of spinning, and reads the same results, logits and device spans alike."""
    with (
        load_engine(fp16_engine_dir, EngineOptions(gpu_blocking_sync=True)) as sleeping,
        load_engine(fp16_engine_dir, EngineOptions()) as spinning,
    ):
        assert isinstance(sleeping, TorchCudaEngine) and isinstance(spinning, TorchCudaEngine)
        assert sleeping._done is not None and spinning._done is None
        for batch in real_batches:
            np.testing.assert_array_equal(sleeping.infer(batch).start_logits, spinning.infer(batch).start_logits)
            may = batch.input_mask.astype(bool)
            got, expected = sleeping.infer_spans(batch, may, may, 30), spinning.infer_spans(batch, may, may, 30)
            np.testing.assert_array_equal(got.starts, expected.starts)
            np.testing.assert_array_equal(got.logits, expected.logits)


@pytest.mark.gpu
@needs_cuda
def test_gpu_launched_span_search_reads_what_infer_spans_returns(
    fp16_engine_dir: Path, real_batches: list[EngineInputs]
) -> None:
    """`launch_spans` (the service's event loop polls it) queues the search and returns; once `ready()`, its result
    is exactly the waiting call's, taken once. An engine that sleeps on its waits (--gpu-sync block) does not launch."""
    with (
        load_engine(fp16_engine_dir, EngineOptions()) as engine,
        load_engine(fp16_engine_dir, EngineOptions(gpu_blocking_sync=True)) as sleeping,
    ):
        assert isinstance(engine, TorchCudaEngine) and engine.launches_spans() and not sleeping.launches_spans()
        for batch in real_batches:
            may = batch.input_mask.astype(bool)
            expected = engine.infer_spans(batch, may, may, 30)
            pending = engine.launch_spans(batch, may, may, 30)
            deadline = time.monotonic() + 30
            while not pending.ready():
                assert time.monotonic() < deadline, "the launched search never finished"
            got = pending.result()
            for name in ("starts", "ends", "logits", "null_logits"):
                np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))
            with pytest.raises(EngineError, match="already taken"):
                pending.result()
        with pytest.raises(EngineError, match="does not launch"):
            sleeping.launch_spans(batch, may, may, 30)


@pytest.mark.gpu
@needs_cuda
def test_gpu_padding_to_buckets_does_not_change_a_row(fp16_engine_dir: Path, real_batches: list[EngineInputs]) -> None:
    batch = real_batches[1]  # 3 rows, padded by the engine to 4 x (next multiple of 64)
    with load_engine(fp16_engine_dir, EngineOptions(use_cuda_graphs=True)) as engine:
        together = engine.infer(batch)
        for row in range(batch.batch_size):
            width = int(batch.input_mask[row].sum())
            alone = engine.infer(
                EngineInputs(batch.input_ids[row : row + 1, :width], batch.segment_ids[row : row + 1, :width],
                             batch.input_mask[row : row + 1, :width])
            )  # fmt: skip
            assert alone.start_logits.shape == (1, width)
            np.testing.assert_allclose(alone.start_logits[0], together.start_logits[row, :width], atol=0.02)
            np.testing.assert_allclose(alone.end_logits[0], together.end_logits[row, :width], atol=0.02)
        eager = TorchCudaEngine(engine.meta, load_weights(fp16_engine_dir / "model.safetensors"),
                                TorchEngineConfig(cuda_graphs=False))  # fmt: skip
        np.testing.assert_allclose(eager.infer(batch).start_logits, together.start_logits, atol=0.02)


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_gpu_squad_f1_equals_onnxruntime_f1(fp16_engine_dir: Path, ort_fp32_engine_dir: Path, squad_dir: Path) -> None:
    """SQuAD v1.1 dev F1 through the fp16 CUDA-graph engine equals the CPU engine's within 0.1.

    QA_F1_LIMIT=N scores the first N questions only (quick local runs); the claim needs the full set.
    """
    from realtime_qa.qacore.answerer import QuestionAnswerer, featurizer_for_engine
    from realtime_qa.qacore.squad_answering import answer_dataset
    from realtime_qa.qacore.squad_metric import evaluate

    dataset = read_dataset(squad_dir / "dev-v1.1.json.gz")
    limit = int(os.environ.get("QA_F1_LIMIT", "0"))
    if limit:
        dataset = dataset.head(limit)
    scores, seconds = {}, {}
    for name, engine_dir, options in (
        ("torch", fp16_engine_dir, EngineOptions(use_cuda_graphs=True)),
        ("onnxruntime", ort_fp32_engine_dir, EngineOptions()),
    ):
        engine = load_engine(engine_dir, options)
        with QuestionAnswerer(engine, featurizer_for_engine(engine, engine_dir, None)) as answerer:
            run = answer_dataset(answerer, dataset, batch_size=32, progress=False)
        scores[name] = evaluate(dataset, run.predictions, "1.1")
        seconds[name] = run.wall_ns / 1e9
    if os.environ.get("QA_F1_OUT"):  # the GPU run keeps the numbers for the results file
        record = {name: {"scores": score.values, "seconds": seconds[name]} for name, score in scores.items()}
        Path(os.environ["QA_F1_OUT"]).write_text(json.dumps({"questions": dataset.num_questions, **record}, indent=2))
    print(f"SQuAD v1.1 dev, {dataset.num_questions} questions: torch fp16 {scores['torch'].to_json()}, "
          f"ONNX Runtime fp32 {scores['onnxruntime'].to_json()}")  # fmt: skip
    assert abs(float(scores["torch"]["f1"]) - float(scores["onnxruntime"]["f1"])) <= 0.1
