"""TensorRT build step: the builder's ONNX graph becomes a serialized plan (`model.plan`).

    ONNX (fp16 weights and compute for --fp16, fp32, or INT8 QDQ) -> strongly typed network
      -> one optimization profile per (batch, sequence) pair -> plan (+ timing cache) -> cache

The network is created STRONGLY_TYPED: each tensor keeps the type the ONNX graph gives it, so the
precision is decided by the graph (`builder.onnx_graph.GraphOptions.fp16`), not by builder flags.
Each requested pair (b, s) becomes a profile with min (1, 1), opt = max = (b, s), as NVIDIA's BERT
builder does for its `-b`/`-s` lists; the runtime (`qacore.backends.tensorrt`) picks the smallest
profile whose range holds a batch. Plans are cached under `$QA_TENSORRT_CACHE` (default
`~/.cache/realtime-qa/tensorrt`) by (TensorRT version, GPU or target, ONNX hash, build options).

`tensorrt` (TensorRT 10/11, needs a GPU to build) is used where it is installed; otherwise
`tensorrt_rtx` (TensorRT for RTX) builds the same network ahead of time WITHOUT a GPU. What a plan
holds can be read without a GPU (the build's `PlanSummary`); running one needs the
matching runtime and a GPU it supports.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from realtime_qa.qacore.backends.tensorrt import plan_library
from realtime_qa.qacore.errors import EngineError

if TYPE_CHECKING:
    from realtime_qa.builder.build_config import BackendBuild, BuildConfig

log = logging.getLogger(__name__)

PLAN_FILE = "model.plan"
CACHE_ENV = "QA_TENSORRT_CACHE"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "realtime-qa" / "tensorrt"
MIN_SEQUENCE = 1


def import_tensorrt(for_building: bool = True) -> ModuleType:
    """`tensorrt` if installed, else (for building) `tensorrt_rtx`; EngineError naming both if neither."""
    try:
        import tensorrt

        return tensorrt
    except ImportError:
        if not for_building:
            raise EngineError("TensorRT is not installed here (pip install 'realtime-qa[tensorrt]')") from None
    try:
        import tensorrt_rtx

        return tensorrt_rtx
    except ImportError:
        raise EngineError(
            "neither tensorrt nor tensorrt_rtx is installed (pip install 'realtime-qa[tensorrt]' or '[tensorrt-rtx]')"
        ) from None


@dataclass(frozen=True)
class ProfileShape:
    """One optimization profile: every input is [batch, seq] with min (1, 1), opt = max = (batch, seq)."""

    batch: int
    seq: int

    @property
    def min(self) -> tuple[int, int]:
        return (1, MIN_SEQUENCE)

    @property
    def max(self) -> tuple[int, int]:
        return (self.batch, self.seq)


def profile_shapes(batch_sizes: tuple[int, ...], sequence_lengths: tuple[int, ...]) -> list[ProfileShape]:
    """One profile per (batch, sequence) pair, smallest first (the runtime tries them in this order)."""
    return [ProfileShape(b, s) for b in sorted(batch_sizes) for s in sorted(sequence_lengths)]


@dataclass(frozen=True)
class TensorRTBuildOptions:
    """What the TensorRT step needs from `BuildConfig`, in one typed record."""

    profiles: tuple[ProfileShape, ...]
    workspace_mib: int = 2048
    timing_cache_file: Path | None = None
    cache_dir: Path | None = None  # None: $QA_TENSORRT_CACHE or ~/.cache/realtime-qa/tensorrt; no caching if ""

    @classmethod
    def from_build_config(cls, config: BuildConfig) -> TensorRTBuildOptions:
        cache = os.environ.get(CACHE_ENV)
        return cls(
            profiles=tuple(profile_shapes(config.batch_sizes, config.sequence_lengths)),
            workspace_mib=config.workspace_mib,
            timing_cache_file=config.timing_cache_file,
            cache_dir=Path(cache) if cache else DEFAULT_CACHE_DIR,
        )


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]  # -1 for dynamic axes
    is_input: bool


@dataclass
class PlanSummary:
    """What a build produced, readable without a GPU."""

    library: str  # "tensorrt" | "tensorrt_rtx"
    library_version: str
    target: str  # GPU name, or what tensorrt_rtx built for
    onnx_sha256: str
    plan_sha256: str
    plan_bytes: int
    tensors: list[TensorInfo] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)  # per profile: inputs, min, opt, max
    build_seconds: float = 0.0
    cached: bool = False
    timing_cache: str = ""

    def record(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    # ONNX graphs over 2 GB keep their weights beside them; those bytes are part of the graph.
    data = path.with_name(path.name + ".data")
    if data.is_file():
        digest.update(sha256_file(data).encode())
    return digest.hexdigest()


def gpu_name() -> str:
    """The CUDA device 0 name through cuda-python, or "" where no GPU (or no cuda-python) is present."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return ""
    err, props = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        return ""
    name = props.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")


def build_target(trt: ModuleType) -> str:
    name = gpu_name()
    if name:
        return name
    if trt.__name__ == "tensorrt_rtx":
        return "no GPU: TensorRT-RTX ahead-of-time plan (kernels compiled on the target GPU at load)"
    raise EngineError("TensorRT needs a CUDA GPU to build a plan, and none is visible here")


