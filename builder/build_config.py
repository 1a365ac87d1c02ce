"""What one engine build is asked to do (`BuildConfig`) and what a backend build step returns (`BackendBuild`).

Its own module so the build driver (`builder.build`) and the backend steps it calls
(`builder.onnxruntime_build`, `builder.tensorrt_build`, `builder.engine_dir`) share these types
without importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from realtime_qa.qacore.errors import InvalidInputError

BACKENDS = ("onnxruntime", "tensorrt", "torch")
DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_SEQUENCE_LENGTHS = (128, 384)
DEFAULT_CALIB_NUM = 100
DEFAULT_WORKSPACE_MIB = 2048
MAX_BATCH_SIZE = 4096
MIN_SEQUENCE_LENGTH = 16  # the featurizer's smallest window: [CLS] question [SEP] passage [SEP]


@dataclass(frozen=True)
class BuildConfig:
    """Everything one engine build needs; `qa-build` options map one to one onto these fields.

    Options that only apply to some backends or precisions are `None` unless given, so a build can
    refuse an option that would be silently ignored. Invalid combinations raise `InvalidInputError`.
    """

    checkpoint: Path  # HF dir, sharded HF dir, pytorch_model.bin, TF checkpoint (dir or prefix), or our .onnx
    output: Path  # engine directory to create
    backend: str = "onnxruntime"  # "onnxruntime" | "tensorrt" | "torch"
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES  # TensorRT: one optimisation profile each; max = engine max
    sequence_lengths: tuple[int, ...] = DEFAULT_SEQUENCE_LENGTHS  # optimised-for lengths; max = engine max
    config_dir: Path | None = None  # where config.json / bert_config.json is, if not beside the weights
    vocab_file: Path | None = None  # vocab.txt or tokenizer.json, if not beside the weights
    fp16: bool = False  # TensorRT / torch: fp16 weights and compute
    int8: bool = False  # onnxruntime / TensorRT: INT8 calibrated on SQuAD questions
    squad_json: Path | None = None  # calibration questions (SQuAD .json or .json.gz)
    calib_num: int | None = None  # how many questions to calibrate on (default DEFAULT_CALIB_NUM)
    calib_path: Path | None = None  # cache of calibrated tensor ranges; reused when it matches
    workspace_size_mib: int | None = None  # TensorRT builder workspace (default DEFAULT_WORKSPACE_MIB)
    timing_cache_file: Path | None = None  # TensorRT timing cache, read and updated
    init_qa_head_seed: int | None = None  # a base encoder without QA head gets a seeded random one
    force: bool = False  # replace an existing output directory
    model_id: str | None = None  # name recorded in meta.json (default: the checkpoint's)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "batch_sizes", tuple(sorted(set(self.batch_sizes))))
        object.__setattr__(self, "sequence_lengths", tuple(sorted(set(self.sequence_lengths))))
        self.validate()

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise InvalidInputError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if not self.batch_sizes or not self.sequence_lengths:
            raise InvalidInputError("at least one batch size and one sequence length are needed")
        if any(not 1 <= size <= MAX_BATCH_SIZE for size in self.batch_sizes):
            raise InvalidInputError(f"batch sizes must be in [1, {MAX_BATCH_SIZE}], got {list(self.batch_sizes)}")
        if any(length < MIN_SEQUENCE_LENGTH for length in self.sequence_lengths):
            raise InvalidInputError(
                f"sequence lengths must be >= {MIN_SEQUENCE_LENGTH}, got {list(self.sequence_lengths)}"
            )
        tensorrt_only = {
            "--workspace-size": self.workspace_size_mib is not None,
            "--timing-cache-file": self.timing_cache_file is not None,
        }
        for option, given in tensorrt_only.items():
            if given and self.backend != "tensorrt":
                raise InvalidInputError(f"{option} only applies to --backend tensorrt")
        if self.workspace_size_mib is not None and self.workspace_size_mib < 1:
            raise InvalidInputError(f"--workspace-size must be >= 1 MiB, got {self.workspace_size_mib}")
        if self.fp16 and self.backend == "onnxruntime":
            raise InvalidInputError(
                "--fp16 is not offered for --backend onnxruntime (CPU kernels run fp16 slower than fp32); "
                "use --int8 for a faster CPU engine, or --backend tensorrt/torch for fp16"
            )
        if self.int8 and self.backend == "torch":
            raise InvalidInputError("--int8 is not offered for --backend torch; use onnxruntime or tensorrt")
        calibration = {
            "--squad-json": self.squad_json is not None,
            "--calib-num": self.calib_num is not None,
            "--calib-path": self.calib_path is not None,
        }
        for option, given in calibration.items():
            if given and not self.int8:
                raise InvalidInputError(f"{option} only applies with --int8")
        if self.int8:
            cached = self.calib_path is not None and self.calib_path.is_file()
            if self.squad_json is None and not cached:
                raise InvalidInputError("--int8 needs --squad-json (calibration questions) or an existing --calib-path")
            if self.squad_json is not None and not self.squad_json.is_file():
                raise InvalidInputError(f"--squad-json file not found: {self.squad_json}")
        if self.calib_num is not None and self.calib_num < 1:
            raise InvalidInputError(f"--calib-num must be >= 1, got {self.calib_num}")
        if self.config_dir is not None and not self.config_dir.is_dir():
            raise InvalidInputError(f"--config-dir is not a directory: {self.config_dir}")
        if self.vocab_file is not None and not self.vocab_file.is_file():
            raise InvalidInputError(f"--vocab-file not found: {self.vocab_file}")
        if self.output.exists() and not self.force:
            raise InvalidInputError(f"output {self.output} exists; pass --force to replace it")

    @property
    def precision(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"

    @property
    def max_batch_size(self) -> int:
        return max(self.batch_sizes)

    @property
    def max_seq_length(self) -> int:
        return max(self.sequence_lengths)

    @property
    def calibration_questions(self) -> int:
        return self.calib_num if self.calib_num is not None else DEFAULT_CALIB_NUM

    @property
    def workspace_mib(self) -> int:
        return self.workspace_size_mib if self.workspace_size_mib is not None else DEFAULT_WORKSPACE_MIB

    def options_record(self) -> dict[str, Any]:
        """The options as JSON-ready values, for meta.json's `builder_options`."""
        record: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key in ("output", "force") or value is None:
                continue
            record[key] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        return record


@dataclass(frozen=True)
class BackendBuild:
    """What a backend build step left in its staging directory."""

    engine_file: str  # file name inside the engine directory
    backend_version: str  # version of the runtime that must load it
    details: dict[str, Any] = field(default_factory=dict)  # added to meta.json's builder_options
