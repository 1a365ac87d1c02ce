"""Reading BERT QA checkpoints into one in-memory form: a `ModelConfig` and HF-named numpy weights.

Formats read (the kind is recognised from the files, not from a flag):
- Hugging Face directory: config.json + model.safetensors, or shards listed in model.safetensors.index.json,
  or pytorch_model.bin (needs torch); fp16/bf16 weights become float32.
- TensorFlow checkpoint as Google's and NVIDIA's BERT samples ship it: bert_config.json, vocab.txt and
  model.ckpt-N.{index,data-*} (the directory or the prefix), read without TensorFlow (`builder.tf_checkpoint`).
- ONNX graphs written by our own exporter (`builder.onnx_graph`), which records where each weight came from.

Every checkpoint is checked against its config (each tensor present, each shape right), so a bad one
fails here with one `CheckpointError` naming the missing piece, not later inside a backend build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from realtime_qa.builder.model_weights import QA_HEAD, Checkpoint, expected_shapes
from realtime_qa.qacore.confidence import CALIBRATION_KEY, ConfidenceCalibration
from realtime_qa.qacore.config import ModelConfig
from realtime_qa.qacore.errors import CheckpointError
from realtime_qa.qacore.tokenization import TOKENIZER_JSON, VOCAB_TXT

log = logging.getLogger(__name__)

HF_CONFIG = "config.json"
TF_CONFIG = "bert_config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class CheckpointFiles:
    """Where one checkpoint's pieces are, found before any weight is read (enough to hash it)."""

    kind: str  # "safetensors" | "pytorch" | "tensorflow" | "onnx"
    weight_files: tuple[Path, ...]  # read in this order; for TensorFlow the .index file then the data shards
    config_file: Path | None  # None: the config is inside the weight file (our ONNX graphs)
    model_dir: Path
    model_id: str
    tf_prefix: Path | None = None
    hashed_files: tuple[Path, ...] = field(default=())

    def sha256(self) -> str:
        return hash_files(list(self.hashed_files or (*self.config_files(), *self.weight_files)))

    def config_files(self) -> tuple[Path, ...]:
        return (self.config_file,) if self.config_file is not None else ()


def load_checkpoint(
    path: Path,
    init_qa_head_seed: int | None = None,
    *,
    config_dir: Path | None = None,
    vocab_file: Path | None = None,
) -> Checkpoint:
    """Load any supported checkpoint (see the module docstring) into canonical form.

    A checkpoint without a QA head (a base encoder) is refused unless `init_qa_head_seed` is given,
    in which case the head is initialised deterministically from that seed. `config_dir` and
    `vocab_file` point at the config and tokenizer where they are not beside the weights.
    """
    files = locate_checkpoint(Path(path), config_dir)
    log.info("reading %s checkpoint %s", files.kind, path)
    if files.kind == "onnx":
        from realtime_qa.builder.onnx_graph import read_onnx_weights

        embedded_config, raw = read_onnx_weights(files.weight_files[0])
        config = ModelConfig.from_file(files.config_file) if files.config_file else embedded_config
    else:
        assert files.config_file is not None
        config = ModelConfig.from_file(files.config_file)
        raw = READERS[files.kind](files)
    weights = tf_to_canonical(raw) if files.kind == "tensorflow" else canonical_names(raw)
    add_qa_head(weights, config, init_qa_head_seed)
    check_weights(weights, config)
    tokenizer_dir = find_tokenizer_dir(files, config_dir, vocab_file)
    null_threshold = read_null_threshold(files.config_file) if files.config_file else None
    calibration = read_confidence_calibration(files.config_file) if files.config_file else None
    return Checkpoint(
        config,
        weights,
        tokenizer_dir,
        files.sha256(),
        files.model_id,
        files.model_dir,
        null_threshold=null_threshold,
        confidence_calibration=calibration,
    )


NULL_THRESHOLD_KEY = "qa_null_threshold"


def _model_entry(config_file: Path, key: str) -> object:
    """An entry a model's JSON config adds for the runtime (threshold, calibration); None where it has none or
    its config is not a JSON file."""
    if config_file.suffix != ".json":
        return None
    return read_json(config_file).get(key)


def read_null_threshold(config_file: Path) -> float | None:
    """The model's calibrated abstention threshold (`qa_null_threshold` in its config), if it has one."""
    raw = _model_entry(config_file, NULL_THRESHOLD_KEY)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise CheckpointError(f"{NULL_THRESHOLD_KEY} in {config_file} must be a finite number, got {raw!r}")
    return float(raw)


