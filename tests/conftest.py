"""Shared fixtures: the shipped model, the SQuAD data beside the repository, engines built once per run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SQUAD_DIR = SHARED / "data" / "squad"
SHIPPED_MODEL_DIR = REPO / "models" / "minilm-l6-squad"


@pytest.fixture(scope="session", autouse=True)
def _private_engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The default engine (qa-serve / qa-eval / qa-assistant with no engine given) builds into this run's
    temporary directory, never into the user's cache; subprocesses inherit the variable."""
    saved = os.environ.get("QA_ENGINE_CACHE")
    os.environ["QA_ENGINE_CACHE"] = str(tmp_path_factory.mktemp("engine-cache"))
    yield
    if saved is None:
        os.environ.pop("QA_ENGINE_CACHE", None)
    else:
        os.environ["QA_ENGINE_CACHE"] = saved


@pytest.fixture(scope="session")
def shipped_model_dir() -> Path:
    assert (SHIPPED_MODEL_DIR / "config.json").is_file(), f"shipped model missing at {SHIPPED_MODEL_DIR}"
    return SHIPPED_MODEL_DIR


@pytest.fixture(scope="session")
def squad_dir() -> Path:
    assert SQUAD_DIR.is_dir(), f"SQuAD data missing at {SQUAD_DIR} (../shared beside the repository)"
    return SQUAD_DIR


# ---- engines of the shipped model, built once per test session (builder helper) ----


@pytest.fixture(scope="session")
def ort_fp32_engine_dir(shipped_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model as an ONNX Runtime fp32 (fused) engine, as `qa-build` makes it by default."""
    from realtime_qa.builder.build import BuildConfig, build_engine

    out = tmp_path_factory.mktemp("ort-fp32") / "engine"
    return build_engine(BuildConfig(checkpoint=shipped_model_dir, output=out, backend="onnxruntime"))


@pytest.fixture(scope="session")
def torch_fp32_engine_dir(shipped_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model as a PyTorch fp32 engine (runs on CPU too, without CUDA graphs)."""
    from realtime_qa.builder.build import BuildConfig, build_engine

    out = tmp_path_factory.mktemp("torch-fp32") / "engine"
    return build_engine(BuildConfig(checkpoint=shipped_model_dir, output=out, backend="torch"))


@pytest.fixture(scope="session")
def gpu_fp16_engine_dir(shipped_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model as the fp16 torch engine, batches up to 32, for GPU tests (skipped without a CUDA GPU)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from realtime_qa.builder.build import BuildConfig, build_engine

    out = tmp_path_factory.mktemp("torch-fp16") / "engine"
    return build_engine(BuildConfig(shipped_model_dir, out, backend="torch", fp16=True, batch_sizes=(1, 8, 32)))


@pytest.fixture(scope="session")
def engine_dir(ort_fp32_engine_dir: Path) -> Path:
    """The engine tests answer with unless they need a particular one: the CPU fp32 engine."""
    return ort_fp32_engine_dir


@pytest.fixture(scope="session")
def default_int8_engine_dir(_private_engine_cache: None) -> Path:
    """The product's default engine (what `qa-build --default`, and every CLI given no engine, uses): the
    shipped model as an ONNX Runtime INT8 engine from the calibration shipped beside it (SQuAD *training*
    questions, so dev questions measure it on unseen data). Built once per run, into this run's private
    cache, where the CLIs and servers under test find it instead of building it again."""
    from realtime_qa.builder.defaults import ensure_default_engine

    return ensure_default_engine()
