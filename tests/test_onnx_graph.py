"""The ONNX graph built from weights computes what Hugging Face's BertForQuestionAnswering computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from realtime_qa.builder.checkpoint import Checkpoint, expected_shapes, load_checkpoint
from realtime_qa.builder.onnx_graph import GraphOptions, build_graph, save_graph
from realtime_qa.qacore.config import ModelConfig
from realtime_qa.qacore.engine import EngineMeta
from realtime_qa.qacore.features import EngineInputs, Featurizer
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.qacore.tokenization import load_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MAX_RELATIVE_ERROR = 1e-4


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def shipped(shipped_model_dir: Path) -> Checkpoint:
    return load_checkpoint(shipped_model_dir)


@pytest.fixture(scope="module")
def squad_batch(shipped_model_dir: Path, squad_dir: Path) -> EngineInputs:
    """Windows of six dev questions (one with a passage longer than a window), padded to the longest."""
    featurizer = Featurizer(load_tokenizer(shipped_model_dir))
    dataset = read_dataset(squad_dir / "dev-v1.1.json.gz")
    windows = []
    for paragraph, question in list(dataset.questions(limit=400))[::80]:
        windows += featurizer.featurize(question.question, paragraph.context).windows
    long_passage = " ".join(paragraph.context for paragraph, _ in list(dataset.questions(limit=60))[::12])
    windows += featurizer.featurize("Who founded the company?", long_passage).windows
    batch = featurizer.batch(windows)
    assert batch.input_mask.min() == 0 and batch.batch_size >= 7  # padding is present
    return batch


@pytest.fixture(scope="module")
def fp32_graph(shipped: Checkpoint) -> onnx.ModelProto:
    return build_graph(shipped)


@pytest.fixture(scope="module")
def fp32_graph_logits(fp32_graph: onnx.ModelProto, squad_batch: EngineInputs) -> tuple[np.ndarray, np.ndarray]:
    return run_onnx(fp32_graph, squad_batch)


@pytest.fixture(scope="module")
def transformers_logits(shipped: Checkpoint, squad_batch: EngineInputs) -> tuple[np.ndarray, np.ndarray]:
    """What Hugging Face's BertForQuestionAnswering computes on the batch (eager attention: the reference
    implementation), computed once for the graphs compared with it."""
    return reference_logits(shipped, squad_batch, attn_implementation="eager")


def reference_logits(checkpoint: Checkpoint, batch: EngineInputs, **config: object) -> tuple[np.ndarray, np.ndarray]:
    hf_config = transformers.BertConfig(**{**checkpoint.config.to_dict(), **config})
    model = transformers.BertForQuestionAnswering(hf_config).eval()
    missing, unexpected = model.load_state_dict(
        {name: torch.from_numpy(value) for name, value in checkpoint.weights.items()}, strict=False
    )
    assert not unexpected and all("pooler" in name or "position_ids" in name for name in missing)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(batch.input_ids).long(),
            token_type_ids=torch.from_numpy(batch.segment_ids).long(),
            attention_mask=torch.from_numpy(batch.input_mask).long(),
        )
    return out.start_logits.numpy(), out.end_logits.numpy()


def run_onnx(model: onnx.ModelProto | Path, batch: EngineInputs) -> tuple[np.ndarray, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    start, end = session.run(
        ["start_logits", "end_logits"],
        {"input_ids": batch.input_ids, "segment_ids": batch.segment_ids, "input_mask": batch.input_mask},
    )
    return start, end


def test_graph_signature(fp32_graph: onnx.ModelProto) -> None:
    model = fp32_graph
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    for value in model.graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT32
        assert [dim.dim_param for dim in value.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert [value.name for value in model.graph.input] == ["input_ids", "segment_ids", "input_mask"]
    assert [value.name for value in model.graph.output] == ["start_logits", "end_logits"]
    for value in model.graph.output:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert [dim.dim_param for dim in value.type.tensor_type.shape.dim] == ["batch", "sequence"]


def test_fp32_graph_matches_transformers(
    transformers_logits: tuple[np.ndarray, np.ndarray],
    fp32_graph_logits: tuple[np.ndarray, np.ndarray],
    squad_batch: EngineInputs,
) -> None:
    want_start, want_end = transformers_logits
    got_start, got_end = fp32_graph_logits
    assert got_start.shape == squad_batch.input_ids.shape and got_start.dtype == np.float32
    assert relative_error(got_start, want_start) < MAX_RELATIVE_ERROR
    assert relative_error(got_end, want_end) < MAX_RELATIVE_ERROR


def test_fused_engine_graph_matches_transformers(
    transformers_logits: tuple[np.ndarray, np.ndarray], squad_batch: EngineInputs, ort_fp32_engine_dir: Path
) -> None:
    want_start, want_end = transformers_logits
    got_start, got_end = run_onnx(ort_fp32_engine_dir / "model.onnx", squad_batch)
    assert relative_error(got_start, want_start) < MAX_RELATIVE_ERROR
    assert relative_error(got_end, want_end) < MAX_RELATIVE_ERROR


def test_ort_fuses_every_bert_pattern(ort_fp32_engine_dir: Path) -> None:
    layers = 6
    want = {"EmbedLayerNormalization": 1, "Attention": layers, "SkipLayerNormalization": 2 * layers, "BiasGelu": layers}
    meta = EngineMeta.read(ort_fp32_engine_dir)
    assert meta.builder_options["fused_ops"] == want
    graph = onnx.load(str(ort_fp32_engine_dir / meta.engine_file)).graph
    ops = [node.op_type for node in graph.node]
    assert {op: ops.count(op) for op in want} == want
    # What is left unfused: the MatMuls feeding fused ops, and the span head's split.
    assert "LayerNormalization" not in ops and "Softmax" not in ops and "Erf" not in ops
    embed = next(node for node in graph.node if node.op_type == "EmbedLayerNormalization")
    assert "input_mask" in embed.input  # the attention mask is folded into the embedding node


def test_fp16_graph_for_strongly_typed_tensorrt(
    shipped: Checkpoint,
    fp32_graph: onnx.ModelProto,
    fp32_graph_logits: tuple[np.ndarray, np.ndarray],
    squad_batch: EngineInputs,
    tmp_path: Path,
) -> None:
    path = save_graph(shipped, tmp_path / "fp16.onnx", GraphOptions(fp16=True))
    model = onnx.load(str(path))
    weights = [t for t in model.graph.initializer if t.name.startswith(("bert.encoder", "bert.embeddings.word"))]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    assert path.stat().st_size < 0.55 * fp32_graph.ByteSize()
    fp32_start, fp32_end = fp32_graph_logits
    fp16_start, fp16_end = run_onnx(path, squad_batch)
    assert fp16_start.dtype == np.float32
    assert relative_error(fp16_start, fp32_start) < 2e-2
    assert relative_error(fp16_end, fp32_end) < 2e-2


@pytest.mark.parametrize("hidden_act", ["gelu_new", "relu"])
def test_other_activations_match_transformers(hidden_act: str, squad_batch: EngineInputs) -> None:
    config = ModelConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_act=hidden_act,
    )
    rng = np.random.default_rng(3)
    weights = {
        name: (rng.normal(0, 0.2, shape) + (1.0 if name.endswith("LayerNorm.weight") else 0.0)).astype(np.float32)
        for name, shape in expected_shapes(config).items()
    }
    tiny = Checkpoint(config, weights, Path("."), "0" * 64, "tiny")
    want_start, want_end = reference_logits(tiny, squad_batch, attn_implementation="eager")
    got_start, got_end = run_onnx(build_graph(tiny), squad_batch)
    assert relative_error(got_start, want_start) < MAX_RELATIVE_ERROR
    assert relative_error(got_end, want_end) < MAX_RELATIVE_ERROR
