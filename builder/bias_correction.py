"""Bias correction for the INT8 CPU graph: take each quantized MatMul's mean rounding error out of its bias.

Quantizing a MatMul y = x W (uint8 activations per tensor, int8 weights per output channel) adds an error
e = QDQ(x) DQ(Wq) - x W to every output. Its spread is noise, but its mean per output channel is a systematic
shift: W's rounding error weighted by E[x], which is far from zero after a LayerNorm or a GELU. Measured over the
calibration windows on the INT8 graph's own activations (so each MatMul sees inputs as quantized as at run time)
and subtracted from the bias that follows the MatMul, the shift is gone at no run-time cost (Nagel et al., "Data-
Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019, in its empirical form).

The shifts are stored in the calibration cache beside the ranges and the smoothing maxima, so a build from the
shipped cache needs no SQuAD data and writes the same graph (`builder.onnxruntime_build.quantize_int8`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The fused CPU graph's op that adds each MatMul's bias, and which of its inputs the bias is.
BIAS_INPUT = {"SkipLayerNormalization": 4, "BiasGelu": 1, "Add": 1}


@dataclass(frozen=True)
class _QuantizedMatMul:
    name: str
    activation: str  # the float tensor the QuantizeLinear in front of the MatMul quantizes
    scale: float
    zero_point: int
    weight: np.ndarray  # DQ(Wq), float32 [in, out]
    bias: str  # the bias initializer that follows the MatMul


def _quantized_matmuls(model: Any) -> list[_QuantizedMatMul]:
    """Each MatMul of a QDQ graph whose weight is a dequantized constant and whose bias follows it."""
    from onnx import numpy_helper

    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {initializer.name: initializer for initializer in graph.initializer}

    def constant(name: str) -> np.ndarray:
        return numpy_helper.to_array(initializers[name])

    found = []
    for node in graph.node:
        weight_dq, input_dq = producer.get(node.input[1]), producer.get(node.input[0])
        if node.op_type != "MatMul" or weight_dq is None or weight_dq.op_type != "DequantizeLinear":
            continue
        if weight_dq.input[0] not in initializers or input_dq is None or input_dq.op_type != "DequantizeLinear":
            continue
        quantize = producer[input_dq.input[0]]
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type not in BIAS_INPUT:
            continue
        bias = users[0].input[BIAS_INPUT[users[0].op_type]]
        if bias not in initializers:
            continue
        axis = next((attribute.i for attribute in weight_dq.attribute if attribute.name == "axis"), 1)
        scales = constant(weight_dq.input[1]).astype(np.float32)
        weight = constant(weight_dq.input[0]).astype(np.float32) * (scales[None, :] if axis == 1 else scales[:, None])
        found.append(
            _QuantizedMatMul(
                node.name,
                quantize.input[0],
                float(constant(input_dq.input[1])),
                int(constant(input_dq.input[2])),
                weight,
                bias,
            )
        )
    return found


def measure_bias_shift(
    float_path: Path, int8_path: Path, feeds: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, list[float]]:
    """Each quantized MatMul's mean output error per output channel, by MatMul name, over the valid tokens
    (`input_mask`) of `feeds`; `float_path` is the graph that was quantized (its MatMuls hold the float weights).

    Values are rounded to 6 significant digits, the precision they are stored with."""
    import onnx
    import onnxruntime

    float_graph = onnx.load(str(float_path)).graph
    float_weights = {initializer.name: initializer for initializer in float_graph.initializer}
    weight_names = {node.name: node.input[1] for node in float_graph.node if node.op_type == "MatMul"}
    model = onnx.load(str(int8_path))
    matmuls = _quantized_matmuls(model)
    float_weight = {
        matmul.name: onnx.numpy_helper.to_array(float_weights[weight_names[matmul.name]]).astype(np.float32)
        for matmul in matmuls
    }
    known = {output.name for output in model.graph.output}
    for tensor in sorted({matmul.activation for matmul in matmuls} - known):
        model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    # As written (DequantizeLinear then a float MatMul): the activations do not depend on the host's integer kernels.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    tensors = [matmul.activation for matmul in matmuls]
    totals = {matmul.name: np.zeros(matmul.weight.shape[1], np.float64) for matmul in matmuls}
    rows = 0
    for feed in feeds:
        valid = np.asarray(feed["input_mask"]).reshape(-1) != 0
        values = dict(zip(tensors, session.run(tensors, dict(feed)), strict=True))
        for matmul in matmuls:
            x = values[matmul.activation].reshape(-1, matmul.weight.shape[0])[valid]
            steps = np.clip(np.rint(x / matmul.scale) + matmul.zero_point, 0, 255) - matmul.zero_point
            error = (steps * matmul.scale) @ matmul.weight - x @ float_weight[matmul.name]
            totals[matmul.name] += error.sum(axis=0)
        rows += int(valid.sum())
    if rows == 0:
        raise ValueError("no calibration feeds")
    return {name: [float(f"{value:.6g}") for value in total / rows] for name, total in totals.items()}


def apply_bias_shift(int8_path: Path, shifts: Mapping[str, list[float]]) -> int:
    """Subtract each MatMul's shift from the bias after it, in place; returns how many biases changed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(int8_path))
    initializers = {initializer.name: initializer for initializer in model.graph.initializer}
    changed = 0
    for matmul in _quantized_matmuls(model):
        if matmul.name not in shifts:
            continue
        bias = numpy_helper.to_array(initializers[matmul.bias])
        shift = np.asarray(shifts[matmul.name], dtype=np.float64)
        if shift.shape != bias.shape:
            raise ValueError(f"{matmul.name}: a shift of {shift.size} channels for a bias of {bias.size}")
        corrected = (bias.astype(np.float64) - shift).astype(bias.dtype)
        initializers[matmul.bias].CopyFrom(numpy_helper.from_array(corrected, matmul.bias))
        changed += 1
    onnx.save(model, str(int8_path))
    return changed
