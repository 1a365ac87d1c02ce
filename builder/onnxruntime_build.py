"""ONNX Runtime engines for CPU: the graph fused by ORT's transformer optimizer, fp32 or INT8.

fp32: the exported graph goes through `onnxruntime.transformers.optimizer` (model_type "bert"), which
fuses embeddings, attention, residual+LayerNorm and bias+GELU into ORT's contrib kernels.

INT8: static quantization of that fused graph in QDQ form, per-channel int8 weights and uint8
activations whose ranges are calibrated on real SQuAD questions (ORT turns the QDQ MatMuls into
integer kernels at load time); the CPU recipe smooths the FFN MatMuls' inputs first (`builder.smoothing`) and
takes each quantized MatMul's mean rounding error out of its bias after (`builder.bias_correction`). What
calibration measured (ranges, channel maxima, bias shifts) is cached (`--calib-path`) under a key naming
everything it depends on, so rebuilding the same model needs no SQuAD data.

The same calibration also yields the symmetric INT8 QDQ graph TensorRT compiles (`--backend tensorrt --int8`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from realtime_qa.builder.bias_correction import apply_bias_shift, measure_bias_shift
from realtime_qa.builder.build_config import BackendBuild, BuildConfig
from realtime_qa.builder.model_weights import Checkpoint
from realtime_qa.builder.onnx_graph import GRAPH_FORMAT
from realtime_qa.builder.smoothing import input_channel_absmax, smooth_matmuls, smoothing_targets
from realtime_qa.qacore.config import ModelConfig
from realtime_qa.qacore.errors import InvalidInputError

log = logging.getLogger(__name__)

ENGINE_FILE = "model.onnx"
FUSED_OPS = ("EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu")
CALIBRATION_CACHE_FORMAT = 2  # 2: SmoothQuant's channel maxima beside the ranges


@dataclass(frozen=True)
class QuantizationRecipe:
    """How the INT8 graph is made; part of the calibration cache key."""

    symmetric_activations: bool = False  # TensorRT requires symmetric (zero point 0) activations
    calibrate_method: str = "Percentile"  # MinMax | Percentile | Entropy (onnxruntime CalibrationMethod names)
    percentile: float = 99.999  # clip the rare outliers BERT activations have, as NVIDIA's BERT INT8 does
    per_channel: bool = True
    op_types: tuple[str, ...] = ("MatMul",)
    # The span head stays float: it is tiny, and its two outputs are the answer itself.
    exclude_nodes: tuple[str, ...] = ("qa_outputs",)  # nodes whose name contains one of these stay float
    weights_only_matmuls: bool = True  # quantize MatMuls with a constant weight, not attention's Q.K / P.V
    # SmoothQuant (builder.smoothing): the MatMuls (node names matching these regular expressions) whose input
    # outliers move into their weights, and how much of them (alpha); None smooths nothing.
    smooth_alpha: float | None = None
    smooth_nodes: tuple[str, ...] = ()
    # Bias correction (builder.bias_correction): subtract each quantized MatMul's mean output error, measured on
    # the calibration windows, from the bias after it.
    bias_correction: bool = False

    def key(self) -> dict[str, Any]:
        """The recipe as the calibration cache key and the engine's meta.json record it (JSON types)."""
        return {
            **asdict(self),
            "op_types": list(self.op_types),
            "exclude_nodes": list(self.exclude_nodes),
            "smooth_nodes": list(self.smooth_nodes),
        }


