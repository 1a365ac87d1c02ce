"""The context cache: content ids, per-model encodings, least-recently-used eviction by characters."""

from __future__ import annotations

import numpy as np
import pytest

from qacore.features import EncodedPassage
from services.errors import UnknownPassageError
from services.passages import PassageCache


def encoded(text: str) -> EncodedPassage:
    return EncodedPassage(text, np.arange(3, dtype=np.int32), np.zeros((3, 2), dtype=np.int32))


def test_the_same_text_gets_the_same_id() -> None:
    cache = PassageCache(max_chars=1000)
    assert cache.put("abc") == cache.put("abc") == PassageCache.id_of("abc")
    assert cache.put("abd") != cache.put("abc")
    assert len(cache) == 2 and cache.chars == 6


def test_encodings_are_kept_per_model() -> None:
    cache = PassageCache(max_chars=1000)
    passage_id = cache.put("some text")
    assert cache.encoding(passage_id, "m1") is None
    first = encoded("some text")
    cache.set_encoding(passage_id, "m1", first)
    assert cache.encoding(passage_id, "m1") is first
    assert cache.encoding(passage_id, "m2") is None


def test_least_recently_used_passages_are_evicted() -> None:
    cache = PassageCache(max_chars=10)
    old = cache.put("aaaa")
    used = cache.put("bbbb")
    cache.text(old)  # `old` is now more recently used than `used`
    cache.put("cccc")
    assert old in cache and used not in cache
    with pytest.raises(UnknownPassageError, match="send the passage again"):
        cache.text(used)
    assert cache.chars == 8


def test_a_passage_larger_than_the_cache_is_still_kept_alone() -> None:
    cache = PassageCache(max_chars=5)
    cache.put("abc")
    big = cache.put("x" * 50)
    assert big in cache and len(cache) == 1


def test_unknown_ids_are_not_found() -> None:
    with pytest.raises(UnknownPassageError):
        PassageCache(max_chars=10).encoding("p-missing", "m")
