"""SmoothQuant on the shipped model's float graph (builder.smoothing): the answers stay, the outliers move."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from realtime_qa.builder.onnxruntime_build import CPU_RECIPE, ENGINE_FILE
from realtime_qa.builder.smoothing import input_channel_absmax, smooth_matmuls, smoothing_targets
from realtime_qa.qacore.features import Featurizer
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.qacore.tokenization import load_tokenizer


@pytest.fixture(scope="module")
def feeds(shipped_model_dir: Path, squad_dir: Path) -> list[dict[str, np.ndarray]]:
    """The windows of a few dev questions from different articles, as the engine is fed them."""
    featurizer = Featurizer(load_tokenizer(shipped_model_dir))
    dataset = read_dataset(squad_dir / "dev-v1.1.json.gz")
    pairs = list(dataset.questions())[::1500]
    batches = [featurizer.batch(featurizer.featurize(q.question, p.context).windows) for p, q in pairs]
    return [
        {
            "input_ids": batch.input_ids.astype(np.int32),
            "segment_ids": batch.segment_ids.astype(np.int32),
            "input_mask": batch.input_mask.astype(np.int32),
        }
        for batch in batches
    ]


def run(model: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_the_cpu_recipe_smooths_both_ffn_matmuls_of_every_layer(ort_fp32_engine_dir: Path) -> None:
    targets = smoothing_targets(ort_fp32_engine_dir / ENGINE_FILE, CPU_RECIPE.smooth_nodes)
    assert sorted(targets) == sorted(
        f"bert.encoder.layer.{layer}.{kind}.dense.matmul" for layer in range(6) for kind in ("intermediate", "output")
    )


def test_smoothing_keeps_the_logits_and_flattens_the_outlier_channels(
    ort_fp32_engine_dir: Path, feeds: list[dict[str, np.ndarray]], tmp_path: Path
) -> None:
    float_graph = ort_fp32_engine_dir / ENGINE_FILE
    targets = smoothing_targets(float_graph, CPU_RECIPE.smooth_nodes)
    before = input_channel_absmax(float_graph, targets, feeds)
    smoothed = tmp_path / "smoothed.onnx"
    assert CPU_RECIPE.smooth_alpha is not None
    smooth_matmuls(float_graph, smoothed, before, CPU_RECIPE.smooth_alpha)

    muls = [
        node for node in onnx.load(str(smoothed)).graph.node if node.op_type == "Mul" and node.name.endswith(".smooth")
    ]
    assert sorted(node.name for node in muls) == sorted(f"{name}.smooth" for name in targets)
    for feed in feeds:  # the same function: the scale moved from the activations into the weights
        for want, got in zip(run(float_graph, feed), run(smoothed, feed), strict=True):
            np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)

    # What a per-tensor uint8 scale has to cover: the largest channel against the typical one.
    after = input_channel_absmax(smoothed, targets, feeds)  # the MatMuls' inputs are now the Muls' outputs
    spread_before = [max(before[name]) / np.median(before[name]) for name in targets]
    spread_after = [max(after[name]) / np.median(after[name]) for name in targets]
    assert max(spread_before) > 8  # the LayerNorm outputs' outlier channels
    assert all(a < b / 2 for a, b in zip(spread_after, spread_before, strict=True)), (spread_before, spread_after)


def test_maxima_that_do_not_fit_the_weight_are_refused(ort_fp32_engine_dir: Path, tmp_path: Path) -> None:
    float_graph = ort_fp32_engine_dir / ENGINE_FILE
    target = smoothing_targets(float_graph, CPU_RECIPE.smooth_nodes)[0]
    with pytest.raises(ValueError, match="3 channel maxima for a weight of"):
        smooth_matmuls(float_graph, tmp_path / "x.onnx", {target: [1.0, 2.0, 3.0]}, 0.75)