# CPU: MinMax ranges. Measured on the shipped abstaining model against its fp32 engine on the first half of the
# v2.0 dev articles (the half the threshold is tuned on; benchmarks/results/cpu_accuracy.md): Percentile 99.999
# clips the activations' rare outliers, and that moves every question's null margin (null - best span logit) by
# -0.45 logits on average, so INT8 abstains less (F1 -0.45 there); MinMax keeps them (bias +0.07, F1 -0.05), at
# the same speed. Keeping the last layer in fp32, 300 calibration questions or Percentile 99.9999 did less.
# Quantizing the unfused graph (Q/K/V too) was no faster on CPU and less accurate. The shipped ranges come from
# 100 questions spread over the train file (builder.defaults.SHIPPED_CALIBRATION_QUESTIONS). On two tuning sets
# 7-bit weights (reduce_range), uint8 weights (U8U8), Entropy ranges and every FFN output MatMul in fp32 were
# farther from fp32; 200 questions were closer there but failed the dev-slice accuracy test, so 100 stay.
# SmoothQuant on both FFN MatMuls: leaving one MatMul group in fp32 at a time showed the FFN input MatMul (fed by
# the LayerNorm's outlier channels) causes most of the INT8 error; smoothing it and the FFN output MatMul at
# alpha 0.75 halved the logit error against fp32 on both tuning sets (alpha 0.5, 0.6 and 0.9 moved more best
# tokens); INT8 answers now differ from fp32's half as often on every set, though the v1.1 dev F1 gap is -0.24
# (-0.22 before; benchmarks/results/cpu_accuracy.md).
# The Muls it adds cost ~0.3 ms on the seed question.
# Bias correction on top (C11), adopted by the same rule: INT8 answers differed from fp32's less often on both
# tuning sets (45 vs 52, 126 vs 130). On the test sets, same AMD EPYC box, it is level with C8 (v1.1 dev F1 gap
# -0.13 vs -0.13, v2.0 second half -0.02 vs -0.03); it costs nothing at run time (only bias values change;
# benchmarks/results/cpu_accuracy.md).
CPU_RECIPE = QuantizationRecipe(
    calibrate_method="MinMax",
    smooth_alpha=0.75,
    smooth_nodes=(r"\.intermediate\.dense\.matmul$", r"\.layer\.\d+\.output\.dense\.matmul$"),
    bias_correction=True,
)
# TensorRT: Percentile, NVIDIA's choice for BERT (not re-measured with the abstaining model).
TENSORRT_RECIPE = QuantizationRecipe(symmetric_activations=True)


def build_onnxruntime_engine(
    onnx_path: Path, out_dir: Path, config: BuildConfig, checkpoint: Checkpoint
) -> BackendBuild:
    """Write the fused fp32 (or INT8) graph into `out_dir` as model.onnx."""
    import onnxruntime

    fused_path = out_dir / ENGINE_FILE if not config.int8 else onnx_path.with_name("fused.onnx")
    fused_ops = optimize_for_cpu(onnx_path, fused_path, checkpoint.config)
    details: dict[str, Any] = {"fused_ops": fused_ops}
    if config.int8:
        details["quantization"] = quantize_int8(fused_path, out_dir / ENGINE_FILE, config, checkpoint, CPU_RECIPE)
    return BackendBuild(ENGINE_FILE, onnxruntime.__version__, details)


def optimize_for_cpu(onnx_path: Path, out_path: Path, model_config: ModelConfig) -> dict[str, int]:
    """Fuse the graph with ORT's transformer optimizer; returns the count of each fused op made."""
    from onnxruntime.transformers import optimizer

    # The optimizer warns that our producer name is not "pytorch"; the graph follows the BERT patterns anyway.
    logging.getLogger("onnxruntime.transformers.optimizer").setLevel(logging.ERROR)
    started = time.perf_counter_ns()
    model = optimizer.optimize_model(
        str(onnx_path),
        model_type="bert",
        num_heads=model_config.num_attention_heads,
        hidden_size=model_config.hidden_size,
        opt_level=0,  # ORT's own graph optimisations run again at session start, for the host's CPU
        use_gpu=False,
    )
    counts = {name: int(count) for name, count in model.get_fused_operator_statistics().items() if count}
    if counts.get("Attention", 0) != model_config.num_hidden_layers:
        log.warning(
            "only %s of %s attention layers were fused", counts.get("Attention", 0), model_config.num_hidden_layers
        )
    model.save_model_to_file(str(out_path))
    log.info("fused graph in %.1f s: %s", (time.perf_counter_ns() - started) / 1e9, counts)
    return counts


