"""Passage stores: content ids, per-model encodings, LRU eviction, tenant scopes, the shared Redis store."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from deploy_support import Process, free_port, start_redis
from realtime_qa.qacore.features import EncodedPassage
from realtime_qa.services.errors import NotServingError, UnknownPassageError
from realtime_qa.services.passages import (
    ENCODING_HEADER,
    PassageCache,
    RedisPassageStore,
    decode_tokens,
    encode_tokens,
    open_passage_store,
    passage_id_of,
)


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


# -- scopes, serialization, the shared Redis store ---------------------------------------------------


def test_scopes_keep_tenants_apart_in_the_cache() -> None:
    cache = PassageCache(max_chars=1000)
    passage_id = cache.put("tenant text", scope="token:a")
    assert cache.holds(passage_id, "token:a") and not cache.holds(passage_id, "token:b")
    with pytest.raises(UnknownPassageError):
        cache.text(passage_id, scope="token:b")
    assert cache.text(passage_id, scope="token:a") == "tenant text"


def test_tokens_round_trip_through_bytes_and_malformed_bytes_are_refused() -> None:
    text = "Rollo led the Normans."
    original = EncodedPassage(text, np.array([5, 9, 12], dtype=np.int32), np.array([[0, 5], [6, 9], [10, 13]]))
    blob = encode_tokens(original)
    assert len(blob) == ENCODING_HEADER.size + 3 * 12  # compact: 4 bytes per id, 8 per offset pair
    restored = decode_tokens(text, blob)
    assert restored.token_ids.dtype == np.int32 and restored.offsets.dtype == np.int32
    assert restored.token_ids.tolist() == [5, 9, 12] and restored.offsets.tolist() == [[0, 5], [6, 9], [10, 13]]
    for bad in (b"", blob[:-1], b"XXXX" + blob[4:], blob[:4] + bytes([9]) + blob[5:]):
        with pytest.raises(ValueError):
            decode_tokens(text, bad)
    with pytest.raises(ValueError, match="outside the text"):
        decode_tokens("short", blob)


def test_the_store_option_selects_memory_or_redis_and_refuses_others() -> None:
    assert open_passage_store(10, None).shared is None
    assert open_passage_store(10, "memory").shared is None
    assert isinstance(open_passage_store(10, "redis://127.0.0.1:1/0").shared, RedisPassageStore)
    with pytest.raises(ValueError, match="unknown passage store"):
        open_passage_store(10, "mysql://x")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Process]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs Debian's redis-server")
    process = start_redis(tmp_path / "redis", maxmemory="16mb")
    yield process
    process.stop()


async def test_a_replica_that_misses_reads_the_shared_store(redis_server: Process) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    writer, reader = open_passage_store(1000, url, ttl_s=60), open_passage_store(1000, url, ttl_s=60)
    try:
        text = "The Normans gave their name to Normandy."
        tokens = encoded(text)
        passage_id = await writer.store("token:a", text, "m1", tokens)
        assert passage_id == passage_id_of(text)
        found_text, found_tokens = await reader.lookup("token:a", passage_id, "m1")
        assert found_text == text and found_tokens is not None
        assert found_tokens.token_ids.tolist() == tokens.token_ids.tolist()
        assert reader.cache.holds(passage_id, "token:a")  # kept locally after the first read
        # Another model finds the text but no tokens of its own (it tokenizes, and shares them).
        assert (await reader.lookup("token:a", passage_id, "m2")) == (text, None)
        # Another tenant knowing (or guessing) the id learns nothing.
        with pytest.raises(UnknownPassageError):
            await reader.lookup("token:b", passage_id, "m1")
        with pytest.raises(UnknownPassageError):
            await reader.lookup("token:a", passage_id_of("never stored"), "m1")
        # Entries expire, and the server bounds memory by evicting least recently used keys.
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            assert 0 < await client.ttl(RedisPassageStore.key("token:a", passage_id)) <= 60
            policy = await client.config_get("maxmemory-policy")
            assert {str(key): str(value) for key, value in policy.items()} == {"maxmemory-policy": "allkeys-lru"}
        finally:
            await client.aclose()
    finally:
        await writer.close()
        await reader.close()


async def test_passages_sent_inline_stay_local() -> None:
    store = open_passage_store(1000, "redis://127.0.0.1:1/0")  # never reached: nothing is shared
    try:
        passage_id = await store.store("", "inline text", "m1", encoded("inline text"), shared=False)
        assert (await store.lookup("", passage_id, "m1"))[0] == "inline text"
    finally:
        await store.close()


async def test_an_unreachable_store_is_unavailable_not_not_found(tmp_path: Path) -> None:
    store = open_passage_store(1000, f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(NotServingError, match="shared passage store is unavailable"):
            await store.lookup("", passage_id_of("x"), "m1")
        with pytest.raises(NotServingError):
            await store.store("", "x", "m1", encoded("x"))
    finally:
        await store.close()
