"""The default engine: the shipped model as a CPU fp32 ONNX Runtime engine, built on first use and cached.

The cache directory is named after the model and a prefix of its source hash
(`<model>-<sha256[:12]>-onnxruntime-fp32`), so a changed model gets a new engine instead of a stale
one. Builds go to a staging directory first and are renamed into place, so concurrent first uses
(a server and a CLI starting together) never see a half-written engine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from builder.build import BuildConfig, build_engine
from builder.checkpoint import checkpoint_sha256
from qacore.engine import EngineMeta
from qacore.errors import EngineError, InvalidInputError
from qacore.tokenization import TOKENIZER_JSON, VOCAB_TXT

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "minilm-l6-squad"
CACHE_ENV = "QA_ENGINE_CACHE"
DEFAULT_CACHE_ROOT = Path("~/.cache/realtime-qa/engines")
HASH_PREFIX = 12


@dataclass(frozen=True)
class DefaultEngineOptions:
    model_dir: Path = DEFAULT_MODEL_DIR
    cache_root: Path | None = None  # None: $QA_ENGINE_CACHE, else ~/.cache/realtime-qa/engines
    force: bool = False  # rebuild even if a valid engine is cached


def cache_root(options: DefaultEngineOptions) -> Path:
    if options.cache_root is not None:
        return Path(options.cache_root).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    return Path(from_env).expanduser() if from_env else DEFAULT_CACHE_ROOT.expanduser()


def default_engine_dir(options: DefaultEngineOptions, source_sha256: str) -> Path:
    return cache_root(options) / f"{options.model_dir.name}-{source_sha256[:HASH_PREFIX]}-onnxruntime-fp32"


def ensure_default_engine(options: DefaultEngineOptions | None = None) -> Path:
    """The directory of the default engine, built first if it is missing or stale."""
    options = options or DefaultEngineOptions()
    source = checkpoint_sha256(options.model_dir)
    engine_dir = default_engine_dir(options, source)
    if not options.force and is_current(engine_dir, source, options.model_dir):
        return engine_dir
    log.info("building the default engine for %s into %s", options.model_dir, engine_dir)
    # Replace only a stale directory: when two first uses race, the second build fails to publish over
    # the first one's engine (instead of moving it away under a reader) and uses it below.
    try:
        return build_engine(
            BuildConfig(
                checkpoint=options.model_dir, output=engine_dir, backend="onnxruntime", force=engine_dir.exists()
            )
        )
    except (EngineError, InvalidInputError, OSError):
        # Another process published the same engine between our check and our rename: use theirs.
        if is_current(engine_dir, source, options.model_dir):
            return engine_dir
        raise


def is_current(engine_dir: Path, source_sha256: str, model_dir: Path) -> bool:
    """Whether `engine_dir` holds an engine of this source and tokenizer, built by the installed ONNX Runtime."""
    import onnxruntime

    try:
        meta = EngineMeta.read(engine_dir)
    except Exception:  # missing, unreadable or from another format version: rebuild
        return False
    return (
        meta.backend == "onnxruntime"
        and meta.precision == "fp32"
        and meta.source_sha256 == source_sha256
        and meta.backend_version == onnxruntime.__version__
        and (engine_dir / meta.engine_file).is_file()
        and all(
            (engine_dir / name).is_file() and (engine_dir / name).read_bytes() == (model_dir / name).read_bytes()
            for name in (TOKENIZER_JSON, VOCAB_TXT)
            if (model_dir / name).is_file()
        )
    )
