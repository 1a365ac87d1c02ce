"""The layer-fused Triton forward and the device span search against plain-torch references.

On CPU the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess so no
other test's kernels are interpreted); on a GPU (marker `gpu`) they run compiled, inside CUDA graphs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from realtime_qa.qacore.backends.torch_cuda import TorchCudaEngine, TorchEngineConfig, load_weights  # noqa: E402
from realtime_qa.qacore.backends.torch_spans import NO_SPAN, top_spans_reference  # noqa: E402
from realtime_qa.qacore.engine import EngineMeta  # noqa: E402
from realtime_qa.qacore.features import EngineInputs, Featurizer  # noqa: E402
from realtime_qa.qacore.squad import read_dataset  # noqa: E402
from realtime_qa.qacore.tokenization import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_interpreted(script: str) -> str:
    """Run `script` in a fresh Python with Triton's interpreter on; its stdout."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_layer_fused_kernels_compute_the_fused_module_function_on_any_input() -> None:
    """Random weights, two sequence lengths (one not a multiple of the tiles), a padded row and an all-padding
    row: the four-kernels-per-layer forward equals the plain-torch forward in float32."""
    out = run_interpreted(
        """
        import torch
        from realtime_qa.qacore.config import ModelConfig
        from realtime_qa.qacore.backends.torch_network import BertForQA
        from realtime_qa.qacore.backends.torch_fused import FusedBertForQA
        from realtime_qa.qacore.backends import torch_layer_kernels
        config = ModelConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=128)
        for seed, (batch, seq) in enumerate(((3, 70), (1, 32))):
            torch.manual_seed(seed)
            network = BertForQA(config).eval()
            module = FusedBertForQA.from_state_dict(config, network.state_dict(), use_triton=False).eval()
            ids = torch.randint(0, 300, (batch, seq), dtype=torch.int32)
            segments = (torch.arange(seq) > seq // 3).int().expand(batch, seq).contiguous()
            mask = torch.ones_like(ids)
            if batch > 1:
                mask[1, 40:] = 0
                mask[2, :] = 0
            with torch.inference_mode():
                want = module(ids, segments, mask)
                got = torch_layer_kernels.forward(module, ids, segments, mask)
            assert got.shape == want.shape == (batch, seq, 2) and got.dtype == torch.float32
            print(float((got - want).abs().max()), float(want.abs().max()))
        """
    )
    for line in out.strip().splitlines():
        difference, scale = map(float, line.split())
        assert scale > 0.1 and difference < 1e-4


@pytest.mark.slow
def test_device_span_search_kernel_equals_the_reference() -> None:
    out = run_interpreted(
        """
        import numpy as np, torch
        from realtime_qa.qacore.backends.torch_spans import top_spans, top_spans_reference
        rng = np.random.default_rng(3)
        for batch, seq, band, top_k in ((3, 70, 32, 6), (2, 128, 8, 40), (1, 20, 4, 50)):
            logits = torch.from_numpy(rng.normal(size=(batch, seq, 2)).astype(np.float32))
            flags = torch.from_numpy(rng.integers(0, 4, size=(batch, seq)).astype(np.int32))
            flags[:, 0] = torch.from_numpy(rng.integers(1, band + 1, size=batch).astype(np.int32))
            got, want = top_spans(logits, flags, top_k, band), top_spans_reference(logits, flags, top_k)
            assert got.shape == want.shape == (batch, 1 + 3 * top_k)
            assert torch.equal(got, want), (got - want).abs().max()
            print(int((want[:, 3::3] > -1e38).sum()))
        """
    )
    found = [int(line) for line in out.split()]
    assert found[0] > 0 and found[2] < 50  # spans found; and a row with fewer valid spans than k


def brute_force_spans(
    start: np.ndarray, end: np.ndarray, flags: np.ndarray, length: int
) -> list[tuple[float, int, int]]:
    spans = [
        (float(start[s]) + float(end[e]), s, e)
        for s in range(1, len(start))
        for e in range(s, min(len(end), s + length))
        if flags[s] & 1 and flags[e] & 2
    ]
    return sorted(spans, reverse=True)


def test_span_reference_is_the_exact_top_k_of_valid_pairs() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 50, 2)).astype(np.float32)
    flags = rng.integers(0, 4, size=(2, 50)).astype(np.int32)
    flags[:, 0] = (7, 1)
    found = top_spans_reference(torch.from_numpy(logits), torch.from_numpy(flags), 10).numpy()
    assert found.shape == (2, 31)
    for row in range(2):
        assert found[row, 0] == pytest.approx(logits[row, 0, 0] + logits[row, 0, 1])
        want = brute_force_spans(logits[row, :, 0], logits[row, :, 1], flags[row], int(flags[row, 0]))[:10]
        got = found[row, 1:].reshape(10, 3)
        for (logit, s, e), (gs, ge, glogit) in zip(want, got, strict=False):
            assert (gs, ge) == (s, e) and glogit == pytest.approx(logit, abs=1e-5)
        assert all(got[len(want) :, 2] == NO_SPAN)


