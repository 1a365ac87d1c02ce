"""Passage stores: passages tokenized once and kept by id, so many questions (on any replica) can share them.

Two layers behind one interface (`PassageStore`):

- `PassageCache`, the in-process LRU (the default, and the first layer everywhere): ids derive from the
  text, encodings are kept per model (each model has its own tokenizer), and the least recently used
  passages are evicted once the cache holds more than `max_chars` characters of text.
- `RedisPassageStore`, a shared store for replicas (`--passage-store redis://host:port/db`): a replica
  that misses in its own cache reads the passage (text and tokens) from Redis, so `PutPassage` on one
  replica and `Answer(passage_id)` on another work. Entries expire after a TTL; the Redis server bounds
  memory itself (`maxmemory` with `allkeys-lru`, see docs/deploy.md). Nobody answers from a passage it
  does not hold: an id neither layer has is NOT_FOUND, and an unreadable Redis is UNAVAILABLE.

Tenancy: every entry is keyed by the caller's scope (the identity `services.auth` authenticated: a token
or a client certificate), so a passage id is only meaningful to the caller who stored it. Another tenant
computing the content id of a guessed text finds nothing, so ids are no membership oracle across tenants.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from realtime_qa.qacore.features import EncodedPassage
from realtime_qa.services.errors import NotServingError, UnknownPassageError

log = logging.getLogger(__name__)

PASSAGE_ID_PREFIX = "p-"
ANONYMOUS_SCOPE = ""  # callers of a server without authentication share one scope
REDIS_KEY_PREFIX = "qa:passage:v1:"
DEFAULT_TTL_S = 3600
# Serialized tokens: magic, format version, token count; then int32 token ids and (n, 2) int32 offsets.
ENCODING_HEADER = struct.Struct("<4sBI")
ENCODING_MAGIC = b"QAPE"
ENCODING_VERSION = 1


@dataclass(eq=False)
class _Entry:
    text: str
    encodings: dict[str, EncodedPassage] = field(default_factory=dict)  # model id -> tokens


def passage_id_of(text: str) -> str:
    """The content id of a passage (the same text always gets the same id within one scope)."""
    return PASSAGE_ID_PREFIX + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _local_key(scope: str, passage_id: str) -> str:
    return passage_id if scope == ANONYMOUS_SCOPE else f"{scope}\x00{passage_id}"


class PassageCache:
    """An LRU map from (scope, passage id) to text and per-model encodings (not thread-safe: event loop only)."""

    def __init__(self, max_chars: int) -> None:
        if max_chars < 0:
            raise ValueError(f"max_chars must be >= 0, got {max_chars}")
        self.max_chars = max_chars
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._chars = 0

    @staticmethod
    def id_of(text: str) -> str:
        return passage_id_of(text)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, passage_id: object) -> bool:
        return passage_id in self._entries

    def holds(self, passage_id: str, scope: str = ANONYMOUS_SCOPE) -> bool:
        return _local_key(scope, passage_id) in self._entries

    @property
    def chars(self) -> int:
        return self._chars

    def put(self, text: str, scope: str = ANONYMOUS_SCOPE) -> str:
        """Keep `text` (most recently used) and return its id."""
        passage_id = self.id_of(text)
        key = _local_key(scope, passage_id)
        if key in self._entries:
            self._entries.move_to_end(key)
            return passage_id
        self._entries[key] = _Entry(text)
        self._chars += len(text)
        self._evict()
        return passage_id

    def text(self, passage_id: str, scope: str = ANONYMOUS_SCOPE) -> str:
        return self._entry(passage_id, scope).text

    def encoding(self, passage_id: str, model_id: str, scope: str = ANONYMOUS_SCOPE) -> EncodedPassage | None:
        """The passage's tokens for `model_id`, if encoded before (raises NOT_FOUND for unknown ids)."""
        return self._entry(passage_id, scope).encodings.get(model_id)

    def set_encoding(
        self, passage_id: str, model_id: str, encoded: EncodedPassage, scope: str = ANONYMOUS_SCOPE
    ) -> None:
        entry = self._entries.get(_local_key(scope, passage_id))
        if entry is not None:  # it may have been evicted while it was being tokenized
            entry.encodings[model_id] = encoded

    def _entry(self, passage_id: str, scope: str) -> _Entry:
        key = _local_key(scope, passage_id)
        entry = self._entries.get(key)
        if entry is None:
            raise UnknownPassageError(
                f"unknown passage_id {passage_id!r} (never stored, or evicted): send the passage again"
            )
        self._entries.move_to_end(key)
        return entry

    def _evict(self) -> None:
        # The newest passage always stays, even when it alone is larger than the cache.
        while self._chars > self.max_chars and len(self._entries) > 1:
            _, entry = self._entries.popitem(last=False)
            self._chars -= len(entry.text)


