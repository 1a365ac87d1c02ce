"""The BERT QA network as a standard ONNX graph, written directly from canonical weights.

    input_ids, segment_ids, input_mask  int32 [batch, seq]  (both axes dynamic)
      -> embeddings: word + position + token type, LayerNorm
      -> N x layer: Q/K/V projections, scaled dot-product attention with an additive mask from
         input_mask, output dense + residual + LayerNorm, intermediate dense + GELU (erf),
         output dense + residual + LayerNorm
      -> qa_outputs -> start_logits, end_logits  float32 [batch, seq]

Each sub-graph is spelled the way ONNX Runtime's transformer optimizer (model_type "bert") expects,
so it fuses them into EmbedLayerNormalization, Attention, SkipLayerNormalization and BiasGelu;
TensorRT's parser reads the same graph. With `GraphOptions.fp16` weights and compute are float16
(LayerNorm statistics in float32) and the logits are cast back to float32, for strongly typed TensorRT.

Initializers keep their canonical names (dense kernels stored transposed get a `.T` suffix) and the
model's metadata records the config and that mapping, so `read_onnx_weights` turns one of our graphs
back into a checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from realtime_qa.builder.model_weights import Checkpoint, expected_shapes
from realtime_qa.qacore.config import ModelConfig
from realtime_qa.qacore.errors import CheckpointError

INPUT_NAMES = ("input_ids", "segment_ids", "input_mask")
OUTPUT_NAMES = ("start_logits", "end_logits")
BATCH, SEQUENCE = "batch", "sequence"
GRAPH_FORMAT = 1
META_CONFIG = "qa.model_config"
META_WEIGHTS = "qa.weights"  # initializer name -> [canonical name, transposed]
META_MODEL_ID = "qa.model_id"
META_FORMAT = "qa.graph_format"
META_PRECISION = "qa.precision"
IR_VERSION = 8  # oldest IR that carries opset 17: readable by every runtime we target
PROTOBUF_LIMIT = 2_000_000_000  # bytes; larger models keep their weights in an external data file


@dataclass(frozen=True)
class GraphOptions:
    fp16: bool = False
    opset: int = 17  # LayerNormalization is an ONNX op from 17 on
    # Added to attention scores of padded keys; -10000 (not float32's lowest) also fits float16.
    mask_value: float = -10000.0


class GraphBuilder:
    """Collects nodes and initializers; each helper returns the name of the tensor it produced."""

    def __init__(self, weights: dict[str, np.ndarray], dtype: type[np.floating]) -> None:
        self.weights = weights
        self.dtype = np.dtype(dtype)
        self.onnx_dtype = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.weight_map: dict[str, tuple[str, bool]] = {}

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, **attributes: Any) -> str:
        """Add a node named `name`; returns its (first) output."""
        return self.ops(op_type, inputs, name, outputs, **attributes)[0]

    def ops(self, op_type: str, inputs: list[str], name: str, outputs: int, **attributes: Any) -> list[str]:
        names = [f"{name}_out{i}" if outputs > 1 else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, **attributes))
        return names

    def param(self, canonical: str, transpose: bool = False) -> str:
        """A model weight as an initializer (in the graph's dtype), recorded for `read_onnx_weights`."""
        name = canonical + (".T" if transpose else "")
        value = self.weights[canonical]
        array = np.ascontiguousarray(value.T if transpose else value, dtype=self.dtype)
        self.initializers[name] = numpy_helper.from_array(array, name)
        self.weight_map[name] = (canonical, transpose)
        return name

    def constant(self, name: str, value: float) -> str:
        """A float scalar in the graph's compute dtype."""
        return self._constant(name, np.asarray(value, dtype=self.dtype))

    def ints(self, name: str, values: int | list[int] | list[list[int]]) -> str:
        return self._constant(name, np.asarray(values, dtype=np.int64))

    def _constant(self, name: str, array: np.ndarray) -> str:
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(array, name)
        return name


def build_graph(checkpoint: Checkpoint, options: GraphOptions | None = None) -> onnx.ModelProto:
    """The ONNX model of `checkpoint` (weights checked against its config beforehand by the loader)."""
    options = options or GraphOptions()
    config = checkpoint.config
    g = GraphBuilder(checkpoint.weights, np.float16 if options.fp16 else np.float32)
    hidden = embeddings(g, config)
    mask_bias = attention_mask_bias(g, options.mask_value)
    for index in range(config.num_hidden_layers):
        hidden = encoder_layer(g, config, f"bert.encoder.layer.{index}", hidden, mask_bias)
    start_logits, end_logits = qa_head(g, hidden)

    graph = helper.make_graph(
        g.nodes,
        f"bert_qa_{checkpoint.model_id}",
        inputs=[helper.make_tensor_value_info(name, TensorProto.INT32, [BATCH, SEQUENCE]) for name in INPUT_NAMES],
        outputs=[
            helper.make_tensor_value_info(OUTPUT_NAMES[0], TensorProto.FLOAT, [BATCH, SEQUENCE]),
            helper.make_tensor_value_info(OUTPUT_NAMES[1], TensorProto.FLOAT, [BATCH, SEQUENCE]),
        ],
        initializer=list(g.initializers.values()),
    )
    # The head's last nodes write the graph outputs by name.
    rename_output(graph, start_logits, OUTPUT_NAMES[0])
    rename_output(graph, end_logits, OUTPUT_NAMES[1])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", options.opset)], producer_name="realtime-qa builder"
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            META_FORMAT: str(GRAPH_FORMAT),
            META_CONFIG: json.dumps(config.to_dict(), sort_keys=True),
            META_MODEL_ID: checkpoint.model_id,
            META_PRECISION: "fp16" if options.fp16 else "fp32",
            META_WEIGHTS: json.dumps({name: list(entry) for name, entry in g.weight_map.items()}, sort_keys=True),
        },
    )
    return model


