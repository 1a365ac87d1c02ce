"""The context cache: passages tokenized once and kept by content id, so many questions can share them.

Ids derive from the text (the same passage always gets the same id, whoever stored it), encodings are
kept per model (each model has its own tokenizer), and the least recently used passages are evicted
once the cache holds more than `max_chars` characters of text. An evicted id answers NOT_FOUND; the
client stores the passage again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from qacore.features import EncodedPassage
from services.errors import UnknownPassageError

PASSAGE_ID_PREFIX = "p-"


@dataclass(eq=False)
class _Entry:
    text: str
    encodings: dict[str, EncodedPassage] = field(default_factory=dict)  # model id -> tokens


class PassageCache:
    """An LRU map from passage id to text and per-model encodings (not thread-safe: event loop only)."""

    def __init__(self, max_chars: int) -> None:
        if max_chars < 0:
            raise ValueError(f"max_chars must be >= 0, got {max_chars}")
        self.max_chars = max_chars
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._chars = 0

    @staticmethod
    def id_of(text: str) -> str:
        return PASSAGE_ID_PREFIX + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, passage_id: object) -> bool:
        return passage_id in self._entries

    @property
    def chars(self) -> int:
        return self._chars

    def put(self, text: str) -> str:
        """Keep `text` (most recently used) and return its id."""
        passage_id = self.id_of(text)
        if passage_id in self._entries:
            self._entries.move_to_end(passage_id)
            return passage_id
        self._entries[passage_id] = _Entry(text)
        self._chars += len(text)
        self._evict()
        return passage_id

    def text(self, passage_id: str) -> str:
        return self._entry(passage_id).text

    def encoding(self, passage_id: str, model_id: str) -> EncodedPassage | None:
        """The passage's tokens for `model_id`, if encoded before (raises NOT_FOUND for unknown ids)."""
        return self._entry(passage_id).encodings.get(model_id)

    def set_encoding(self, passage_id: str, model_id: str, encoded: EncodedPassage) -> None:
        entry = self._entries.get(passage_id)
        if entry is not None:  # it may have been evicted while it was being tokenized
            entry.encodings[model_id] = encoded

    def _entry(self, passage_id: str) -> _Entry:
        entry = self._entries.get(passage_id)
        if entry is None:
            raise UnknownPassageError(
                f"unknown passage_id {passage_id!r} (never stored, or evicted): send the passage again"
            )
        self._entries.move_to_end(passage_id)
        return entry

    def _evict(self) -> None:
        # The newest passage always stays, even when it alone is larger than the cache.
        while self._chars > self.max_chars and len(self._entries) > 1:
            _, entry = self._entries.popitem(last=False)
            self._chars -= len(entry.text)
