"""Waiting on observable state in async tests: one polling helper, always bounded in time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_until(
    condition: Callable[[], object], timeout_s: float = 30, what: str = "", interval_s: float = 0.002
) -> None:
    """Poll `condition` until it holds; fail with TimeoutError (naming `what`) after `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(interval_s)
    except TimeoutError:
        raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what or 'the condition'}") from None