def save_graph(checkpoint: Checkpoint, path: Path, options: GraphOptions | None = None) -> Path:
    model = build_graph(checkpoint, options)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = model.ByteSize() > PROTOBUF_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=external, location=path.name + ".data")
    return path


# ---------------------------------------------------------------------------------------------- network


def embeddings(g: GraphBuilder, config: ModelConfig) -> str:
    """LayerNorm(word[input_ids] + token_type[segment_ids] + position[0..seq-1])."""
    words = g.op("Gather", [g.param("bert.embeddings.word_embeddings.weight"), "input_ids"], "word_embeddings")
    types = g.op(
        "Gather", [g.param("bert.embeddings.token_type_embeddings.weight"), "segment_ids"], "token_type_embeddings"
    )
    # Position ids as a slice of a constant row, as long as input_ids: the pattern ORT's fusion knows.
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"], "input_shape"), g.ints("const_one", 1)], "seq_len", axis=0)
    seq_end = g.op("Unsqueeze", [seq_len, g.ints("axes_0", [0])], "seq_end")
    all_positions = g.ints("bert.embeddings.position_ids", [list(range(config.max_position_embeddings))])
    position_ids = g.op(
        "Slice",
        [all_positions, g.ints("const_zero_1d", [0]), seq_end, g.ints("axes_1", [1]), g.ints("steps_1", [1])],
        "position_ids",
    )
    positions = g.op(
        "Gather", [g.param("bert.embeddings.position_embeddings.weight"), position_ids], "position_embeddings"
    )
    summed = g.op("Add", [g.op("Add", [words, types], "add_token_types"), positions], "add_positions")
    return layer_norm(g, "bert.embeddings.LayerNorm", summed, config.layer_norm_eps)


