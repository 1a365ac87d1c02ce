"""The one resolver of the default engine: the shipped model as a CPU ONNX Runtime engine, from the cache.

The shipped model is package data (`realtime_qa.models`, folder `minilm-l6-squad`, the repository's
`models/minilm-l6-squad`), found through `importlib.resources`, so an editable and a regular
`pip install` find the same files. Its engine lives in the engine cache under a name that carries
the model directory's fingerprint and the precision (`minilm-l6-squad-<sha256[:12]>-onnxruntime-int8`):
any change to the model's files (weights, tokenizer, config, calibration) gives a new engine rather
than a stale one.

Building belongs to `builder`, which nothing at request time imports: when the engine is missing,
`resolve_default_engine` runs `python -m realtime_qa.builder.cli --default` in a child process (once; later
starts find it in the cache) and reports a failure as one `EngineError` line.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from realtime_qa.qacore.engine import EngineMeta
from realtime_qa.qacore.errors import EngineError, InvalidInputError
from realtime_qa.qacore.files import sha256_file

log = logging.getLogger(__name__)

MODEL_PACKAGE = "realtime_qa.models"
DEFAULT_MODEL_NAME = "minilm-l6-squad"
CACHE_ENV = "QA_ENGINE_CACHE"
DEFAULT_CACHE_ROOT = Path("~/.cache/realtime-qa/engines")
HASH_PREFIX = 12
# INT8 (calibration shipped with the model) is the default: about 1.5x faster than fp32 on CPU for
# -0.2 F1 (benchmarks/results/cpu_latency.md, cpu_accuracy.md). fp32 stays one flag away.
DEFAULT_PRECISION = "int8"
PRECISIONS = ("int8", "fp32")
CALIBRATION_FILE = "calibration.json"  # ORT ranges and SmoothQuant maxima of the shipped model (builder's cache)
BUILD_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DefaultEngineSpec:
    """Which default engine: the model directory, the precision and the cache it lives in."""

    precision: str = DEFAULT_PRECISION
    model_dir: Path | None = None  # None: the shipped model (package data)
    cache_root: Path | None = None  # None: $QA_ENGINE_CACHE, else ~/.cache/realtime-qa/engines

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def model(self) -> Path:
        return Path(self.model_dir) if self.model_dir is not None else shipped_model_dir()

    @property
    def cache(self) -> Path:
        if self.cache_root is not None:
            return Path(self.cache_root).expanduser()
        from_env = os.environ.get(CACHE_ENV)
        return Path(from_env).expanduser() if from_env else DEFAULT_CACHE_ROOT.expanduser()


def shipped_model_dir() -> Path:
    """The shipped model's directory inside the installed package data."""
    try:
        root = importlib.resources.files(MODEL_PACKAGE)
    except ModuleNotFoundError:
        raise EngineError(
            f"the shipped model package {MODEL_PACKAGE} is not installed; reinstall realtime-qa"
        ) from None
    path = Path(str(root / DEFAULT_MODEL_NAME))
    if not (path / "config.json").is_file():
        raise EngineError(f"the shipped model is missing from {path}; reinstall realtime-qa")
    return path


def model_fingerprint(model_dir: Path) -> str:
    """SHA-256 over the names and contents of every file in a model directory (sorted, recursively)."""
    if not model_dir.is_dir():
        raise EngineError(f"model directory not found: {model_dir}")
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(f"{path.relative_to(model_dir).as_posix()}\t{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def default_engine_dir(spec: DefaultEngineSpec, fingerprint: str | None = None) -> Path:
    """Where the default engine of `spec` lives in the cache (whether or not it is built)."""
    model = spec.model
    fingerprint = fingerprint or model_fingerprint(model)
    return spec.cache / f"{model.name}-{fingerprint[:HASH_PREFIX]}-onnxruntime-{spec.precision}"


def is_current(engine_dir: Path, precision: str) -> bool:
    """Whether `engine_dir` holds a complete engine of `precision` built by the installed ONNX Runtime.

    The directory name already pins the model's files; the engine file's own hash is checked at load.
    """
    try:
        meta = EngineMeta.read(engine_dir)
    except Exception:  # missing, unreadable or from another format version: rebuild
        return False
    return (
        meta.backend == "onnxruntime"
        and meta.precision == precision
        and meta.backend_version == onnxruntime_version()
        and bool(meta.engine_sha256)
        and (engine_dir / meta.engine_file).is_file()
    )


def onnxruntime_version() -> str:
    try:
        return importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        return ""


def find_default_engine(spec: DefaultEngineSpec | None = None) -> Path | None:
    """The cached default engine's directory, or None when it is not built (or stale)."""
    spec = spec or DefaultEngineSpec()
    engine_dir = default_engine_dir(spec)
    return engine_dir if is_current(engine_dir, spec.precision) else None


def build_command(spec: DefaultEngineSpec) -> list[str]:
    """The child process that builds the default engine (the builder is never imported here)."""
    command = [sys.executable, "-m", "realtime_qa.builder.cli", "--default", "--precision", spec.precision]
    if spec.model_dir is not None:
        command += ["--default-model-dir", str(spec.model_dir)]
    if spec.cache_root is not None:
        command += ["--cache-root", str(spec.cache_root)]
    return command


def resolve_default_engine(spec: DefaultEngineSpec | None = None, build: bool = True) -> Path:
    """The default engine's directory; built first (in a child `qa-build --default`) when missing.

    Raises `EngineError` (one line) when it is missing and `build` is false, or the build fails.
    """
    spec = spec or DefaultEngineSpec()
    found = find_default_engine(spec)
    if found is not None:
        return found
    if not build:
        raise EngineError(f"the default {spec.precision} engine is not built; run: qa-build --default")
    log.info("building the default %s CPU engine (once; cached under %s)", spec.precision, spec.cache)
    try:
        done = subprocess.run(build_command(spec), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"cannot build the default engine: {exc}") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise EngineError(f"building the default engine failed: {reason}")
    found = find_default_engine(spec)
    if found is None:
        raise EngineError(f"the default engine build finished but left no engine at {default_engine_dir(spec)}")
    return found