# -- serialization of tokenized passages ------------------------------------------------------------


def encode_tokens(encoded: EncodedPassage) -> bytes:
    """Token ids and offsets as compact bytes (versioned; the text travels separately)."""
    ids = np.ascontiguousarray(encoded.token_ids, dtype="<i4")
    offsets = np.ascontiguousarray(encoded.offsets, dtype="<i4")
    if offsets.shape != (ids.shape[0], 2):
        raise ValueError(f"offsets of shape {offsets.shape} do not match {ids.shape[0]} tokens")
    return ENCODING_HEADER.pack(ENCODING_MAGIC, ENCODING_VERSION, ids.shape[0]) + ids.tobytes() + offsets.tobytes()


def decode_tokens(text: str, blob: bytes) -> EncodedPassage:
    """The inverse of `encode_tokens`; ValueError for anything malformed (a foreign or older format)."""
    if len(blob) < ENCODING_HEADER.size:
        raise ValueError("truncated passage encoding")
    magic, version, count = ENCODING_HEADER.unpack_from(blob)
    if magic != ENCODING_MAGIC or version != ENCODING_VERSION:
        raise ValueError(f"unknown passage encoding {magic!r} v{version}")
    if len(blob) != ENCODING_HEADER.size + 12 * count:
        raise ValueError(f"passage encoding of {len(blob)} bytes does not hold {count} tokens")
    body = ENCODING_HEADER.size
    ids = np.frombuffer(blob, dtype="<i4", count=count, offset=body).astype(np.int32)
    offsets = np.frombuffer(blob, dtype="<i4", count=2 * count, offset=body + 4 * count).astype(np.int32)
    offsets = offsets.reshape(count, 2)
    if count and (offsets.min() < 0 or offsets.max() > len(text)):
        raise ValueError("passage encoding offsets fall outside the text")
    return EncodedPassage(text, ids, offsets)


# -- the store the service talks to ----------------------------------------------------------------


class SharedPassages(Protocol):
    """A store shared by replicas (Redis): whole passages by (scope, id), tokens per model."""

    async def save(self, scope: str, passage_id: str, text: str, model_id: str, tokens: bytes) -> None: ...

    async def save_tokens(self, scope: str, passage_id: str, model_id: str, tokens: bytes) -> None: ...

    async def load(self, scope: str, passage_id: str, model_id: str) -> tuple[str, bytes | None] | None: ...

    async def close(self) -> None: ...


class PassageStore:
    """What the service uses: the local cache first, then the shared store (if any)."""

    def __init__(self, cache: PassageCache, shared: SharedPassages | None = None) -> None:
        self.cache = cache
        self.shared = shared

    @staticmethod
    def id_of(text: str) -> str:
        return passage_id_of(text)

    def cached_encoding(self, scope: str, passage_id: str, model_id: str) -> EncodedPassage | None:
        """This process's tokens of the passage for `model_id`, if it holds them (no shared-store call)."""
        if not self.cache.holds(passage_id, scope):
            return None
        return self.cache.encoding(passage_id, model_id, scope)

    async def lookup(self, scope: str, passage_id: str, model_id: str) -> tuple[str, EncodedPassage | None]:
        """The passage's text and, if encoded before for `model_id`, its tokens.

        Raises NOT_FOUND when neither layer holds the id for this scope, UNAVAILABLE when the shared
        store cannot be read.
        """
        if self.cache.holds(passage_id, scope):
            return self.cache.text(passage_id, scope), self.cache.encoding(passage_id, model_id, scope)
        if self.shared is None:
            self.cache.text(passage_id, scope)  # raises NOT_FOUND
        assert self.shared is not None
        found = await self.shared.load(scope, passage_id, model_id)
        if found is None:
            raise UnknownPassageError(
                f"unknown passage_id {passage_id!r} (never stored, expired or evicted): send the passage again"
            )
        text, blob = found
        if passage_id_of(text) != passage_id:  # never answer from a passage other than the one asked for
            log.warning("shared passage store returned text that does not match id %s: ignored", passage_id)
            raise UnknownPassageError(f"unknown passage_id {passage_id!r}: send the passage again")
        encoded = None
        if blob is not None:
            try:
                encoded = decode_tokens(text, blob)
            except ValueError as exc:
                log.warning("unreadable tokens for passage %s in the shared store (%s): re-tokenizing", passage_id, exc)
        self.cache.put(text, scope)
        if encoded is not None:
            self.cache.set_encoding(passage_id, model_id, encoded, scope)
        return text, encoded

    async def store(self, scope: str, text: str, model_id: str, encoded: EncodedPassage, shared: bool = True) -> str:
        """Keep a tokenized passage in both layers; returns its id.

        `shared=False` keeps it locally only: for passages sent inline with a question, which nobody
        can refer to by id unless they were stored with PutPassage (or tokenized earlier).
        """
        passage_id = self.cache.put(text, scope)
        self.cache.set_encoding(passage_id, model_id, encoded, scope)
        if shared and self.shared is not None:
            await self.shared.save(scope, passage_id, text, model_id, encode_tokens(encoded))
        return passage_id

    async def add_encoding(self, scope: str, passage_id: str, model_id: str, encoded: EncodedPassage) -> None:
        """Tokens of an already stored passage for another model (shared, so other replicas skip the work)."""
        self.cache.set_encoding(passage_id, model_id, encoded, scope)
        if self.shared is not None:
            await self.shared.save_tokens(scope, passage_id, model_id, encode_tokens(encoded))

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()