def cache_key(library: str, version: str, target: str, onnx_sha256: str, options: TensorRTBuildOptions) -> str:
    profiles = ",".join(f"{p.batch}x{p.seq}" for p in options.profiles)
    text = f"{library}|{version}|{target}|{onnx_sha256}|{profiles}|{options.workspace_mib}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def parse_network(trt: ModuleType, builder: Any, onnx_path: Path, logger: Any) -> tuple[Any, Any]:
    """A strongly typed network (and its parser, which must outlive the build) from the ONNX file."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path.name}: {errors or 'unknown error'}")
    return network, parser


def network_tensors(network: Any) -> list[TensorInfo]:
    tensors = []
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        tensors.append(TensorInfo(tensor.name, str(tensor.dtype).split(".")[-1], tuple(tensor.shape), True))
    for index in range(network.num_outputs):
        tensor = network.get_output(index)
        tensors.append(TensorInfo(tensor.name, str(tensor.dtype).split(".")[-1], tuple(tensor.shape), False))
    return tensors


def add_profiles(
    builder: Any, builder_config: Any, inputs: list[TensorInfo], profiles: tuple[ProfileShape, ...]
) -> list[dict[str, Any]]:
    described = []
    for shape in profiles:
        profile = builder.create_optimization_profile()
        for tensor in inputs:
            profile.set_shape(tensor.name, shape.min, shape.max, shape.max)
        index = builder_config.add_optimization_profile(profile)
        if index < 0:
            raise EngineError(f"TensorRT refused the optimization profile batch {shape.batch} x sequence {shape.seq}")
        described.append(
            {"inputs": [t.name for t in inputs], "min": list(shape.min), "opt": list(shape.max), "max": list(shape.max)}
        )
    return described


def load_timing_cache(trt: ModuleType, builder_config: Any, path: Path | None) -> tuple[Any, str]:
    if path is None:
        return None, "none"
    if trt.__name__ == "tensorrt_rtx":
        return None, "not used: TensorRT-RTX ignores timing caches"
    blob = path.read_bytes() if path.is_file() else b""
    cache = builder_config.create_timing_cache(blob)
    if not builder_config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineError(f"timing cache {path} does not fit this TensorRT version or GPU; delete it to start anew")
    return cache, f"{'read and updated' if blob else 'created'}: {path}"


def build_plan(
    onnx_path: Path, options: TensorRTBuildOptions, trt: ModuleType | None = None
) -> tuple[bytes, PlanSummary]:
    """Parse, configure and build; returns the serialized plan and its summary. No caching here."""
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = parse_network(trt, builder, onnx_path, logger)  # the parser holds weights until built
    tensors = network_tensors(network)
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    profiles = add_profiles(builder, builder_config, [t for t in tensors if t.is_input], options.profiles)
    cache, cache_note = load_timing_cache(trt, builder_config, options.timing_cache_file)
    began = time.perf_counter()
    serialized = builder.build_serialized_network(network, builder_config)
    seconds = time.perf_counter() - began
    if serialized is None:
        raise EngineError(f"TensorRT failed to build {onnx_path.name} (see the TensorRT log above)")
    plan = bytes(serialized)
    if plan_library(plan) != trt.__name__:
        raise EngineError(f"{trt.__name__} wrote a plan of another format ({plan[:4]!r})")
    if cache is not None and options.timing_cache_file is not None:
        options.timing_cache_file.parent.mkdir(parents=True, exist_ok=True)
        options.timing_cache_file.write_bytes(bytes(builder_config.get_timing_cache().serialize()))
    summary = PlanSummary(
        library=trt.__name__,
        library_version=trt.__version__,
        target=build_target(trt),
        onnx_sha256=sha256_file(onnx_path),
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        plan_bytes=len(plan),
        tensors=tensors,
        profiles=profiles,
        build_seconds=seconds,
        timing_cache=cache_note,
    )
    return plan, summary


def build_tensorrt_engine(onnx_path: Path, out_dir: Path, config: BuildConfig) -> BackendBuild:
    """The `builder.build` step for `--backend tensorrt`: writes `model.plan` into `out_dir`."""
    return build_tensorrt_plan(onnx_path, out_dir, TensorRTBuildOptions.from_build_config(config))


def build_tensorrt_plan(onnx_path: Path, out_dir: Path, options: TensorRTBuildOptions) -> BackendBuild:
    from realtime_qa.builder.build_config import BackendBuild

    trt = import_tensorrt()
    onnx_sha = sha256_file(onnx_path)
    target = build_target(trt)
    key = cache_key(trt.__name__, trt.__version__, target, onnx_sha, options)
    cached = options.cache_dir / f"{key}.plan" if options.cache_dir else None
    if cached is not None and cached.is_file() and cached.with_suffix(".json").is_file():
        import json

        shutil.copyfile(cached, out_dir / PLAN_FILE)
        details = json.loads(cached.with_suffix(".json").read_text(encoding="utf-8"))
        details["cached"] = True
        log.info("TensorRT plan taken from the cache: %s", cached)
    else:
        plan, summary = build_plan(onnx_path, options, trt)
        (out_dir / PLAN_FILE).write_bytes(plan)
        details = summary.record()
        if cached is not None:
            import json

            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out_dir / PLAN_FILE, cached)
            cached.with_suffix(".json").write_text(json.dumps(details, indent=2) + "\n", encoding="utf-8")
        log.info("built %s plan (%d bytes) in %.1f s", trt.__name__, summary.plan_bytes, summary.build_seconds)
    details["cache_key"] = key
    details["profile_shapes"] = [[p.batch, p.seq] for p in options.profiles]
    return BackendBuild(PLAN_FILE, f"{trt.__name__} {trt.__version__}", {"tensorrt": details})
