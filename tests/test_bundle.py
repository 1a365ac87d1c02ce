"""One engine bundle for the CLI, the evaluator and the service: checked engine files, engine faults, and the
model's calibrated null threshold carried from config.json through meta.json to every decoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from realtime_qa.pipeline.assistant_cli import main as qa_assistant
from realtime_qa.pipeline.assistant_cli import open_answerer, parse_config
from realtime_qa.qacore.answerer import QuestionAnswerer
from realtime_qa.qacore.bundle import open_bundle
from realtime_qa.qacore.engine import EngineMeta
from realtime_qa.qacore.errors import EngineError, EngineFaultError
from realtime_qa.qacore.eval_cli import main as qa_eval
from realtime_qa.qacore.factory import EngineOptions
from realtime_qa.qacore.files import sha256_file
from realtime_qa.services.config import BatcherConfig, EngineSpec
from realtime_qa.services.models import ModelRuntime, load_model
from tiny_models import TF_TINY, build_tiny_engine

PASSAGE = "Ada Lovelace wrote the first program for the Analytical Engine in 1843."


def test_bundle_sizes_windows_to_the_engine_and_defaults_the_decoder(engine_dir: Path, shipped_model_dir: Path) -> None:
    # the shipped model's calibrated threshold (config.json qa_null_threshold, tuned in training/calibration.py)
    shipped = json.loads((shipped_model_dir / "config.json").read_text())["qa_null_threshold"]
    assert shipped < 0  # abstaining needs the null logit to come within |threshold| of the best span's, not beat it
    with open_bundle(engine_dir) as bundle:
        assert bundle.featurizer.config.max_seq_length == bundle.meta.max_seq_length == 384
        assert bundle.decoder_defaults.null_threshold == bundle.meta.null_threshold == shipped
        assert bundle.decoder(n_best_size=3, null_threshold=None).n_best_size == 3


def corrupt_copy(engine_dir: Path, destination: Path) -> Path:
    """A copy of the engine whose model file has 1 MB overwritten in the middle."""
    shutil.copytree(engine_dir, destination)
    model = destination / EngineMeta.read(destination).engine_file
    with model.open("r+b") as handle:
        handle.seek(model.stat().st_size // 2)
        handle.write(b"\x7f" * 1_000_000)
    return destination


def test_a_corrupted_engine_file_is_refused_at_load(
    engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = corrupt_copy(engine_dir, tmp_path / "engine")
    with pytest.raises(EngineError, match="is corrupt: its SHA-256"):
        open_bundle(broken)
    assert qa_assistant(["-e", str(broken), "--demo"]) == 3
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "is corrupt" in err
    assert qa_eval(["--engine", str(broken), "--squad-json", str(tmp_path / "unused.json")]) in (2, 3)


def test_the_service_refuses_a_corrupted_engine(engine_dir: Path, tmp_path: Path) -> None:
    """`qa-serve` loads models through `services.models.load_model`: a corrupt engine never goes SERVING."""
    import asyncio

    broken = corrupt_copy(engine_dir, tmp_path / "engine")
    with pytest.raises(EngineError, match="is corrupt"):
        asyncio.run(load_model(EngineSpec(broken), EngineOptions(), 1, BatcherConfig()))


def test_an_engine_that_returns_nan_is_a_fault_not_an_abstention(engine_dir: Path, tmp_path: Path) -> None:
    """Weights damaged before hashing (so the file checks out) make NaN logits: an EngineFaultError."""
    import onnx
    from onnx import numpy_helper

    broken = tmp_path / "engine"
    shutil.copytree(engine_dir, broken)
    meta = EngineMeta.read(broken)
    model = onnx.load(str(broken / meta.engine_file))
    tensor = next(t for t in model.graph.initializer if "LayerNorm" in t.name or "layer_norm" in t.name.lower())
    poisoned = np.full(numpy_helper.to_array(tensor).shape, np.nan, dtype=np.float32)
    tensor.CopyFrom(numpy_helper.from_array(poisoned, tensor.name))
    onnx.save(model, str(broken / meta.engine_file))
    raw = json.loads(meta.to_json())
    raw["engine_sha256"] = sha256_file(broken / meta.engine_file)
    (broken / "meta.json").write_text(json.dumps(raw), encoding="utf-8")
    with (
        QuestionAnswerer.from_engine_dir(broken) as answerer,
        pytest.raises(EngineFaultError, match="NaN or infinite logits"),
    ):
        answerer.answer("Who wrote the first program?", PASSAGE)
    with open_bundle(broken) as bundle, pytest.raises(EngineFaultError, match="at warm-up"):
        bundle.engine.warmup()  # what the service runs before SERVING


@pytest.fixture(scope="module")
def engine_with_threshold(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose config carries `qa_null_threshold`, built as `qa-build` builds any model."""
    return build_tiny_engine(tmp_path_factory, qa_null_threshold=1.5)


def test_the_model_null_threshold_reaches_every_decoder(engine_with_threshold: Path) -> None:
    import asyncio

    assert EngineMeta.read(engine_with_threshold).null_threshold == 1.5
    with open_bundle(engine_with_threshold) as bundle:
        assert bundle.decoder_defaults.null_threshold == 1.5
    # qa-assistant: the model's threshold with --allow-null, the user's --null-threshold over it
    base = ["-e", str(engine_with_threshold), "-p", "a b c", "-q", "a", "--allow-null"]
    with open_answerer(parse_config(base)) as answerer:
        assert (answerer.decoder_config.allow_null, answerer.decoder_config.null_threshold) == (True, 1.5)
    with open_answerer(parse_config([*base, "--null-threshold", "0.25"])) as answerer:
        assert answerer.decoder_config.null_threshold == 0.25
    # the service: the model's decoder defaults, which a request's null_threshold overrides (services.convert)
    model = asyncio.run(_load_and_close(engine_with_threshold))
    assert model.decoder_config.null_threshold == 1.5


async def _load_and_close(engine_dir: Path) -> ModelRuntime:
    model = await load_model(EngineSpec(engine_dir), EngineOptions(), 1, BatcherConfig())
    await model.close()
    return model


def test_a_non_finite_model_null_threshold_is_refused(tmp_path: Path) -> None:
    from realtime_qa.builder.checkpoint import load_checkpoint
    from realtime_qa.qacore.errors import CheckpointError

    model = tmp_path / "model"
    shutil.copytree(TF_TINY, model)
    config = json.loads((model / "bert_config.json").read_text())
    (model / "bert_config.json").write_text(json.dumps({**config, "qa_null_threshold": "high"}))
    with pytest.raises(CheckpointError, match=r"qa_null_threshold .* must be a finite number"):
        load_checkpoint(model / "model.ckpt-3")


def test_qa_serve_refuses_a_corrupted_engine_with_exit_3(engine_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    broken = corrupt_copy(engine_dir, tmp_path / "engine")
    qa_serve = Path(sys.executable).with_name("qa-serve")
    done = subprocess.run(
        [str(qa_serve), "--engine", str(broken), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    assert "is corrupt" in done.stderr and "SERVING" not in done.stderr