def quantize_int8(
    fp32_path: Path, out_path: Path, config: BuildConfig, checkpoint: Checkpoint, recipe: QuantizationRecipe
) -> dict[str, Any]:
    """Statically quantize `fp32_path` to a QDQ INT8 graph at `out_path`; returns what was done."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    key = calibration_key(config, checkpoint, recipe, fp32_path.name)
    started = time.perf_counter_ns()
    with tempfile.TemporaryDirectory(prefix="qa-calib-") as scratch:
        ort_cache = Path(scratch) / "ranges.json"
        # Symbolic shape inference types every tensor, including outputs of ORT's fused contrib ops,
        # which plain ONNX shape inference leaves untyped (and the quantizer would then skip).
        typed_path = Path(scratch) / "typed.onnx"
        quant_pre_process(str(fp32_path), str(typed_path), skip_optimization=True, auto_merge=True)
        smoothed = smoothing_targets(typed_path, recipe.smooth_nodes) if recipe.smooth_alpha is not None else []
        cache = load_calibration_cache(config.calib_path, key, smoothed)
        # A cache from before bias correction keeps its ranges and maxima; only the shifts are measured (below).
        measure_shifts = recipe.bias_correction and (cache is None or not cache.bias_shift)
        reader = None
        if cache is None or measure_shifts:
            if config.squad_json is None:
                problem = "does not match this build" if cache is None else "holds no bias shifts"
                raise InvalidInputError(
                    f"calibration cache {config.calib_path} {problem} and no --squad-json was given"
                )
            reader = calibration_reader(config, checkpoint)
        if cache is None:
            assert reader is not None
            input_absmax = input_channel_absmax(typed_path, smoothed, reader.feeds) if smoothed else {}
        else:
            ort_cache.write_text(json.dumps(cache.ranges), encoding="utf-8")
            input_absmax = cache.input_absmax
        graph_path = typed_path
        if smoothed:
            assert recipe.smooth_alpha is not None
            graph_path = Path(scratch) / "smoothed.onnx"
            smooth_matmuls(typed_path, graph_path, input_absmax, recipe.smooth_alpha)
        extra_options: dict[str, Any] = {
            "ActivationSymmetric": recipe.symmetric_activations,
            "WeightSymmetric": True,
            "CalibPercentile": recipe.percentile,
            # Collect ranges one batch at a time so memory holds one batch's activations, not all.
            "CalibStridedMinMax": 1,
            # MatMul outputs stay float (DQ+MatMul become MatMulIntegerToFloat): quantizing them would
            # round the residual stream, whose outlier channels reach hundreds, to steps of ~1.
            "OpTypesToExcludeOutputQuantization": ["MatMul"],
            "MatMulConstBOnly": recipe.weights_only_matmuls,
        }
        excluded = excluded_nodes(typed_path, recipe.exclude_nodes)
        quantize_static(
            str(graph_path),
            str(out_path),
            calibration_data_reader=reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(recipe.op_types),
            per_channel=recipe.per_channel,
            reduce_range=False,
            activation_type=QuantType.QInt8 if recipe.symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[recipe.calibrate_method],
            nodes_to_exclude=excluded,
            extra_options=extra_options,
            calibration_cache_path=str(ort_cache),
        )
        bias_shift: dict[str, list[float]] = {}
        if recipe.bias_correction:
            if measure_shifts:
                assert reader is not None
                bias_shift = measure_bias_shift(graph_path, out_path, reader.feeds)
            else:
                assert cache is not None
                bias_shift = cache.bias_shift
            if apply_bias_shift(out_path, bias_shift) != len(bias_shift):
                raise InvalidInputError(f"the bias shifts of {config.calib_path} do not fit this graph's MatMuls")
        if (cache is None or measure_shifts) and config.calib_path is not None:
            ranges = json.loads(ort_cache.read_text(encoding="utf-8"))
            store_calibration_cache(config.calib_path, key, CalibrationCache(ranges, input_absmax, bias_shift))
    seconds = (time.perf_counter_ns() - started) / 1e9
    log.info("INT8 graph in %.1f s (calibration %s)", seconds, "run" if cache is None else "cached")
    summary: dict[str, Any] = {"format": "QDQ", "calibration_cached": cache is not None, **recipe.key()}
    summary["smoothed_matmuls"] = len(smoothed)
    summary["bias_corrected_matmuls"] = len(bias_shift)
    if reader is not None:
        summary["calibration_batches"] = len(reader)
        summary["calibration_windows"] = reader.num_windows
    return summary


def excluded_nodes(model_path: Path, patterns: tuple[str, ...]) -> list[str]:
    if not patterns:
        return []
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [node.name for node in graph.node if any(pattern in node.name for pattern in patterns)]


def quantize_qdq_for_tensorrt(onnx_path: Path, scratch: Path, config: BuildConfig, checkpoint: Checkpoint) -> Path:
    """The symmetric INT8 QDQ form of the exported (unfused) graph, for TensorRT's explicit quantization."""
    out_path = scratch / "model.int8.qdq.onnx"
    quantize_int8(onnx_path, out_path, config, checkpoint, TENSORRT_RECIPE)
    return out_path