class RedisPassageStore:
    """Passages in Redis: one hash per (scope, id) with the text and tokens per model, expiring after `ttl_s`.

    Keys are `qa:passage:v1:<scope digest>:<passage id>`; the scope digest keeps tenants apart without
    putting identities into Redis. Memory is bounded by the server (`maxmemory` + `allkeys-lru`).
    """

    def __init__(self, url: str, ttl_s: int = DEFAULT_TTL_S, timeout_s: float = 1.0) -> None:
        import redis.asyncio as aioredis

        if ttl_s <= 0:
            raise ValueError(f"passage TTL must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self.url = url
        self._redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=False
        )

    @staticmethod
    def key(scope: str, passage_id: str) -> str:
        scope_digest = hashlib.sha256(scope.encode("utf-8")).hexdigest()[:16]
        return f"{REDIS_KEY_PREFIX}{scope_digest}:{passage_id}"

    async def save(self, scope: str, passage_id: str, text: str, model_id: str, tokens: bytes) -> None:
        key = self.key(scope, passage_id)
        mapping = {b"text": text.encode("utf-8", "surrogatepass"), b"tokens:" + model_id.encode(): tokens}
        await self._run(self._write(key, mapping), "store the passage")

    async def save_tokens(self, scope: str, passage_id: str, model_id: str, tokens: bytes) -> None:
        key = self.key(scope, passage_id)
        # Only add tokens to a passage that is still there: never a hash with tokens and no text.
        script = "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end"
        await self._run(self._redis.eval(script, 1, key, b"tokens:" + model_id.encode(), tokens), "store tokens")

    async def load(self, scope: str, passage_id: str, model_id: str) -> tuple[str, bytes | None] | None:
        key = self.key(scope, passage_id)
        text, tokens = await self._run(self._redis.hmget(key, [b"text", b"tokens:" + model_id.encode()]), "read")
        if text is None:
            return None
        return text.decode("utf-8", "surrogatepass"), tokens

    async def ping(self) -> None:
        await self._run(self._redis.ping(), "reach")

    async def close(self) -> None:
        await self._redis.aclose()

    async def _write(self, key: str, mapping: dict[bytes, bytes]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def _run(self, awaitable: Any, what: str) -> Any:
        from redis.exceptions import RedisError

        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            log.warning("passage store: cannot %s: %s", what, type(exc).__name__)
            raise NotServingError(f"the shared passage store is unavailable (cannot {what}); retry later") from None


def open_passage_store(max_chars: int, url: str | None, ttl_s: int = DEFAULT_TTL_S) -> PassageStore:
    """The store `--passage-store` asks for: None or "memory" = in-process only; redis://… = shared."""
    cache = PassageCache(max_chars)
    if url is None or url in ("", "memory"):
        return PassageStore(cache)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return PassageStore(cache, RedisPassageStore(url, ttl_s))
    raise ValueError(f"unknown passage store {url!r}: use 'memory' or redis://host:port/db")