def read_confidence_calibration(config_file: Path) -> ConfidenceCalibration | None:
    """The model's Platt scaling of its returned confidence (`qa_confidence_calibration` in its config), if any."""
    raw = _model_entry(config_file, CALIBRATION_KEY)
    if raw is None:
        return None
    try:
        return ConfidenceCalibration.from_dict(raw)
    except ValueError as exc:
        raise CheckpointError(f"{CALIBRATION_KEY} in {config_file}: {exc}") from None


def checkpoint_sha256(path: Path, config_dir: Path | None = None) -> str:
    """The `source_sha256` that `load_checkpoint` would record, without reading the weights into memory."""
    return locate_checkpoint(Path(path), config_dir).sha256()


# ---------------------------------------------------------------------------------------------- locating


def locate_checkpoint(path: Path, config_dir: Path | None = None) -> CheckpointFiles:
    if path.is_file():
        return locate_file(path, config_dir)
    if path.is_dir():
        return locate_dir(path, config_dir)
    tf_index = path.parent / (path.name + ".index")
    if tf_index.is_file():  # a TensorFlow prefix such as .../model.ckpt-8144
        return tensorflow_files(path, config_dir)
    raise CheckpointError(f"checkpoint not found: {path}")


def locate_file(path: Path, config_dir: Path | None) -> CheckpointFiles:
    model_dir = path.parent
    if path.suffix == ".onnx":
        config_file = find_config(config_dir) if config_dir else None
        return CheckpointFiles(
            "onnx", (path,), config_file, model_dir, path.stem if path.stem != "model" else model_dir.name
        )
    if path.suffix == ".index" and ".ckpt" in path.name:
        return tensorflow_files(path.with_suffix(""), config_dir)
    if path.suffix == ".safetensors":
        return CheckpointFiles("safetensors", (path,), find_config(config_dir or model_dir), model_dir, model_dir.name)
    if path.suffix in (".bin", ".pt", ".pth"):
        return CheckpointFiles("pytorch", (path,), find_config(config_dir or model_dir), model_dir, model_dir.name)
    raise CheckpointError(
        f"unrecognised checkpoint file {path.name}: expected .safetensors, .bin, .onnx or a TensorFlow .index"
    )


def locate_dir(path: Path, config_dir: Path | None) -> CheckpointFiles:
    for name, kind in ((SAFETENSORS, "safetensors"), (PYTORCH_BIN, "pytorch")):
        if (path / name).is_file():
            return CheckpointFiles(kind, (path / name,), find_config(config_dir or path), path, path.name)
    for name, kind in ((SAFETENSORS_INDEX, "safetensors"), (PYTORCH_INDEX, "pytorch")):
        if (path / name).is_file():
            shards = shards_of(path / name)
            config_file = find_config(config_dir or path)
            return CheckpointFiles(
                kind, shards, config_file, path, path.name, hashed_files=(config_file, path / name, *shards)
            )
    indexes = sorted(path.glob("*.ckpt*.index"), key=checkpoint_step)
    if indexes:
        return tensorflow_files(indexes[-1].with_suffix(""), config_dir)  # the latest step, as TF would
    onnx_files = sorted(path.glob("*.onnx"))
    if len(onnx_files) == 1:
        return locate_file(onnx_files[0], config_dir)
    loose = sorted(path.glob("*.safetensors"))
    if loose:
        raise CheckpointError(f"{path} has {len(loose)} safetensors shards but no {SAFETENSORS_INDEX}")
    raise CheckpointError(
        f"no weights in {path}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH_BIN}, "
        "a TensorFlow model.ckpt-N.index or one .onnx file"
    )


def checkpoint_step(index_file: Path) -> int:
    match = re.search(r"-(\d+)\.index$", index_file.name)
    return int(match.group(1)) if match else -1


def tensorflow_files(prefix: Path, config_dir: Path | None) -> CheckpointFiles:
    from realtime_qa.builder.tf_checkpoint import data_files

    model_dir = prefix.parent
    index = prefix.parent / (prefix.name + ".index")
    shards = data_files(prefix)
    config_file = find_config(config_dir or model_dir)
    return CheckpointFiles("tensorflow", (index, *shards), config_file, model_dir, model_dir.name, tf_prefix=prefix)