@pytest.fixture(scope="module")
def windows_batch(shipped_model_dir: Path, squad_dir: Path) -> tuple[EngineInputs, np.ndarray, np.ndarray]:
    """Real SQuAD windows, with the masks of where answers may start and end."""
    dataset = read_dataset(squad_dir / "dev-v1.1.json.gz")
    featurizer = Featurizer(load_tokenizer(shipped_model_dir))
    windows = []
    for paragraph, question in dataset.questions():
        windows += featurizer.featurize(question.question, paragraph.context).windows
        if len(windows) >= 5:
            break
    batch = featurizer.batch(windows[:5])
    may_start = np.zeros(batch.input_ids.shape, bool)
    may_end = np.zeros_like(may_start)
    for row, window in enumerate(windows[:5]):
        context = slice(window.context_offset, window.context_offset + window.length)
        may_start[row, context] = window.max_context
        may_end[row, context] = True
    return batch, may_start, may_end


def open_torch_engine(engine_dir: Path, config: TorchEngineConfig) -> TorchCudaEngine:
    meta = EngineMeta.read(engine_dir)
    return TorchCudaEngine(meta, load_weights(engine_dir / meta.engine_file), config)


def assert_spans_match_logits(engine: TorchCudaEngine, batch: EngineInputs, may_start: np.ndarray,
                              may_end: np.ndarray, atol: float) -> None:  # fmt: skip
    """The engine's device spans are the best valid pairs of its own logits."""
    outputs = engine.infer(batch)
    spans = engine.infer_spans(batch, may_start, may_end, 30)
    top_k = engine.config.span_top_k
    assert spans.starts.shape == spans.ends.shape == spans.logits.shape == (batch.batch_size, top_k)
    flags = may_start.astype(np.int32) + 2 * may_end.astype(np.int32)
    for row in range(batch.batch_size):
        want = brute_force_spans(outputs.start_logits[row], outputs.end_logits[row], flags[row], 30)[:top_k]
        np.testing.assert_allclose(spans.logits[row, : len(want)], [w[0] for w in want], atol=atol)
        if want[0][0] - want[1][0] > 10 * atol:  # a clear best span (not a tie within rounding) is the same span
            assert (spans.starts[row, 0], spans.ends[row, 0]) == want[0][1:]
        assert spans.null_logits[row] == pytest.approx(
            outputs.start_logits[row, 0] + outputs.end_logits[row, 0], abs=atol
        )


def test_cpu_engine_searches_spans_of_its_own_logits(
    torch_fp32_engine_dir: Path, windows_batch: tuple[EngineInputs, np.ndarray, np.ndarray]
) -> None:
    with open_torch_engine(torch_fp32_engine_dir, TorchEngineConfig(device="cpu", cuda_graphs=False)) as engine:
        assert engine.span_search_limits() == (40, 32)
        assert_spans_match_logits(engine, *windows_batch, atol=1e-4)


# -- GPU ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_engine_dir(shipped_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from realtime_qa.builder.build import BuildConfig, build_engine

    out = tmp_path_factory.mktemp("torch16-layer") / "engine"
    return build_engine(BuildConfig(checkpoint=shipped_model_dir, output=out, backend="torch", fp16=True,
                                    batch_sizes=(1, 8)))  # fmt: skip


@pytest.mark.gpu
@needs_cuda
def test_gpu_layer_fused_graphs_match_the_previous_engine(
    fp16_engine_dir: Path, windows_batch: tuple[EngineInputs, np.ndarray, np.ndarray]
) -> None:
    batch = windows_batch[0]
    with (
        open_torch_engine(fp16_engine_dir, TorchEngineConfig(layer_fusion=True)) as layered,
        open_torch_engine(fp16_engine_dir, TorchEngineConfig(layer_fusion=False, splitk_gemm=False)) as previous,
        open_torch_engine(fp16_engine_dir, TorchEngineConfig(layer_fusion=True, cuda_graphs=False)) as eager,
    ):
        assert layered.module.runs_layer_kernels and not previous.module.runs_layer_kernels
        got, want = layered.infer(batch), previous.infer(batch)
        valid = batch.input_mask.astype(bool)
        np.testing.assert_allclose(got.start_logits[valid], want.start_logits[valid], atol=0.05)
        np.testing.assert_allclose(got.end_logits[valid], want.end_logits[valid], atol=0.05)
        np.testing.assert_allclose(eager.infer(batch).start_logits, got.start_logits, atol=0.02)
        for row in range(batch.batch_size):  # a row alone (batch 1, its own width) equals the row in the batch
            width = int(batch.input_mask[row].sum())
            alone = layered.infer(EngineInputs(*(a[row : row + 1, :width] for a in (batch.input_ids,
                                  batch.segment_ids, batch.input_mask))))  # fmt: skip
            np.testing.assert_allclose(alone.start_logits[0], got.start_logits[row, :width], atol=0.02)