def attention_mask_bias(g: GraphBuilder, mask_value: float) -> str:
    """[batch, 1, 1, seq]: 0 for real tokens, `mask_value` for padding, added to every head's scores."""
    mask = g.op("Unsqueeze", ["input_mask", g.ints("axes_1", [1])], "mask_unsqueeze_1")
    mask = g.op("Unsqueeze", [mask, g.ints("axes_2", [2])], "mask_unsqueeze_2")
    mask = g.op("Cast", [mask], "mask_cast", to=g.onnx_dtype)
    inverted = g.op("Sub", [g.constant("const_one_float", 1.0), mask], "mask_invert")
    return g.op("Mul", [inverted, g.constant("mask_value", mask_value)], "mask_bias")


def encoder_layer(g: GraphBuilder, config: ModelConfig, prefix: str, x: str, mask_bias: str) -> str:
    """Post-LN transformer layer: attention + residual + LayerNorm, feed-forward + residual + LayerNorm."""
    attended = self_attention(g, config, f"{prefix}.attention.self", x, mask_bias)
    projected = dense(g, f"{prefix}.attention.output.dense", attended)
    residual = g.op("Add", [projected, x], f"{prefix}.attention.residual")
    x = layer_norm(g, f"{prefix}.attention.output.LayerNorm", residual, config.layer_norm_eps)
    inner = activation(g, dense(g, f"{prefix}.intermediate.dense", x), config.hidden_act, f"{prefix}.intermediate")
    out = dense(g, f"{prefix}.output.dense", inner)
    residual = g.op("Add", [out, x], f"{prefix}.output.residual")
    return layer_norm(g, f"{prefix}.output.LayerNorm", residual, config.layer_norm_eps)


def self_attention(g: GraphBuilder, config: ModelConfig, prefix: str, x: str, mask_bias: str) -> str:
    """softmax(Q K^T / sqrt(d) + mask) V over `num_attention_heads` heads, heads merged back."""
    heads, head_size = config.num_attention_heads, config.head_size
    split_shape = g.ints("shape_split_heads", [0, 0, heads, head_size])

    def heads_of(name: str, perm: list[int]) -> str:
        projected = g.op("Reshape", [dense(g, f"{prefix}.{name}", x), split_shape], f"{prefix}.{name}.split_heads")
        return g.op("Transpose", [projected], f"{prefix}.{name}.transpose", perm=perm)

    query = heads_of("query", [0, 2, 1, 3])  # [batch, heads, seq, head_size]
    key = heads_of("key", [0, 2, 3, 1])  # [batch, heads, head_size, seq]
    value = heads_of("value", [0, 2, 1, 3])
    scores = g.op("MatMul", [query, key], f"{prefix}.scores")
    scores = g.op("Div", [scores, g.constant("const_sqrt_head_size", math.sqrt(head_size))], f"{prefix}.scale")
    scores = g.op("Add", [scores, mask_bias], f"{prefix}.mask")
    probs = g.op("Softmax", [scores], f"{prefix}.softmax", axis=-1)
    context = g.op("MatMul", [probs, value], f"{prefix}.context")
    context = g.op("Transpose", [context], f"{prefix}.context.transpose", perm=[0, 2, 1, 3])
    merged_shape = g.ints("shape_merge_heads", [0, 0, config.hidden_size])
    return g.op("Reshape", [context, merged_shape], f"{prefix}.merge_heads")


def dense(g: GraphBuilder, prefix: str, x: str) -> str:
    """x @ W^T + b, with HF's [out, in] weight stored transposed so MatMul needs no Transpose node."""
    product = g.op("MatMul", [x, g.param(f"{prefix}.weight", transpose=True)], f"{prefix}.matmul")
    return g.op("Add", [product, g.param(f"{prefix}.bias")], f"{prefix}.bias_add")


def layer_norm(g: GraphBuilder, prefix: str, x: str, eps: float) -> str:
    return g.op(
        "LayerNormalization",
        [x, g.param(f"{prefix}.weight"), g.param(f"{prefix}.bias")],
        prefix,
        axis=-1,
        epsilon=eps,
        stash_type=1,  # mean and variance in float32 even for a float16 graph
    )


