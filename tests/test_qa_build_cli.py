"""`qa-build` as a user runs it, and the cached default engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from realtime_qa.builder.checkpoint import load_checkpoint
from realtime_qa.builder.cli import main
from realtime_qa.builder.defaults import ensure_default_engine
from realtime_qa.qacore.default_engine import (
    DefaultEngineSpec,
    find_default_engine,
    is_current,
    model_fingerprint,
    resolve_default_engine,
)
from realtime_qa.qacore.default_engine import shipped_model_dir as shipped_model_dir_of_package
from realtime_qa.qacore.engine import EngineMeta
from realtime_qa.qacore.errors import EngineError
from realtime_qa.qacore.factory import load_engine
from realtime_qa.qacore.features import Featurizer
from realtime_qa.qacore.tokenization import load_tokenizer, vocab_sha256

REPO = Path(__file__).resolve().parents[1]
TF_TINY = Path(__file__).parent / "data" / "tf_bert_tiny"


def run_cli(args: Sequence[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as exit_:  # argparse's own usage errors
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_builds_an_engine_with_chosen_shapes(
    shipped_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "engine"
    code, out, err = run_cli(
        ["-m", shipped_model_dir, "-o", out_dir, "-b", 4, "-b", 1, "-s", 256, "-s", 64, "-s", 256], capsys
    )
    assert code == 0, err
    assert str(out_dir) in out and "onnxruntime fp32" in out
    assert sorted(path.name for path in out_dir.iterdir()) == ["meta.json", "model.onnx", "tokenizer.json", "vocab.txt"]
    meta = EngineMeta.read(out_dir)
    assert (meta.max_batch_size, meta.sequence_lengths) == (4, (64, 256))
    assert meta.vocab_sha256 == vocab_sha256(load_tokenizer(shipped_model_dir))
    assert meta.model_card.startswith("PLACEHOLDER") or meta.model_card
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging left behind
    with load_engine(out_dir) as engine:
        featurizer = Featurizer(load_tokenizer(out_dir))
        batch = featurizer.batch(featurizer.featurize("Who?", "Ada Lovelace wrote the first program.").windows)
        assert engine.infer(batch).start_logits.shape == batch.input_ids.shape


def test_existing_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The tiny checkpoint: what is checked is the replacing of an output, which a full-size build only slows.
    out_dir = tmp_path / "engine"
    out_dir.mkdir()
    (out_dir / "old-file").write_text("from an earlier build")
    tiny = ["-m", TF_TINY / "model.ckpt-3", "-c", TF_TINY, "-v", TF_TINY / "vocab.txt", "-o", out_dir, "-b", 2]
    code, _, err = run_cli([*tiny, "-s", 32], capsys)
    assert code == 2 and err.strip() == f"qa-build: error: output {out_dir} exists; pass --force to replace it"
    assert (out_dir / "old-file").is_file()
    code, _, err = run_cli([*tiny, "--force", "-s", 16], capsys)
    assert code == 0, err
    assert not (out_dir / "old-file").exists() and EngineMeta.read(out_dir).sequence_lengths == (16,)


def test_tensorflow_checkpoint_with_nvidia_style_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "tiny"
    args = ["-m", TF_TINY / "model.ckpt-3", "-c", TF_TINY, "-v", TF_TINY / "vocab.txt", "-o", out_dir]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert err.strip() == "qa-build: error: sequence length 384 exceeds the model's max_position_embeddings 32"
    code, _, err = run_cli([*args, "-s", 32, "-b", 2], capsys)
    assert code == 0, err
    meta = EngineMeta.read(out_dir)
    assert (meta.model_config.hidden_size, meta.model_id) == (8, "tf_bert_tiny")
    with load_engine(out_dir) as engine:
        ids = np.array([[2, 7, 8, 3, 9, 10, 3, 0]], np.int32)
        from realtime_qa.qacore.features import EngineInputs

        outputs = engine.infer(
            EngineInputs(ids, np.array([[0, 0, 0, 0, 1, 1, 1, 0]], np.int32), (ids > 0).astype(np.int32))
        )
        assert np.isfinite(outputs.start_logits).all()


def test_torch_backend_writes_canonical_weights(
    shipped_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.numpy import load_file

    checkpoint = load_checkpoint(shipped_model_dir)
    for flags, precision, dtype in (([], "fp32", np.float32), (["--fp16"], "fp16", np.float16)):
        out_dir = tmp_path / precision
        code, _, err = run_cli(["-m", shipped_model_dir, "-o", out_dir, "--backend", "torch", *flags], capsys)
        assert code == 0, err
        meta = EngineMeta.read(out_dir)
        assert (meta.backend, meta.precision, meta.engine_file) == ("torch", precision, "model.safetensors")
        weights = load_file(str(out_dir / meta.engine_file))
        assert sorted(weights) == sorted(checkpoint.weights)
        name = "bert.encoder.layer.2.output.dense.weight"
        assert weights[name].dtype == dtype
        np.testing.assert_allclose(weights[name], checkpoint.weights[name], atol=1e-3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fp16"], "--fp16 is not offered for --backend onnxruntime"),
        (["--backend", "torch", "--int8", "--squad-json", "{squad}"], "--int8 is not offered for --backend torch"),
        (["--int8"], "--int8 needs --squad-json (calibration questions) or an existing --calib-path"),
        (["--int8", "--squad-json", "{tmp}/missing.json"], "--squad-json file not found"),
        (["--squad-json", "{squad}"], "--squad-json only applies with --int8"),
        (["--calib-num", "10"], "--calib-num only applies with --int8"),
        (["-w", "1024"], "--workspace-size only applies to --backend tensorrt"),
        (["-tcf", "{tmp}/timing.cache"], "--timing-cache-file only applies to --backend tensorrt"),
        (["-b", "0"], "argument -b/--batch-size: must be >= 1, got 0"),
        (["-b", "-3"], "argument -b/--batch-size: must be >= 1, got -3"),
        (["-s", "0"], "argument -s/--sequence-length: must be >= 1, got 0"),
        (["-s", "many"], "argument -s/--sequence-length: expected a positive integer, got 'many'"),
        (["-s", "12"], "sequence lengths must be >= 16"),
        (["-s", "1024"], "sequence length 1024 exceeds the model's max_position_embeddings 512"),
        (["-b", "5000"], "batch sizes must be in [1, 4096]"),
        (["--backend", "tflite"], "argument --backend: invalid choice: 'tflite'"),
        (["--calib-num", "0", "--int8"], "argument --calib-num: must be >= 1, got 0"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["-c", "{tmp}/no-such-dir"], "--config-dir is not a directory"),
        (["-v", "{tmp}/no-vocab.txt"], "--vocab-file not found"),
    ],
)
def test_bad_options_are_rejected_in_one_line(
    args: list[str],
    message: str,
    shipped_model_dir: Path,
    squad_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    filled = [arg.format(squad=squad_dir / "dev-v1.1.json.gz", tmp=tmp_path) for arg in args]
    code, out, err = run_cli(["-m", shipped_model_dir, "-o", tmp_path / "engine", *filled], capsys)
    assert code == 2 and not out
    assert_one_line_error(err, message)
    assert not (tmp_path / "engine").exists()


def test_required_and_conflicting_modes(
    shipped_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["-o", tmp_path / "engine"], capsys)
    assert code == 2 and "-m/--checkpoint and -o/--output are required (or --default)" in err
    code, _, err = run_cli(["--default", "-m", shipped_model_dir], capsys)
    assert code == 2 and "--default builds the shipped model's CPU engine and takes no -m" in err


def test_checkpoint_problems_exit_1_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["-m", tmp_path / "nowhere", "-o", tmp_path / "engine"], capsys)
    assert code == 1 and err.strip() == f"qa-build: checkpoint not found: {tmp_path / 'nowhere'}"
    # An encoder without a QA head, as a Hugging Face directory (the tiny checkpoint's weights: a full-size
    # model would only make the build slower, not the check stronger).
    from safetensors.numpy import save_file

    tiny = load_checkpoint(TF_TINY / "model.ckpt-3", config_dir=TF_TINY, vocab_file=TF_TINY / "vocab.txt")
    encoder_only = tmp_path / "encoder"
    encoder_only.mkdir()
    (encoder_only / "config.json").write_text(json.dumps(tiny.config.to_dict()))
    shutil.copyfile(TF_TINY / "vocab.txt", encoder_only / "vocab.txt")
    encoder = {name: value for name, value in tiny.weights.items() if not name.startswith("qa_")}
    assert len(encoder) == len(tiny.weights) - 2
    save_file(encoder, str(encoder_only / "model.safetensors"))
    code, _, err = run_cli(["-m", encoder_only, "-o", tmp_path / "engine"], capsys)
    assert code == 1 and "no QA head" in err and len(err.strip().splitlines()) == 1
    args = ["-m", encoder_only, "-o", tmp_path / "engine", "--init-qa-head-seed", 0, "-s", 32]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err


def test_console_entry_point_exit_status(tmp_path: Path) -> None:
    """The real process: exit status and stderr a shell script would see."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "realtime_qa.builder.cli", "-m", str(tmp_path), "-o", str(tmp_path / "e"), "--int8"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "qa-build: error: --int8 needs --squad-json (calibration questions) or an existing --calib-path"
    ]


