"""The dashboard in a real browser: Debian's headless Chromium (driven by Debian's chromedriver through
Selenium) against the dashboard of a chain under load; the figures must appear and change, user text
must stay text, and a screenshot is saved (in the test's tmp dir and in $QA_SCREENSHOT_DIR when set).

Skipped only when /usr/bin/chromium or /usr/bin/chromedriver is missing (`.ci/run` installs them).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.board import LatencyBoard
from pipeline.dashboard import start_dashboard

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)
WAIT_S = 60.0  # a loaded 2-core machine: generous, but every wait ends
HOSTILE = '<img src=x onerror="document.title=1">&amp;'

pytestmark = pytest.mark.slow


def _browser() -> Any:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='qa-chromium-')}")
    # An explicit driver path: selenium-manager never runs, nothing is downloaded.
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    driver = await asyncio.to_thread(_browser)
    try:
        yield driver
    finally:
        await asyncio.to_thread(driver.quit)


async def _wait(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    """Poll the page (in a thread, so the event loop keeps serving) until `condition` is truthy."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return await asyncio.to_thread(WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until, condition)
    except TimeoutException:
        raise AssertionError(f"timed out after {WAIT_S:.0f} s waiting for {what}") from None


def _text(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    text: str = driver.find_element(By.ID, element_id).text
    return text


def _number(driver: Any, element_id: str) -> float | None:
    text = _text(driver, element_id).replace("ms", "").replace("%", "").strip()
    try:
        return float(text)
    except ValueError:
        return None


async def _screenshot(driver: Any, tmp_path: Path) -> Path:
    """The whole page as PNG in tmp_path, copied to $QA_SCREENSHOT_DIR/dashboard.png when set."""
    height = await asyncio.to_thread(driver.execute_script, "return document.documentElement.scrollHeight")
    await asyncio.to_thread(driver.set_window_size, 1400, int(height) + 140)
    await asyncio.sleep(0.5)  # one more push at the new size (the charts follow the window)
    shot = tmp_path / "dashboard.png"
    assert await asyncio.to_thread(driver.save_screenshot, str(shot))
    target_dir = os.environ.get("QA_SCREENSHOT_DIR")
    if target_dir:
        Path(target_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(target_dir) / "dashboard.png")
    return shot


async def test_dashboard_under_load_in_chromium(browser: Any, chain_under_load: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    url, board = chain_under_load
    await asyncio.to_thread(browser.get, url)

    # The figures appear ...
    await _wait(browser, lambda d: (_number(d, "turns-total") or 0) >= 3, "the first turns on the page")
    await _wait(browser, lambda d: _text(d, "conn-text") == "live", "the event stream to connect")
    first_turns = _number(browser, "turns-total")
    first_version = int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-version"))
    for stage in ("asr", "qa", "response", "turn"):
        row = browser.find_element(By.ID, f"stage-{stage}")
        cells = row.find_elements(By.TAG_NAME, "td")
        assert cells[0].text == stage
        assert all(cell.text.endswith(" ms") for cell in cells[2:5]), [cell.text for cell in cells]
    assert _text(browser, "qa-budget").startswith("budget 10.0 ms")
    assert _text(browser, "verdict-text") in ("Within budget", "Close to budget", "Over budget")
    assert _number(browser, "turn-p95") is not None and _number(browser, "qa-p95") is not None
    assert browser.find_elements(By.CSS_SELECTOR, "#timeline svg rect")
    assert browser.find_elements(By.CSS_SELECTOR, "#qa-timeline svg rect")

    # ... and change while turns keep coming.
    await _wait(browser, lambda d: (_number(d, "turns-total") or 0) > (first_turns or 0) + 3, "more turns")
    later_version = int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-version"))
    assert later_version > first_version

    # What the page shows is what /api/latency says (the page renders the same snapshots).
    info = {
        dt.text: dd.text
        for dt, dd in zip(
            *(browser.find_elements(By.CSS_SELECTOR, f"#info {tag}") for tag in ("dt", "dd")), strict=True
        )
    }
    assert info["note"] == HOSTILE  # text, not markup
    assert not browser.find_elements(By.CSS_SELECTOR, "#info img")
    assert browser.title.startswith("Latency budget")
    assert board.turns_total >= (_number(browser, "turns-total") or 0)

    shot = await _screenshot(browser, tmp_path)
    assert shot.stat().st_size > 10_000


@pytest.fixture
async def chain_under_load() -> AsyncIterator[tuple[str, LatencyBoard]]:
    """A dashboard whose board is fed synthetic turns continuously (until the chain's launcher exists)."""
    from test_dashboard import synthetic_turn

    board = LatencyBoard()
    board.set_info({"backend": "onnxruntime", "precision": "fp32", "note": HOSTILE})
    server = await start_dashboard(board, port=0)

    async def load() -> None:
        turn = 0
        while True:
            board.record(synthetic_turn(turn, 20 + turn % 17, 4 + (turn * 7) % 9, 1 + turn % 3))
            turn += 1
            await asyncio.sleep(0.03)

    task = asyncio.create_task(load())
    try:
        yield server.url, board
    finally:
        task.cancel()
        await server.stop()