def activation(g: GraphBuilder, x: str, kind: str, prefix: str) -> str:
    if kind == "relu":
        return g.op("Relu", [x], f"{prefix}.relu")
    one, half = g.constant("const_one_float", 1.0), g.constant("const_half", 0.5)
    if kind == "gelu":  # exact: x * 0.5 * (1 + erf(x / sqrt(2)))
        scaled = g.op("Div", [x, g.constant("const_sqrt_2", math.sqrt(2.0))], f"{prefix}.gelu_div")
        shifted = g.op("Add", [g.op("Erf", [scaled], f"{prefix}.gelu_erf"), one], f"{prefix}.gelu_add")
        return g.op("Mul", [g.op("Mul", [x, shifted], f"{prefix}.gelu_mul"), half], f"{prefix}.gelu")
    # gelu_new / gelu_pytorch_tanh: 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
    cube = g.op("Pow", [x, g.constant("const_three", 3.0)], f"{prefix}.gelu_pow")
    cubic = g.op("Mul", [cube, g.constant("const_gelu_coeff", 0.044715)], f"{prefix}.gelu_cube_mul")
    inner = g.op("Add", [x, cubic], f"{prefix}.gelu_inner")
    scaled = g.op("Mul", [inner, g.constant("const_sqrt_2_over_pi", math.sqrt(2.0 / math.pi))], f"{prefix}.gelu_scale")
    shifted = g.op("Add", [g.op("Tanh", [scaled], f"{prefix}.gelu_tanh"), one], f"{prefix}.gelu_add")
    return g.op("Mul", [g.op("Mul", [x, half], f"{prefix}.gelu_half"), shifted], f"{prefix}.gelu")


def qa_head(g: GraphBuilder, x: str) -> tuple[str, str]:
    """[batch, seq, hidden] -> start and end logits, float32 [batch, seq]."""
    logits = dense(g, "qa_outputs", x)  # [batch, seq, 2]
    if g.dtype != np.float32:
        logits = g.op("Cast", [logits], "qa_outputs.cast_float32", to=TensorProto.FLOAT)
    start, end = g.ops("Split", [logits, g.ints("split_sizes", [1, 1])], "qa_outputs.split", outputs=2, axis=-1)
    return (
        g.op("Squeeze", [start, g.ints("axes_last", [-1])], "start_logits_squeeze"),
        g.op("Squeeze", [end, g.ints("axes_last", [-1])], "end_logits_squeeze"),
    )


def rename_output(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        node.input[:] = [new if name == old else name for name in node.input]


# ---------------------------------------------------------------------------------------------- reading back


def read_onnx_weights(path: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and canonical float32 weights of a graph written by `build_graph`."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError and friends
        raise CheckpointError(f"cannot read ONNX model {path.name}: {exc}") from None
    props = {prop.key: prop.value for prop in model.metadata_props}
    if META_WEIGHTS not in props or META_CONFIG not in props:
        raise CheckpointError(
            f"{path.name} was not written by this builder (no {META_WEIGHTS} metadata); "
            "only our own ONNX graphs can be read back as checkpoints"
        )
    try:
        config = ModelConfig.from_dict(json.loads(props[META_CONFIG]))
        weight_map = {name: (str(entry[0]), bool(entry[1])) for name, entry in json.loads(props[META_WEIGHTS]).items()}
    except (json.JSONDecodeError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"{path.name} has malformed builder metadata: {exc}") from None
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    weights = {}
    for name, (canonical, transposed) in weight_map.items():
        if name not in initializers:
            raise CheckpointError(f"{path.name} is missing initializer {name} (tensor {canonical})")
        array = numpy_helper.to_array(initializers[name], base_dir=str(path.parent)).astype(np.float32)
        weights[canonical] = np.ascontiguousarray(array.T if transposed else array)
    missing = sorted(set(expected_shapes(config)) - set(weights))
    if missing:
        raise CheckpointError(f"{path.name} is missing tensor {missing[0]}")
    return config, weights
