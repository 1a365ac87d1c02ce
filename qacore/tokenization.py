"""Loading the WordPiece tokenizer that belongs to a model or engine."""

from __future__ import annotations

import hashlib
from pathlib import Path

from realtime_qa.qacore.errors import CheckpointError, InvalidInputError
from realtime_qa.qacore.files import read_utf8
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

TOKENIZER_JSON = "tokenizer.json"
VOCAB_TXT = "vocab.txt"


def load_tokenizer(path: Path, lowercase: bool = True) -> Tokenizer:
    """Return the fast tokenizer of a model directory (`tokenizer.json`, else `vocab.txt`), or of one such file.

    Truncation, padding and special tokens are switched off: featurization adds them itself, so the
    same code serves every model and the offsets always point into the original text.
    """
    path = Path(path)
    if path.is_file():
        json_path, vocab_path = (path, Path()) if path.suffix == ".json" else (Path(), path)
    else:
        json_path, vocab_path = path / TOKENIZER_JSON, path / VOCAB_TXT
    if json_path.is_file():
        try:
            read_utf8(json_path, "tokenizer")
            tokenizer = Tokenizer.from_file(str(json_path))
        except InvalidInputError as exc:
            raise CheckpointError(str(exc)) from None
        except Exception as exc:  # the tokenizers library raises a bare Exception for malformed files
            raise CheckpointError(f"unreadable tokenizer {json_path}: {first_line(exc)}") from None
    elif vocab_path.is_file():
        try:
            read_utf8(vocab_path, "vocabulary")  # a one-line error for a non-UTF-8 file, before the library sees it
            tokenizer = Tokenizer(WordPiece.from_file(str(vocab_path), unk_token="[UNK]"))
        except InvalidInputError as exc:
            raise CheckpointError(str(exc)) from None
        except Exception as exc:  # the tokenizers library raises a bare Exception for malformed files
            raise CheckpointError(f"unreadable vocabulary {vocab_path}: {first_line(exc)}") from None
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    else:
        raise CheckpointError(f"no tokenizer at {path}: expected {TOKENIZER_JSON} or {VOCAB_TXT}")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def vocab_sha256(tokenizer: Tokenizer) -> str:
    """A hash of the vocabulary (token -> id), so an engine can refuse a tokenizer it was not built for."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    digest = hashlib.sha256()
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        digest.update(f"{index}\t{token}\n".encode())
    return digest.hexdigest()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
