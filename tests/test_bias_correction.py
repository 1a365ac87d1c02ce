"""Bias correction of quantized MatMuls (builder.bias_correction) on a small QDQ graph built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from realtime_qa.builder.bias_correction import apply_bias_shift, measure_bias_shift

K, N, SCALE, ZERO_POINT = 48, 24, 0.05, 100


def _graph(path: Path, weight: np.ndarray, bias: np.ndarray, quantized: bool) -> Path:
    """x [rows, K] -> MatMul (named "mm") -> Add(bias) -> y; quantized: x and the weight through Q/DQ, as the
    INT8 build writes them (uint8 activations, int8 weights per output channel)."""
    initializers = [numpy_helper.from_array(bias.astype(np.float32), "bias")]
    nodes = []
    x, w = "x", "w"
    if quantized:
        w_scale = np.abs(weight).max(axis=0) / 127
        initializers += [
            numpy_helper.from_array(np.rint(weight / w_scale).astype(np.int8), "w_q"),
            numpy_helper.from_array(w_scale.astype(np.float32), "w_scale"),
            numpy_helper.from_array(np.zeros(N, np.int8), "w_zero"),
            numpy_helper.from_array(np.array(SCALE, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(ZERO_POINT, np.uint8), "x_zero"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="q"),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="dq"),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], name="w_dq", axis=1),
        ]
        x, w = "x_dq", "w_dq"
    else:
        initializers.append(numpy_helper.from_array(weight.astype(np.float32), "w"))
    nodes += [
        helper.make_node("MatMul", [x, w], ["mm_out"], name="mm"),
        helper.make_node("Add", ["mm_out", "bias"], ["y"], name="add_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", K]),
            helper.make_tensor_value_info("input_mask", TensorProto.INT32, ["rows"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", N])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["y"], feed)[0][feed["input_mask"] != 0] for feed in feeds])


def test_the_shift_is_the_mean_error_and_correcting_the_bias_removes_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    bias = rng.normal(size=N).astype(np.float32)
    float_graph = _graph(tmp_path / "float.onnx", weight, bias, quantized=False)
    int8_graph = _graph(tmp_path / "int8.onnx", weight, bias, quantized=True)
    # Inputs with a mean far from zero (as after a GELU), within the uint8 range; the padded rows must not count.
    feeds = []
    for rows in (30, 50):
        x = rng.uniform(0.5, 3.0, size=(rows, K)).astype(np.float32)
        mask = np.ones(rows, np.int32)
        mask[-7:] = 0
        x[-7:] = 4.0  # padding: a different mean, which would move the shift if it counted
        feeds.append({"x": x, "input_mask": mask})

    before = _outputs(int8_graph, feeds).mean(axis=0) - _outputs(float_graph, feeds).mean(axis=0)
    shifts = measure_bias_shift(float_graph, int8_graph, feeds)
    assert list(shifts) == ["mm"]
    np.testing.assert_allclose(shifts["mm"], before, rtol=1e-4, atol=1e-5)
    assert np.abs(before).max() > 1e-3  # the rounding of these weights does shift the outputs

    assert apply_bias_shift(int8_graph, shifts) == 1
    after = _outputs(int8_graph, feeds).mean(axis=0) - _outputs(float_graph, feeds).mean(axis=0)
    assert np.abs(after).max() < 1e-4


def test_shifts_that_do_not_fit_the_bias_are_refused(tmp_path: Path) -> None:
    weight = np.ones((K, N), np.float32)
    int8_graph = _graph(tmp_path / "int8.onnx", weight, np.zeros(N, np.float32), quantized=True)
    with pytest.raises(ValueError, match="shift of 3 channels"):
        apply_bias_shift(int8_graph, {"mm": [0.0, 0.0, 0.0]})
    assert apply_bias_shift(int8_graph, {"another": [0.0] * N}) == 0