def find_config(directory: Path) -> Path:
    for name in (HF_CONFIG, TF_CONFIG):
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"no model config in {directory}: expected {HF_CONFIG} or {TF_CONFIG}")


def shards_of(index_file: Path) -> tuple[Path, ...]:
    """The shard files an HF index lists, each checked to exist."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        weight_map = dict(index["weight_map"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index_file.name} is not a valid shard index: {exc}") from None
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = index_file.parent / name
        if not shard.is_file():
            raise CheckpointError(f"missing shard {name} listed in {index_file.name}")
        shards.append(shard)
    if not shards:
        raise CheckpointError(f"{index_file.name} lists no shards")
    return tuple(shards)


def find_tokenizer_dir(files: CheckpointFiles, config_dir: Path | None, vocab_file: Path | None) -> Path:
    if vocab_file is not None:
        vocab_file = Path(vocab_file)
        if not vocab_file.is_file():
            raise CheckpointError(f"vocab file not found: {vocab_file}")
        if vocab_file.name not in (VOCAB_TXT, TOKENIZER_JSON):
            raise CheckpointError(f"vocab file must be named {VOCAB_TXT} or {TOKENIZER_JSON}, got {vocab_file.name}")
        return vocab_file.parent
    for directory in (files.model_dir, config_dir):
        if directory is not None and any((directory / name).is_file() for name in (TOKENIZER_JSON, VOCAB_TXT)):
            return directory
    raise CheckpointError(
        f"no tokenizer in {files.model_dir}: expected {TOKENIZER_JSON} or {VOCAB_TXT} (or --vocab-file)"
    )


# ---------------------------------------------------------------------------------------------- reading


def read_safetensors(files: CheckpointFiles) -> dict[str, np.ndarray]:
    raw: dict[str, np.ndarray] = {}
    for file in files.weight_files:
        raw.update(read_safetensors_file(file))
    return raw


def read_safetensors_file(file: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file; bf16 (which numpy lacks) is widened to float32 here."""
    header = safetensors_header(file)
    if not any(entry.get("dtype") == "BF16" for entry in header.values() if isinstance(entry, dict)):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(file)))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {file.name}: {exc}") from None
    return read_bf16_safetensors(file, header)


def safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{file.name} is not a safetensors file (truncated)")
        length = int.from_bytes(prefix, "little")
        if length > 100_000_000:
            raise CheckpointError(f"{file.name} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file.name} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file.name} is not a safetensors file (bad header)")
    header.pop("__metadata__", None)
    return header


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def read_bf16_safetensors(file: Path, header: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    data = np.memmap(file, dtype=np.uint8, mode="r")
    start = 8 + int.from_bytes(bytes(data[:8]), "little")
    tensors = {}
    for name, entry in header.items():
        begin, end = (int(offset) for offset in entry["data_offsets"])
        shape = tuple(int(size) for size in entry["shape"])
        chunk = np.asarray(data[start + begin : start + end])
        dtype = str(entry["dtype"])
        if dtype == "BF16":
            # bfloat16 is the upper half of a float32.
            tensors[name] = (chunk.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
        elif dtype in SAFETENSORS_DTYPES:
            tensors[name] = chunk.view(np.dtype(SAFETENSORS_DTYPES[dtype]).newbyteorder("<")).reshape(shape)
        else:
            raise CheckpointError(f"{file.name}: tensor {name} has unsupported dtype {dtype}")
    return tensors


def read_pytorch(files: CheckpointFiles) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{files.weight_files[0].name} is a PyTorch checkpoint: reading it needs torch "
            "(pip install 'realtime-qa[torch]'), or convert it to safetensors"
        ) from None
    raw: dict[str, np.ndarray] = {}
    for file in files.weight_files:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and torch errors alike
            raise CheckpointError(f"cannot read {file.name}: {str(exc).splitlines()[0]}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{file.name} holds a {type(state).__name__}, not a state dict")
        for name, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                raw[name] = tensor.detach().to(torch.float32 if tensor.is_floating_point() else tensor.dtype).numpy()
    return raw


def read_tensorflow(files: CheckpointFiles) -> dict[str, np.ndarray]:
    from realtime_qa.builder.tf_checkpoint import read_tf_checkpoint

    assert files.tf_prefix is not None
    return read_tf_checkpoint(files.tf_prefix)


READERS: dict[str, Callable[[CheckpointFiles], dict[str, np.ndarray]]] = {
    "safetensors": read_safetensors,
    "pytorch": read_pytorch,
    "tensorflow": read_tensorflow,
}


# ---------------------------------------------------------------------------------------------- naming


def canonical_names(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF names with the `bert.` prefix, float32, the pooler dropped (QA does not use it)."""
    weights = {}
    for name, value in raw.items():
        if name.startswith(("embeddings.", "encoder.")):
            name = "bert." + name
        if "pooler" in name or not name.startswith(("bert.embeddings.", "bert.encoder.", "qa_outputs.")):
            continue
        if name.endswith("position_ids"):
            continue
        weights[name] = np.asarray(value, dtype=np.float32)
    return weights


# TensorFlow BERT (google-research/bert, NVIDIA DeepLearningExamples) -> HF names. Dense kernels are
# stored [in, out] in TF and [out, in] in HF, so they are transposed; the SQuAD head is already [2, hidden].
TF_LEAF = {"gamma": "weight", "beta": "bias", "kernel": "weight", "bias": "bias"}
TF_SKIPPED = ("adam_m", "adam_v", "Momentum", "global_step", "bert/pooler", "cls/predictions", "cls/seq_relationship")


def tf_to_canonical(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    weights = {}
    for tf_name, value in raw.items():
        if any(part in tf_name for part in TF_SKIPPED) or tf_name.startswith("_"):
            continue
        name = tf_canonical_name(tf_name)
        if name is None:
            log.debug("ignoring TensorFlow variable %s", tf_name)
            continue
        array = np.asarray(value, dtype=np.float32)
        weights[name] = np.ascontiguousarray(array.T) if tf_name.endswith("/kernel") else array
    return weights


def tf_canonical_name(tf_name: str) -> str | None:
    if tf_name == "cls/squad/output_weights":
        return "qa_outputs.weight"
    if tf_name == "cls/squad/output_bias":
        return "qa_outputs.bias"
    parts = tf_name.split("/")
    if parts[0] != "bert" or len(parts) < 3:
        return None
    if parts[1] == "embeddings":
        if parts[2] == "LayerNorm" and len(parts) == 4 and parts[3] in TF_LEAF:
            return f"bert.embeddings.LayerNorm.{TF_LEAF[parts[3]]}"
        if len(parts) == 3 and parts[2] in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            return f"bert.embeddings.{parts[2]}.weight"
        return None
    if parts[1] == "encoder" and parts[2].startswith("layer_") and parts[-1] in TF_LEAF:
        layer = parts[2].removeprefix("layer_")
        if not layer.isdigit():
            return None
        middle = ".".join(parts[3:-1])
        return f"bert.encoder.layer.{int(layer)}.{middle}.{TF_LEAF[parts[-1]]}"
    return None


# ---------------------------------------------------------------------------------------------- checking


def check_weights(weights: dict[str, np.ndarray], config: ModelConfig) -> None:
    """Every expected tensor present with its shape, finite, and nothing the config does not explain."""
    shapes = expected_shapes(config)
    for name, shape in shapes.items():
        if name not in weights:
            raise CheckpointError(f"checkpoint is missing tensor {name}")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(
                f"shape mismatch for {name}: config implies {list(shape)}, checkpoint has {list(weights[name].shape)}"
            )
    unexplained = sorted(set(weights) - set(shapes))
    if unexplained:
        raise CheckpointError(
            f"checkpoint has tensor {unexplained[0]} that its config does not explain "
            f"({len(unexplained)} such; does the config match the weights?)"
        )
    for name, value in weights.items():
        if not np.isfinite(value).all():
            raise CheckpointError(f"tensor {name} holds NaN or infinite values")


def add_qa_head(weights: dict[str, np.ndarray], config: ModelConfig, seed: int | None) -> None:
    present = [name in weights for name in QA_HEAD]
    if all(present):
        return
    if any(present) or seed is None:
        raise CheckpointError(
            "checkpoint has no QA head (qa_outputs.weight / qa_outputs.bias); "
            "pass --init-qa-head-seed to start from a base encoder"
        )
    rng = np.random.default_rng(seed)
    weights["qa_outputs.weight"] = rng.normal(0.0, 0.02, (2, config.hidden_size)).astype(np.float32)
    weights["qa_outputs.bias"] = np.zeros(2, dtype=np.float32)


def hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> dict[str, object]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise CheckpointError(f"missing {path.name} in {path.parent}") from None