# ---------------------------------------------------------------------------------------------- default engine


def test_default_engine_is_int8_from_the_shipped_calibration_and_built_once(
    default_int8_engine_dir: Path,
    shipped_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `default_int8_engine_dir` is `ensure_default_engine()` run once for the session, into its private cache.
    assert shipped_model_dir.resolve() == shipped_model_dir_of_package().resolve()
    fingerprint = model_fingerprint(shipped_model_dir)
    cache = Path(os.environ["QA_ENGINE_CACHE"])
    assert default_int8_engine_dir == cache / f"minilm-l6-squad-{fingerprint[:12]}-onnxruntime-int8"
    meta = EngineMeta.read(default_int8_engine_dir)
    assert (meta.backend, meta.precision) == ("onnxruntime", "int8")
    # No SQuAD data was needed: the ranges came from the calibration shipped beside the model.
    assert meta.builder_options["quantization"]["calibration_cached"] is True
    assert meta.builder_options["calib_path"] == str(shipped_model_dir / "calibration.json")
    assert "squad_json" not in meta.builder_options
    # ... and so did the bias shifts of every quantized MatMul (builder.bias_correction)
    assert meta.builder_options["quantization"]["bias_corrected_matmuls"] == 18
    assert find_default_engine() == default_int8_engine_dir
    built_at = (default_int8_engine_dir / "model.onnx").stat().st_mtime_ns
    assert ensure_default_engine() == default_int8_engine_dir
    assert (default_int8_engine_dir / "model.onnx").stat().st_mtime_ns == built_at  # found, not rebuilt

    # A damaged cache (a copy of that engine in a cache of its own): not current, and `qa-build --default`
    # repairs it, again from the shipped calibration alone.
    monkeypatch.setenv("QA_ENGINE_CACHE", str(tmp_path / "cache"))
    engine_dir = tmp_path / "cache" / default_int8_engine_dir.name
    shutil.copytree(default_int8_engine_dir, engine_dir)
    assert find_default_engine() == engine_dir
    (engine_dir / "model.onnx").unlink()
    assert find_default_engine() is None
    code, out, err = run_cli(["--default"], capsys)
    assert code == 0, err
    assert out.startswith(str(engine_dir)) and (engine_dir / "model.onnx").is_file()
    assert EngineMeta.read(engine_dir).builder_options["quantization"]["calibration_cached"] is True
    assert find_default_engine() == engine_dir
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [engine_dir.name]  # nothing half-written left


def test_an_engine_of_another_runtime_version_is_not_current(engine_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "engine"
    shutil.copytree(engine_dir, copy)
    assert is_current(copy, "fp32")
    raw = json.loads((copy / "meta.json").read_text())
    raw["backend_version"] = "0.0.1"  # built by another ONNX Runtime: rebuilt on next use
    (copy / "meta.json").write_text(json.dumps(raw))
    assert not is_current(copy, "fp32")
    assert not is_current(engine_dir, "int8")


def test_default_fp32_engine_is_one_flag_away(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["--default", "--precision", "fp32", "--cache-root", str(tmp_path)], capsys)
    assert code == 0, err
    engine_dir = Path(out.split()[0])
    assert engine_dir.parent == tmp_path and engine_dir.name.endswith("-onnxruntime-fp32")
    with load_engine(engine_dir) as engine:
        assert (engine.meta.model_id, engine.meta.precision) == ("minilm-l6-squad", "fp32")
    spec = DefaultEngineSpec(precision="fp32", cache_root=tmp_path)
    assert resolve_default_engine(spec, build=False) == engine_dir


def test_missing_default_engine_without_build_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"^the default int8 engine is not built; run: qa-build --default$"):
        resolve_default_engine(DefaultEngineSpec(cache_root=tmp_path), build=False)


def test_default_only_options_are_refused_elsewhere(
    shipped_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["-m", str(shipped_model_dir), "-o", str(tmp_path / "x"), "--precision", "fp32"], capsys)
    assert code == 2
    assert_one_line_error(err, "--precision applies with --default only")


def test_a_model_without_shipped_calibration_has_no_default_int8_engine(
    shipped_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(shipped_model_dir, model)
    (model / "calibration.json").unlink()
    code, _, err = run_cli(["--default", "--default-model-dir", str(model), "--cache-root", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line_error(err, "ships no calibration.json for its INT8 engine; use --precision fp32")


def test_a_shipped_calibration_without_bias_shifts_needs_squad_data(
    shipped_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(shipped_model_dir, model)
    calibration = json.loads((model / "calibration.json").read_text())
    del calibration["bias_shift"]  # as cached before bias correction
    (model / "calibration.json").write_text(json.dumps(calibration))
    code, _, err = run_cli(["--default", "--default-model-dir", str(model), "--cache-root", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line_error(err, "holds no bias shifts and no --squad-json was given")


def assert_one_line_error(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qa-build: error: ") and message in lines[0], lines[0]
