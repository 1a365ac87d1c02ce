"""SmoothQuant for the INT8 CPU graph: move the activations' outlier channels into the weights before quantizing.

BERT's LayerNorm outputs carry a few channels far larger than the rest (the shipped model's calibration:
ranges up to ~30 where most values lie within a few units), and its GELU outputs are skewed the same way.
One uint8 scale per tensor that covers those channels leaves the ordinary ones a handful of steps. For a MatMul
X @ W, dividing X's input channel j by s_j and multiplying W's row j by s_j leaves the product unchanged in exact
arithmetic; with s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (Xiao et al., "SmoothQuant", ICML 2023) the
activations become easy to quantize per tensor and the weights, quantized per output channel, absorb the rest.

The division is an explicit Mul in front of each smoothed MatMul rather than folded into the producer: the
inputs chosen here either also feed the residual stream (a LayerNorm output) or come out of a nonlinearity
(GELU), so neither producer can carry the scale. The twelve Muls of the shipped model cost ~0.3 ms of the seed
question's ~8 ms on two cores (benchmarks/results/cpu_accuracy.md); a per-channel QuantizeLinear instead would
spare them, but ONNX Runtime then no longer fuses the integer MatMul.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np


def smoothing_targets(model_path: Path, patterns: tuple[str, ...]) -> list[str]:
    """Names of the MatMuls with a constant weight whose node name matches one of `patterns` (regular expressions)."""
    if not patterns:
        return []
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    constants = {initializer.name for initializer in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type == "MatMul"
        and node.input[1] in constants
        and any(re.search(pattern, node.name) for pattern in patterns)
    ]


def input_channel_absmax(
    model_path: Path, matmuls: list[str], feeds: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, list[float]]:
    """The largest |x| of each input channel of each MatMul in `matmuls`, over every position of every feed.

    Padded positions count, as in the activation ranges, because the runtime quantizes them too. Values are
    rounded to 6 significant digits, the precision they are stored with, so a build from the stored values
    makes the same graph as the build that measured them."""
    import onnx
    import onnxruntime

    model = onnx.load(str(model_path))
    inputs = {node.name: node.input[0] for node in model.graph.node if node.name in matmuls}
    tensors = sorted(set(inputs.values()))
    known = {output.name for output in model.graph.output}
    for tensor in tensors:
        if tensor not in known:
            model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        for tensor, value in zip(tensors, session.run(tensors, dict(feed)), strict=True):
            channel_max = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            maxima[tensor] = np.maximum(maxima[tensor], channel_max) if tensor in maxima else channel_max
    if not maxima:
        raise ValueError("no calibration feeds")
    return {name: [float(f"{value:.6g}") for value in maxima[tensor]] for name, tensor in inputs.items()}


def smooth_matmuls(model_path: Path, out_path: Path, input_absmax: Mapping[str, list[float]], alpha: float) -> None:
    """Write `model_path` with each MatMul named in `input_absmax` smoothed: Mul(x, 1/s) in front, W rows times s."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    initializers = {initializer.name: initializer for initializer in graph.initializer}
    value_infos = {info.name: info for info in graph.value_info}
    nodes = []
    for node in graph.node:
        if node.name in input_absmax:
            weight = numpy_helper.to_array(initializers[node.input[1]])  # [in channels, out channels]
            x_max = np.asarray(input_absmax[node.name], dtype=np.float64)
            if x_max.shape != (weight.shape[0],):
                raise ValueError(f"{node.name}: {x_max.size} channel maxima for a weight of {weight.shape[0]} rows")
            w_max = np.abs(weight).max(axis=1).astype(np.float64)
            # Channels that never fire (or dead weight rows) keep s = 1 instead of an extreme scale.
            scale = np.where(
                (x_max > 0) & (w_max > 0), np.maximum(x_max, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha), 1
            )
            scale = np.clip(scale, 1e-2, 1e3).astype(np.float32)
            smoothed_weight = (weight * scale[:, None]).astype(weight.dtype)
            initializers[node.input[1]].CopyFrom(numpy_helper.from_array(smoothed_weight, node.input[1]))
            inverse_name, smoothed_input = node.name + ".smooth_inverse_scale", node.name + ".smoothed_input"
            graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse_name))
            nodes.append(
                onnx.helper.make_node(
                    "Mul", [node.input[0], inverse_name], [smoothed_input], name=node.name + ".smooth"
                )
            )
            if node.input[0] in value_infos:  # the quantizer quantizes only typed tensors
                info = onnx.ValueInfoProto()
                info.CopyFrom(value_infos[node.input[0]])
                info.name = smoothed_input
                graph.value_info.append(info)
            node.input[0] = smoothed_input
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(out_path))
