"""The models a server holds: engines (one per context), featurizer, decoder defaults and batcher, by model id.

Each engine directory is opened as a `qacore.bundle.EngineBundle` (engine file and vocabulary checked,
windows sized to the engine, the model's calibrated null threshold as the decoder default), the same
way `qa-assistant` and `qa-eval` open it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from realtime_qa.qacore.bundle import open_bundle
from realtime_qa.qacore.decoding import DecoderConfig
from realtime_qa.qacore.engine import Engine, EngineMeta
from realtime_qa.qacore.factory import EngineOptions, load_engine
from realtime_qa.qacore.features import Featurizer
from realtime_qa.services.batcher import Batcher, BatcherConfig, BatchObserver
from realtime_qa.services.config import EngineAddress, EngineSpec
from realtime_qa.services.errors import UnknownModelError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ModelRuntime:
    """One served model. `engines[0]` is the answerer's engine; further ones are extra contexts."""

    model_id: str
    engine_dir: Path
    engines: list[Engine]
    featurizer: Featurizer
    decoder_config: DecoderConfig
    batcher: Batcher
    ready: bool = False
    closed: bool = field(default=False, repr=False)

    @property
    def meta(self) -> EngineMeta:
        return self.engines[0].meta

    @property
    def engine_name(self) -> str:
        return f"{self.meta.backend}-{self.meta.precision}"

    async def close(self) -> None:
        """Stop the batcher (running what is queued), then release the engines."""
        if self.closed:
            return
        self.closed = True
        self.ready = False
        await self.batcher.close()
        for engine in self.engines:
            await asyncio.to_thread(engine.close)


async def load_model(
    spec: EngineSpec,
    options: EngineOptions,
    contexts: int,
    batcher_config: BatcherConfig,
    observer_for: Callable[[str], BatchObserver] | None = None,
    remote: EngineAddress | None = None,
) -> ModelRuntime:
    """Load and warm up `contexts` engines of one engine directory (on threads) and start its batcher.

    With `remote` (`--engine-process`), the engine lives in the engine process: each context is one
    connection to it (`services.engine_host.RemoteEngine`), and only the vocabulary is read here.
    """
    if remote is not None:
        from realtime_qa.services.engine_host import RemoteEngine, remote_bundle

        bundle = await asyncio.to_thread(remote_bundle, remote)
    else:
        bundle = await asyncio.to_thread(open_bundle, spec.engine_dir, options)
    engines = [bundle.engine]
    try:
        for _ in range(contexts - 1):
            if remote is not None:
                engines.append(await asyncio.to_thread(RemoteEngine, remote))
            else:
                engines.append(await asyncio.to_thread(load_engine, spec.engine_dir, options))
        model_id = spec.model_id or bundle.meta.model_id
        for engine in engines:
            await asyncio.to_thread(engine.warmup)
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    batcher = Batcher(
        engines,
        bundle.featurizer,
        batcher_config,
        observer=observer_for(model_id) if observer_for is not None else None,
        name=model_id,
    )
    batcher.start()
    meta = bundle.meta
    log.info(
        "model %s ready: %s %s engine from %s%s, %d context(s), max batch %d (engine %d), sequence lengths %s",
        model_id,
        meta.backend,
        meta.precision,
        spec.engine_dir,
        " in the engine process" if remote is not None else "",
        contexts,
        batcher.max_batch_size,
        meta.max_batch_size,
        list(meta.sequence_lengths),
    )
    return ModelRuntime(
        model_id=model_id,
        engine_dir=spec.engine_dir,
        engines=engines,
        featurizer=bundle.featurizer,
        decoder_config=bundle.decoder_defaults,
        batcher=batcher,
        ready=True,
    )


class ModelRegistry:
    """Served models by id, in load order; the first one is the default."""

    def __init__(self) -> None:
        self._models: dict[str, ModelRuntime] = {}

    def add(self, model: ModelRuntime) -> None:
        if model.model_id in self._models:
            raise ValueError(f"two engines are served under model id {model.model_id!r}; name them MODEL_ID=DIR")
        self._models[model.model_id] = model

    def __iter__(self) -> Iterator[ModelRuntime]:
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    @property
    def default_id(self) -> str | None:
        return next(iter(self._models), None)

    def lookup(self, model_id: str) -> ModelRuntime:
        """The model a request names ("" = default); NOT_FOUND if unknown (`QAService.model_for` adds readiness)."""
        key = model_id or self.default_id
        model = self._models.get(key) if key is not None else None
        if model is None:
            raise UnknownModelError(f"unknown model {model_id!r}; loaded: {', '.join(self._models) or 'none'}")
        return model
