"""Engine directories: the engine file, the tokenizer it was built with, and meta.json, made atomically.

A build writes into a hidden staging directory beside the target and renames it into place at the
end, so a reader (a server starting, another build) never sees a half-written engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from realtime_qa.builder.model_weights import Checkpoint
from realtime_qa.qacore.engine import EngineMeta
from realtime_qa.qacore.errors import EngineError
from realtime_qa.qacore.files import sha256_file
from realtime_qa.qacore.tokenization import TOKENIZER_JSON, VOCAB_TXT, load_tokenizer, vocab_sha256

if TYPE_CHECKING:
    from realtime_qa.builder.build_config import BackendBuild, BuildConfig

log = logging.getLogger(__name__)

MODEL_CARD = "README.md"
MAX_CARD_SUMMARY_CHARS = 600


@contextlib.contextmanager
def stage_engine_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; on success move it to `final` (replacing it if `replace`).

    On an exception the staging directory is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        yield staging
        publish(staging, final, replace)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, final: Path, replace: bool) -> None:
    """Rename `staging` to `final`; an existing `final` is first moved aside and removed (if `replace`)."""
    if not final.exists():
        os.replace(staging, final)
        return
    if not replace:
        raise EngineError(f"{final} exists; refusing to replace it")
    retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, retired / final.name)
    os.replace(staging, final)
    shutil.rmtree(retired, ignore_errors=True)


def copy_tokenizer(source_dir: Path, engine_dir: Path) -> list[str]:
    """Copy tokenizer.json and vocab.txt (those present) so the engine directory is self-contained."""
    copied = []
    for name in (TOKENIZER_JSON, VOCAB_TXT):
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, engine_dir / name)
            copied.append(name)
    if not copied:
        raise EngineError(f"no tokenizer to copy from {source_dir}")
    return copied


def model_card_summary(model_dir: Path) -> str:
    """The first prose paragraph of the model's README.md (headings and front matter skipped), or ''."""
    card = model_dir / MODEL_CARD
    if not card.is_file():
        return ""
    text = card.read_text(encoding="utf-8", errors="replace")
    if text.startswith("---"):  # YAML front matter of HF model cards
        end = text.find("\n---", 3)
        text = text[end + 4 :] if end >= 0 else ""
    paragraphs = [" ".join(block.split()) for block in text.split("\n\n")]
    for paragraph in paragraphs:
        if paragraph and not paragraph.startswith(("#", "|", "```", "<", "!")):
            return paragraph[:MAX_CARD_SUMMARY_CHARS]
    headings = [paragraph.lstrip("# ") for paragraph in paragraphs if paragraph.startswith("#")]
    return headings[0][:MAX_CARD_SUMMARY_CHARS] if headings else ""


def write_engine_dir(staging: Path, checkpoint: Checkpoint, config: BuildConfig, built: BackendBuild) -> EngineMeta:
    """Complete a staged engine directory: the tokenizer and meta.json beside the engine file."""
    if not (staging / built.engine_file).is_file():
        raise EngineError(f"{config.backend} build produced no {built.engine_file}")
    copy_tokenizer(checkpoint.tokenizer_dir, staging)
    meta = EngineMeta(
        backend=config.backend,
        precision=config.precision,
        model_id=config.model_id or checkpoint.model_id,
        model_config=checkpoint.config,
        vocab_sha256=vocab_sha256(load_tokenizer(staging)),
        source_sha256=checkpoint.source_sha256,
        engine_file=built.engine_file,
        max_batch_size=config.max_batch_size,
        sequence_lengths=config.sequence_lengths,
        backend_version=built.backend_version,
        builder_options={**config.options_record(), **built.details},
        model_card=model_card_summary(checkpoint.model_dir) if checkpoint.model_dir else "",
        engine_sha256=sha256_file(staging / built.engine_file),
        null_threshold=checkpoint.null_threshold,
        confidence_calibration=checkpoint.confidence_calibration,
    )
    meta.write(staging)
    log.info("engine %s: %s %s, %s", staging.name, meta.backend, meta.precision, built.engine_file)
    return meta