def calibration_reader(config: BuildConfig, checkpoint: Checkpoint) -> Any:
    from realtime_qa.builder.calibration import SquadCalibrationReader, calibration_batches

    assert config.squad_json is not None
    batches = list(
        calibration_batches(
            config.squad_json, checkpoint.tokenizer_dir, config.calibration_questions, config.max_seq_length
        )
    )
    return SquadCalibrationReader(batches)


# ---------------------------------------------------------------------------------------------- calibration cache


def calibration_key(
    config: BuildConfig, checkpoint: Checkpoint, recipe: QuantizationRecipe, graph: str
) -> dict[str, Any]:
    """Everything the calibrated ranges depend on; a cache whose key differs is recalibrated."""
    import onnxruntime

    squad = None
    if config.squad_json is not None:
        squad = hashlib.sha256(config.squad_json.read_bytes()).hexdigest()
    return {
        "source_sha256": checkpoint.source_sha256,
        "graph": graph,
        "graph_format": GRAPH_FORMAT,
        "recipe": calibrated_recipe_key(recipe),
        # Without --squad-json a cache is reused whatever data it came from: the user asked for that.
        "squad_sha256": squad,
        "calib_num": config.calibration_questions if squad else None,
        "calib_selection": "spread" if squad else None,  # builder.calibration.spread_questions
        "max_seq_length": config.max_seq_length if squad else None,
        "onnxruntime": onnxruntime.__version__,
    }


def calibrated_recipe_key(recipe: QuantizationRecipe) -> dict[str, Any]:
    """The part of the recipe the ranges and channel maxima depend on: all of it but bias correction, whose shifts
    are measured after them (a cache without shifts keeps its ranges; the shifts are checked by presence)."""
    return {name: value for name, value in recipe.key().items() if name != "bias_correction"}


@dataclass(frozen=True)
class CalibrationCache:
    """What calibration measured, stored beside the model (`--calib-path`) so later builds need no SQuAD data."""

    ranges: dict[str, Any]  # ORT's calibration cache: each quantized tensor's range
    input_absmax: dict[str, list[float]]  # each smoothed MatMul's input channel maxima (builder.smoothing)
    # each quantized MatMul's mean output error per channel (builder.bias_correction); empty if not measured
    bias_shift: dict[str, list[float]] = field(default_factory=dict)


def load_calibration_cache(
    calib_path: Path | None, key: dict[str, Any], smoothed: list[str]
) -> CalibrationCache | None:
    """The cache at `calib_path` if it was made for `key` and holds the maxima of every MatMul in `smoothed`."""
    if calib_path is None or not calib_path.is_file():
        return None
    try:
        cache = json.loads(calib_path.read_text(encoding="utf-8"))
        stored_key, ranges = cache["key"], cache["ranges"]
        input_absmax = cache.get("input_absmax", {})
        bias_shift = cache.get("bias_shift", {})
        if not isinstance(ranges, dict) or not isinstance(input_absmax, dict) or not isinstance(bias_shift, dict):
            raise TypeError("ranges, input_absmax and bias_shift must be objects")
        matches = all(stored_key.get(name) == value for name, value in key.items() if value is not None)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        log.warning("ignoring unreadable calibration cache %s", calib_path)
        return None
    if cache.get("format") != CALIBRATION_CACHE_FORMAT or not matches or not set(smoothed) <= set(input_absmax):
        log.info("calibration cache %s was made for another build; recalibrating", calib_path)
        return None
    return CalibrationCache(ranges, {name: input_absmax[name] for name in smoothed}, bias_shift)


def store_calibration_cache(calib_path: Path, key: dict[str, Any], cache: CalibrationCache) -> None:
    calib_path.parent.mkdir(parents=True, exist_ok=True)
    partial = calib_path.with_name(calib_path.name + ".partial")
    record = {
        "format": CALIBRATION_CACHE_FORMAT,
        "key": key,
        "ranges": cache.ranges,
        "input_absmax": cache.input_absmax,
        "bias_shift": cache.bias_shift,
    }
    partial.write_text(json.dumps(record), encoding="utf-8")
    partial.replace(calib_path)
