"""The `--event-loop uvloop` hang (fixed): a request whose batch was due could wait in the batcher until its deadline.

`Batcher._next_batch` read the clock twice: once to find no eligible caller (a caller with a backlog still
yielding LIGHT_YIELD_NS to a small request's batch that just ended), once to compute how long to wait. When the
yield ended between the two readings, the wait came out 0, which means "no timeout", and the worker slept until
something else woke it: with one client, the request's own deadline. uvloop makes this frequent (its timers are
millisecond-rounded on a cached loop clock and can fire up to ~1 ms early, so the worker re-checks within
microseconds of the end of the yield); on asyncio it is rare but possible. Measured with
`qa-serve --max-batch-size 1` and a lone client (tiny engine, 2-window questions, HEAD 260688f): uvloop 10
hangs in 161 calls in 20 s, asyncio none in 1,592.

The test forces the race on every loop: the end of the yield is made to fall exactly between the two
readings, so the outcome does not depend on timer luck.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from realtime_qa.qacore.answerer import QuestionAnswerer
from realtime_qa.services.batcher import LIGHT_YIELD_NS, Batcher, BatcherConfig
from tiny_models import build_tiny_engine

PASSAGE = " ".join(f"Sentence {k}: Paris is the capital of France." for k in range(40))
QUESTION = "What is the capital of France?"
HEAVY_WINDOWS = 8  # more than any backlog threshold of the batcher at max batch 1
DEADLINE_S = 2.0  # the hang lasted until the request's deadline


def loop_factories() -> list[tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]]:
    factories: list[tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]] = [("asyncio", None)]
    try:
        import uvloop
    except ImportError:
        return factories
    return [*factories, ("uvloop", uvloop.new_event_loop)]


@pytest.fixture(scope="module")
def answerer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuestionAnswerer]:
    engine: Path = build_tiny_engine(tmp_path_factory)
    with QuestionAnswerer.from_engine_dir(engine) as answerer:
        yield answerer


@pytest.fixture
def yield_ends_between_clock_readings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make `Batcher._eligible` return only once a backlog's yield it saw has ended, so the batcher's next reading
    of the clock is past it. Returns the list of forced races (their remaining yields in ns)."""
    forced: list[int] = []
    eligible = Batcher._eligible

    def eligible_then_yield_ends(self: Batcher, now: int) -> list:
        result = eligible(self, now)
        remaining_ns = self._heavy_wait_ns(now) if not result and self.depth else 0
        if remaining_ns:
            forced.append(remaining_ns)
            end_ns = now + remaining_ns + 1_000
            while time.perf_counter_ns() < end_ns:  # bounded: at most LIGHT_YIELD_NS
                pass
        return result

    monkeypatch.setattr(Batcher, "_eligible", eligible_then_yield_ends)
    return forced


@pytest.mark.parametrize(("loop_name", "factory"), loop_factories(), ids=[name for name, _ in loop_factories()])
def test_backlog_request_after_small_one_is_not_stranded(
    answerer: QuestionAnswerer,
    yield_ends_between_clock_readings: list[int],
    loop_name: str,
    factory: Callable[[], asyncio.AbstractEventLoop] | None,
) -> None:
    windows = answerer.featurizer.featurize(QUESTION, PASSAGE).windows
    assert len(windows) > HEAVY_WINDOWS, "the passage must need more windows than a backlog"

    async def scenario() -> float:
        batcher = Batcher([answerer.engine], answerer.featurizer, BatcherConfig(max_batch_size=1))
        batcher.start()
        try:
            # A small request's batch ends: a backlog that arrives now yields LIGHT_YIELD_NS to it.
            await batcher.run(windows[:1], time.perf_counter_ns() + int(DEADLINE_S * 1e9))
            started = time.perf_counter()
            await batcher.run(windows[:HEAVY_WINDOWS], time.perf_counter_ns() + int(DEADLINE_S * 1e9))
            return time.perf_counter() - started
        finally:
            await batcher.close(1.0)

    with asyncio.Runner(loop_factory=factory) as runner:
        elapsed_s = runner.run(scenario())
    if not yield_ends_between_clock_readings:
        pytest.skip("the small request's yield was over before the backlog arrived (a very slow host)")
    # Eight windows of the tiny engine and one 10 ms yield take milliseconds; stranded, the request would have
    # raised DeadlineExpiredError after DEADLINE_S.
    assert elapsed_s < DEADLINE_S / 2 + LIGHT_YIELD_NS / 1e9
