"""One engine bundle: an engine directory opened once into everything needed to answer with it.

    engine dir -> (meta.json checked, engine file hash checked) engine
               -> tokenizer (its vocabulary hash checked against the engine's) -> featurizer (windows that fit)
               -> decoder defaults (the model's calibrated null threshold and confidence calibration, from
                  meta.json)

The CLI (`qa-assistant`), the evaluator (`qa-eval`) and the service (`services.models`) all open
engines here, so each engine is checked, sized and given its defaults the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from realtime_qa.qacore.decoding import DecoderConfig
from realtime_qa.qacore.engine import Engine, EngineMeta
from realtime_qa.qacore.errors import EngineError, InvalidInputError
from realtime_qa.qacore.factory import EngineOptions, load_engine
from realtime_qa.qacore.features import Featurizer, FeaturizerConfig, featurizer_config_for
from realtime_qa.qacore.tokenization import load_tokenizer, vocab_sha256


@dataclass(eq=False)
class EngineBundle:
    """An open engine with its featurizer and decoder defaults; `close()` releases the engine."""

    engine_dir: Path
    engine: Engine
    featurizer: Featurizer
    decoder_defaults: DecoderConfig

    @property
    def meta(self) -> EngineMeta:
        return self.engine.meta

    def decoder(self, **overrides: object) -> DecoderConfig:
        """The decoder defaults with some options overridden (None values keep the default)."""
        given = {name: value for name, value in overrides.items() if value is not None}
        return replace(self.decoder_defaults, **given)  # type: ignore[arg-type]

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> EngineBundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decoder_defaults(meta: EngineMeta) -> DecoderConfig:
    """The decoder options an engine's answers use unless a caller overrides them.

    The null threshold is the model's calibrated one where it ships one, else 0.0; the confidence calibration is
    the model's Platt scaling where it ships one, else none (the confidence is then the threshold-shifted
    probability). Both only matter where abstaining is allowed.
    """
    threshold = meta.null_threshold if meta.null_threshold is not None else 0.0
    return DecoderConfig(null_threshold=threshold, calibration=meta.confidence_calibration)


def featurizer_config_of(
    meta: EngineMeta,
    max_seq_length: int | None = None,
    doc_stride: int | None = None,
    max_query_length: int | None = None,
) -> FeaturizerConfig:
    """Windows as long as the engine takes (or `max_seq_length`, which must fit it); the stride and the
    question length default to the serving defaults, shrunk to fit the window length."""
    if max_seq_length is not None and max_seq_length > meta.max_seq_length:
        raise InvalidInputError(f"sequence length {max_seq_length} exceeds the engine's {meta.max_seq_length}")
    shaped = featurizer_config_for(max_seq_length or meta.max_seq_length)
    return FeaturizerConfig(
        max_seq_length=max_seq_length or shaped.max_seq_length,
        doc_stride=doc_stride if doc_stride is not None else shaped.doc_stride,
        max_query_length=max_query_length if max_query_length is not None else shaped.max_query_length,
    )


def featurizer_for_engine(
    engine: Engine, engine_dir: Path, config: FeaturizerConfig | None = None, vocab_file: Path | None = None
) -> Featurizer:
    """The featurizer of an engine: its own tokenizer (or `vocab_file`), windows no longer than it takes."""
    tokenizer = load_tokenizer(vocab_file if vocab_file is not None else engine_dir)
    if vocab_sha256(tokenizer) != engine.meta.vocab_sha256:
        source = vocab_file if vocab_file is not None else engine_dir
        raise EngineError(f"tokenizer in {source} does not match the vocabulary the engine was built with")
    config = config or featurizer_config_of(engine.meta)
    if config.max_seq_length > engine.meta.max_seq_length:
        raise InvalidInputError(
            f"sequence length {config.max_seq_length} exceeds the engine's {engine.meta.max_seq_length}"
        )
    return Featurizer(tokenizer, config)


def open_bundle(
    engine_dir: Path,
    engine_options: EngineOptions | None = None,
    featurizer_config: FeaturizerConfig | None = None,
    vocab_file: Path | None = None,
) -> EngineBundle:
    """Open an engine directory into a bundle; every failure is one `QAError` line (the engine is closed)."""
    engine_dir = Path(engine_dir)
    engine = load_engine(engine_dir, engine_options)
    try:
        featurizer = featurizer_for_engine(engine, engine_dir, featurizer_config, vocab_file)
        return EngineBundle(engine_dir, engine, featurizer, decoder_defaults(engine.meta))
    except BaseException:
        engine.close()
        raise