@pytest.mark.gpu
@needs_cuda
def test_gpu_span_graph_finds_the_best_spans_of_the_logits(
    fp16_engine_dir: Path, windows_batch: tuple[EngineInputs, np.ndarray, np.ndarray]
) -> None:
    with open_torch_engine(fp16_engine_dir, TorchEngineConfig()) as engine:
        assert_spans_match_logits(engine, *windows_batch, atol=5e-3)


def test_answers_from_device_spans_equal_answers_from_logits(
    torch_fp32_engine_dir: Path, shipped_model_dir: Path, squad_dir: Path
) -> None:
    """The answerer uses an engine's span search when it has one; the answers are those decoded from logits."""
    from realtime_qa.benchmarks.engine_bench import LogitsOnly
    from realtime_qa.qacore.answerer import QuestionAnswerer
    from realtime_qa.qacore.decoding import DecoderConfig, uses_device_spans

    dataset = read_dataset(squad_dir / "dev-v1.1.json.gz")
    items = [(q.question, p.context) for p, q in dataset.questions(limit=16)]  # enough spans; 40 took 10 s
    featurizer = Featurizer(load_tokenizer(shipped_model_dir))
    with open_torch_engine(torch_fp32_engine_dir, TorchEngineConfig(device="cpu", cuda_graphs=False)) as engine:
        assert uses_device_spans(engine, DecoderConfig()) and not uses_device_spans(
            engine, DecoderConfig(n_best_size=21)
        )
        assert not uses_device_spans(LogitsOnly(engine), DecoderConfig())
        with_spans = QuestionAnswerer(engine, featurizer).answer_many(items)
        with_logits = QuestionAnswerer(LogitsOnly(engine), featurizer).answer_many(items)
    for spans, logits in zip(with_spans, with_logits, strict=True):
        assert spans.prediction.text == logits.prediction.text and spans.prediction.text
        got = [(span.start, span.end) for span in spans.prediction.nbest]
        want = [(span.start, span.end) for span in logits.prediction.nbest]
        assert got[:5] == want[:5]
        assert spans.prediction.nbest[0].score == pytest.approx(logits.prediction.nbest[0].score, abs=1e-3)
        assert spans.prediction.null_logit == pytest.approx(logits.prediction.null_logit, abs=1e-3)


def test_decode_spans_refuses_spans_that_do_not_fit_or_are_not_numbers(shipped_model_dir: Path) -> None:
    from realtime_qa.qacore.decoding import decode_spans
    from realtime_qa.qacore.engine import EngineSpans
    from realtime_qa.qacore.errors import EngineFaultError, InvalidInputError

    features = Featurizer(load_tokenizer(shipped_model_dir)).featurize("Who wrote it?", "Ada Lovelace wrote it.")
    window = features.windows[0]
    first = window.context_offset
    spans = EngineSpans(
        starts=np.array([[first, first + 1, -1]], np.int32),
        ends=np.array([[first + 1, first + 1, -1]], np.int32),
        logits=np.array([[5.0, 2.0, -np.inf]], np.float32),
        null_logits=np.array([1.0], np.float32),
    )
    prediction = decode_spans(features, spans)
    offsets = features.passage.offsets  # the best span is the window's first two passage tokens
    assert prediction.text == "Ada Lovelace wrote it."[offsets[0, 0] : offsets[1, 1]] == "Ada Love"
    assert len(prediction.nbest) == 2
    assert prediction.nbest[0].score > prediction.nbest[1].score and prediction.null_logit == 1.0
    with pytest.raises(InvalidInputError, match="windows"):
        decode_spans(features, EngineSpans(*(np.concatenate([a, a]) for a in (spans.starts, spans.ends, spans.logits,
                                           spans.null_logits))))  # fmt: skip
    with pytest.raises(EngineFaultError):
        decode_spans(features, EngineSpans(spans.starts, spans.ends, spans.logits, np.array([np.nan], np.float32)))
